//! Property tests of the resize/crop geometry: for any source size and target, the encoder sees
//! exactly size×size pixels and the crop lies inside the resized image.

use proptest::prelude::*;
use vae_pipeline::config::ResizePolicy;
use vae_pipeline::resize::{prepare, target_dims};

proptest! {
    #[test]
    fn target_dims_cover_the_square(w in 1u32..100_000, h in 1u32..100_000, size in 1u32..4096) {
        let (tw, th) = target_dims(ResizePolicy::CenterCrop, w, h, size);
        prop_assert_eq!(tw.min(th), size, "shorter side becomes size");
        prop_assert!(tw >= size && th >= size);
        // The aspect ratio is kept to within the rounding of the longer side.
        let (long, short) = (w.max(h) as f64, w.min(h) as f64);
        let scaled = long * size as f64 / short;
        prop_assert!((tw.max(th) as f64 - scaled.max(size as f64)).abs() <= 0.5 + 1e-9);
    }

    #[test]
    fn prepared_window_is_inside_and_exactly_size(w in 1u32..300, h in 1u32..300, size in 1u32..200, seed in any::<u8>()) {
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let image = image::RgbImage::from_raw(w, h, pixels).unwrap();
        let p = prepare(image, ResizePolicy::CenterCrop, size).unwrap();
        prop_assert_eq!((p.crop_width, p.crop_height), (size, size));
        prop_assert!(p.crop_left + p.crop_width <= p.width && p.crop_top + p.crop_height <= p.height);
        prop_assert_eq!(p.pixels.len(), (p.width * p.height * 3) as usize);
        prop_assert_eq!(p.window_rgb().len(), (size * size * 3) as usize);
        // Centred: the margins on each side differ by at most one pixel.
        prop_assert!((p.width - p.crop_width - 2 * p.crop_left) <= 1 && (p.height - p.crop_height - 2 * p.crop_top) <= 1);
    }
}
