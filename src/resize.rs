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
/// encoder sees the `crop_width`×`crop_height` window at (`crop_left`, `crop_top`).
pub struct Prepared {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub crop_left: u32,
    pub crop_top: u32,
    pub crop_width: u32,
    pub crop_height: u32,
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
    let pixels =
        lanczos3(image, tw, th).with_context(|| format!("resizing {w}x{h} to {tw}x{th}"))?;
    Ok(Prepared {
        pixels,
        width: tw,
        height: th,
        crop_left: (tw - size) / 2,
        crop_top: (th - size) / 2,
        crop_width: size,
        crop_height: size,
    })
}

/// Resizes in Pillow's order, horizontal pass then vertical, each rounded to 8 bits.
/// fast_image_resize runs the vertical pass first for u8 images; with Lanczos' negative lobes
/// the intermediate clamping then moves edge pixels by up to 12 levels away from Pillow.
fn lanczos3(image: RgbImage, tw: u32, th: u32) -> Result<Vec<u8>> {
    let (w, h) = image.dimensions();
    if (tw, th) == (w, h) {
        return Ok(image.into_raw());
    }
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    let src = ImageRef::new(w, h, image.as_raw(), PixelType::U8x3)?;
    let mut out = fr::images::Image::new(tw, th, PixelType::U8x3);
    RESIZER.with(|r| -> Result<()> {
        let mut r = r.borrow_mut();
        if tw == w || th == h {
            r.resize(&src, &mut out, &options)?;
        } else {
            let mut wide = fr::images::Image::new(tw, h, PixelType::U8x3);
            r.resize(&src, &mut wide, &options)?;
            r.resize(&wide, &mut out, &options)?;
        }
        Ok(())
    })?;
    Ok(out.into_vec())
}

impl Prepared {
    /// The crop window as HWC RGB8 (for tests and reports).
    pub fn window_rgb(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.crop_width as usize * self.crop_height as usize * 3);
        for y in 0..self.crop_height as usize {
            out.extend_from_slice(self.window_row(y));
        }
        out
    }

    /// Row `y` of the crop window, RGB8.
    fn window_row(&self, y: usize) -> &[u8] {
        let start =
            ((self.crop_top as usize + y) * self.width as usize + self.crop_left as usize) * 3;
        &self.pixels[start..start + self.crop_width as usize * 3]
    }

    /// Writes the crop window into `dst` (CHW, 3·w·h floats), mapping 0..=255 onto `range`.
    pub fn write_chw(&self, dst: &mut [f32], range: [f32; 2]) {
        let (w, h) = (self.crop_width as usize, self.crop_height as usize);
        let plane = w * h;
        assert_eq!(dst.len(), 3 * plane, "destination must hold one CHW image");
        let lut = level_table(range);
        let (r, rest) = dst.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for y in 0..h {
            let row = self.window_row(y);
            let at = y * w;
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
