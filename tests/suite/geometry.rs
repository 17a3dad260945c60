//! Property tests of the resize/crop geometry: for any source size, target and policy, the
//! encoder sees exactly the target window, crops lie inside the resized image, and padding
//! inside the window.

use proptest::prelude::*;
use vae_pipeline::bucket;
use vae_pipeline::config::{CropPlacement, ResizePolicy};
use vae_pipeline::resize::{prepare, Framing};

fn framing(policy: ResizePolicy, size: u32, no_upscale: bool) -> Framing {
    Framing {
        policy,
        size,
        buckets: bucket::generate(size.max(64), 64, 4.0),
        crop: CropPlacement::Random,
        no_upscale,
        step: 64,
        seed: 7,
        trainer: None,
    }
}

fn policy() -> impl Strategy<Value = ResizePolicy> {
    prop_oneof![
        Just(ResizePolicy::CenterCrop),
        Just(ResizePolicy::RandomCrop),
        Just(ResizePolicy::Stretch),
        Just(ResizePolicy::Pad),
        Just(ResizePolicy::Bucket),
    ]
}

proptest! {
    #[test]
    fn windows_fit_their_images(w in 1u32..100_000, h in 1u32..100_000, size in 1u32..4096, policy in policy(), no_upscale: bool, key in "[a-z]{1,8}") {
        let f = framing(policy, size, no_upscale && policy == ResizePolicy::Bucket);
        let Some(g) = f.geometry(&key, w, h) else {
            // Only --no-upscale buckets refuse, and only images smaller than one step.
            prop_assert!(f.no_upscale && (w < 64 || h < 64));
            return Ok(());
        };
        let (rw, rh) = (g.resized.0 as i64, g.resized.1 as i64);
        let (tw, th) = (g.target.0 as i64, g.target.1 as i64);
        let (left, top) = (g.offset.0 as i64, g.offset.1 as i64);
        prop_assert!(rw >= 1 && rh >= 1);
        if policy == ResizePolicy::Pad {
            // The image lies inside the window, centred.
            prop_assert!(left <= 0 && top <= 0 && rw - left <= tw && rh - top <= th);
            prop_assert!(rw == tw || rh == th, "fits one side exactly: {:?}", g);
        } else {
            // The window lies inside the image.
            prop_assert!(left >= 0 && top >= 0 && left + tw <= rw && top + th <= rh, "{:?}", g);
            if policy != ResizePolicy::Stretch {
                prop_assert!(rw == tw || rh == th, "covers with one side exact: {:?}", g);
            }
        }
        if policy == ResizePolicy::Bucket && !f.no_upscale {
            prop_assert!(f.buckets.contains(&g.target));
        }
        prop_assert_eq!(f.geometry(&key, w, h), Some(g), "the same key gives the same window");
    }

    #[test]
    fn prepared_window_is_exactly_the_target(w in 1u32..300, h in 1u32..300, size in 1u32..200, policy in policy(), seed in any::<u8>()) {
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let image = image::RgbImage::from_raw(w, h, pixels).unwrap();
        let f = framing(policy, size, false);
        let g = f.geometry("k", w, h).unwrap();
        let p = prepare(image, g).unwrap();
        prop_assert_eq!((p.crop_width, p.crop_height), g.target);
        prop_assert_eq!(p.pixels.len(), (p.width * p.height * 3) as usize);
        prop_assert_eq!(p.window_rgb().len(), (g.target.0 * g.target.1 * 3) as usize);
        let mut chw = vec![0.0; (3 * g.target.0 * g.target.1) as usize];
        p.write_chw(&mut chw, [0.0, 1.0], true);
        prop_assert!(chw.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

#[test]
fn mirrored_window_is_the_window_reversed() {
    let image =
        image::RgbImage::from_fn(40, 20, |x, y| image::Rgb([x as u8 * 5, y as u8 * 9, 100]));
    let f = framing(ResizePolicy::Pad, 32, false);
    let p = prepare(image, f.geometry("k", 40, 20).unwrap()).unwrap();
    let (mut a, mut b) = (vec![0.0; 3 * 32 * 32], vec![0.0; 3 * 32 * 32]);
    p.write_chw(&mut a, [-1.0, 1.0], false);
    p.write_chw(&mut b, [-1.0, 1.0], true);
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(a[c * 1024 + y * 32 + x], b[c * 1024 + y * 32 + 31 - x]);
            }
        }
    }
    // Letterbox rows (top and bottom) are the range's midpoint.
    assert!(a[..32].iter().all(|&v| v == 0.0));
}

#[test]
fn generated_buckets_follow_kohya_at_1024() {
    let b = bucket::generate(1024, 64, 4.0);
    assert!(b.contains(&(1024, 1024)) && b.contains(&(512, 2048)) && b.contains(&(2048, 512)));
    assert!(b
        .iter()
        .all(|&(w, h)| w % 64 == 0 && h % 64 == 0 && w * h <= 1024 * 1024));
    assert!(b
        .iter()
        .all(|&(w, h)| w.max(h) as f64 / w.min(h) as f64 <= 4.0));
    assert_eq!(bucket::assign(&b, 768, 512, false, 64), Some((1216, 832)));
    assert_eq!(bucket::SDXL.len(), 41);
}
