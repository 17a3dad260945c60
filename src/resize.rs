//! Resize: takes an upright RGB8 image, hands on the encoder-sized view of it (`Prepared`): the
//! resized pixels plus the crop window, and normalizes that window into a batch tensor.

use std::cell::RefCell;

use anyhow::{Context, Result};
use fast_image_resize::{
    self as fr, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions,
};
use image::RgbImage;

use crate::config::ResizePolicy;

/// An image ready for batching: `pixels` is `width`×`height` RGB8 (the resized image), and the
/// encoder sees the `size`×`size` window at (`crop_left`, `crop_top`).
pub struct Prepared {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub crop_left: u32,
    pub crop_top: u32,
    pub size: u32,
}

thread_local! {
    /// One resizer per decode thread: its internal buffers are reused from image to image.
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

/// The resized size for `policy`: the shorter side becomes `size`, the longer side keeps the
/// aspect ratio, rounded to the nearest pixel.
pub fn target_dims(policy: ResizePolicy, width: u32, height: u32, size: u32) -> (u32, u32) {
    match policy {
        ResizePolicy::CenterCrop => {
            let (short, long) = (width.min(height) as u64, width.max(height) as u64);
            let scaled_long = ((long * size as u64 + short / 2) / short) as u32;
            if width <= height {
                (size, scaled_long.max(size))
            } else {
                (scaled_long.max(size), size)
            }
        }
    }
}

/// Applies `policy`; antialiased Lanczos3, the filter Pillow's `Image.LANCZOS` uses.
pub fn prepare(image: RgbImage, policy: ResizePolicy, size: u32) -> Result<Prepared> {
    let (w, h) = image.dimensions();
    let (tw, th) = target_dims(policy, w, h, size);
    let pixels = if (tw, th) == (w, h) {
        image.into_raw()
    } else {
        let src =
            ImageRef::new(w, h, image.as_raw(), PixelType::U8x3).context("source image buffer")?;
        let mut dst = fr::images::Image::new(tw, th, PixelType::U8x3);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
        RESIZER
            .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
            .with_context(|| format!("resizing {w}x{h} to {tw}x{th}"))?;
        dst.into_vec()
    };
    Ok(Prepared {
        pixels,
        width: tw,
        height: th,
        crop_left: (tw - size) / 2,
        crop_top: (th - size) / 2,
        size,
    })
}

impl Prepared {
    /// The crop window as HWC RGB8 (for tests and reports).
    pub fn window_rgb(&self) -> Vec<u8> {
        let s = self.size as usize;
        let mut out = Vec::with_capacity(s * s * 3);
        for y in 0..s {
            let start =
                ((self.crop_top as usize + y) * self.width as usize + self.crop_left as usize) * 3;
            out.extend_from_slice(&self.pixels[start..start + s * 3]);
        }
        out
    }

    /// Writes the crop window into `dst` (CHW, `3·size²` floats), mapping 0..=255 onto `range`.
    pub fn write_chw(&self, dst: &mut [f32], range: [f32; 2]) {
        let s = self.size as usize;
        let plane = s * s;
        assert_eq!(dst.len(), 3 * plane, "destination must hold one CHW image");
        let lut = level_table(range);
        let (r, rest) = dst.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for y in 0..s {
            let start =
                ((self.crop_top as usize + y) * self.width as usize + self.crop_left as usize) * 3;
            let row = &self.pixels[start..start + s * 3];
            let at = y * s;
            for (x, px) in row.chunks_exact(3).enumerate() {
                r[at + x] = lut[px[0] as usize];
                g[at + x] = lut[px[1] as usize];
                b[at + x] = lut[px[2] as usize];
            }
        }
    }
}

/// Every 8-bit level mapped to `range`: `v/255` in f32 as the goldens compute it, then scaled.
fn level_table([lo, hi]: [f32; 2]) -> [f32; 256] {
    std::array::from_fn(|v| lo + (v as f32 / 255.0) * (hi - lo))
}
