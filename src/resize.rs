//! Resize: takes an upright RGB8 image, hands on the encoder's view of it (`Prepared`): the
//! resized pixels plus the window the encoder sees (a crop, or a padded frame), and normalizes
//! that window (or its mirror image) into a batch tensor. `Framing` decides the window: the
//! target size (the square, or the image's aspect bucket) and where the image sits in it.

use std::cell::RefCell;

use anyhow::{Context, Result};
use fast_image_resize::{
    self as fr, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions,
};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::bucket::{self, TrainerBuckets};
use crate::config::{CropPlacement, PrecomputeConfig, ResizePolicy};
use crate::pool;

/// An image ready for batching: `pixels` is `width`×`height` RGB8 (the resized image, or only
/// the window when it lies inside it); the
/// encoder sees the `crop_width`×`crop_height` window whose top-left corner is at
/// (`crop_left`, `crop_top`) in resized pixels. Negative offsets are padding (`pad`): window
/// pixels outside the image take the mid-grey of the input range.
pub struct Prepared {
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub crop_left: i32,
    pub crop_top: i32,
    pub crop_width: u32,
    pub crop_height: u32,
}

/// A copy for a second batcher (`report` encodes each image with every model); the pixels come
/// from the pool.
impl Clone for Prepared {
    fn clone(&self) -> Self {
        let mut pixels = pool::BYTES.take(self.pixels.len());
        pixels.extend_from_slice(&self.pixels);
        Prepared { pixels, ..*self }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        pool::BYTES.give(std::mem::take(&mut self.pixels));
    }
}

thread_local! {
    /// One resizer per decode thread, and the buffer between its two passes: both reused from
    /// image to image.
    static RESIZER: RefCell<(fr::Resizer, Vec<u8>)> = RefCell::new((fr::Resizer::new(), Vec::new()));
}

/// Where an image goes: the resized size and the window's offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub resized: (u32, u32),
    pub target: (u32, u32),
    /// Window origin in resized pixels (left, top); negative means padding.
    pub offset: (i32, i32),
}

/// How images become the encoder's window, built once per run from the config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Framing {
    pub policy: ResizePolicy,
    pub size: u32,
    /// The bucket list when `policy` is `bucket`.
    pub buckets: Vec<(u32, u32)>,
    pub crop: CropPlacement,
    pub no_upscale: bool,
    pub step: u32,
    pub seed: u64,
    /// A trainer's own rule (`--buckets kohya|musubi`): its choice, resize and crop replace
    /// `assign`'s, and `buckets` is its list. Absent otherwise, so older identities still read
    /// and hash the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<TrainerBuckets>,
}

impl Framing {
    pub fn new(config: &PrecomputeConfig) -> Result<Self> {
        let trainer = config.trainer_buckets();
        let buckets = match (&trainer, config.resize, config.buckets.as_deref()) {
            (Some(rule), _, _) => rule.resolutions(),
            (None, ResizePolicy::Bucket, Some("sdxl")) => bucket::SDXL.to_vec(),
            (None, ResizePolicy::Bucket, Some(file)) => {
                bucket::from_file(std::path::Path::new(file))?
            }
            (None, ResizePolicy::Bucket, None) => {
                bucket::generate(config.bucket_side(), config.bucket_step, config.max_aspect)
            }
            _ => Vec::new(),
        };
        Ok(Framing {
            policy: config.resize,
            size: config.size,
            buckets,
            crop: config.crop,
            no_upscale: config.no_upscale,
            step: config.bucket_step,
            seed: config.seed,
            trainer,
        })
    }

    /// A square center crop of `size`: what `report` and the tests use.
    pub fn center_crop(size: u32) -> Self {
        Framing {
            policy: ResizePolicy::CenterCrop,
            size,
            buckets: Vec::new(),
            crop: CropPlacement::Center,
            no_upscale: false,
            step: 64,
            seed: 0,
            trainer: None,
        }
    }

    /// The window for an upright `w`×`h` image with this key; None when no bucket can hold it.
    pub fn geometry(&self, key: &str, w: u32, h: u32) -> Option<Geometry> {
        let square = (self.size, self.size);
        let random = |max: (u32, u32)| {
            let mut hash = Sha256::new();
            hash.update(b"crop");
            hash.update(self.seed.to_le_bytes());
            hash.update(key.as_bytes());
            let mut rng = ChaCha8Rng::from_seed(hash.finalize().into());
            (
                rng.random_range(0..=max.0) as i32,
                rng.random_range(0..=max.1) as i32,
            )
        };
        let cover = |target: (u32, u32), placement: CropPlacement| {
            let resized = cover_dims(w, h, target);
            let slack = (resized.0 - target.0, resized.1 - target.1);
            let offset = match placement {
                CropPlacement::Center => ((slack.0 / 2) as i32, (slack.1 / 2) as i32),
                CropPlacement::Random => random(slack),
            };
            Geometry {
                resized,
                target,
                offset,
            }
        };
        Some(match self.policy {
            ResizePolicy::CenterCrop => cover(square, CropPlacement::Center),
            ResizePolicy::RandomCrop => cover(square, CropPlacement::Random),
            ResizePolicy::Bucket if self.trainer.is_some() => {
                let rule = self.trainer.as_ref()?;
                let p = rule.place(&self.buckets, w, h)?;
                Geometry {
                    resized: p.resized,
                    target: p.bucket,
                    offset: (p.crop.0 as i32, p.crop.1 as i32),
                }
            }
            ResizePolicy::Bucket => cover(
                bucket::assign(&self.buckets, w, h, self.no_upscale, self.step)?,
                self.crop,
            ),
            ResizePolicy::Stretch => Geometry {
                resized: square,
                target: square,
                offset: (0, 0),
            },
            ResizePolicy::Pad => {
                let resized = fit_dims(w, h, square);
                let offset = (
                    -(((square.0 - resized.0) / 2) as i32),
                    -(((square.1 - resized.1) / 2) as i32),
                );
                Geometry {
                    resized,
                    target: square,
                    offset,
                }
            }
        })
    }
}

/// Nearest-pixel rounding, as Python's `int(x + 0.5)`.
fn round(x: f64) -> u32 {
    (x + 0.5).floor() as u32
}

/// The smallest resize that covers `target` keeping the aspect ratio.
pub fn cover_dims(w: u32, h: u32, target: (u32, u32)) -> (u32, u32) {
    let scale = (f64::from(target.0) / f64::from(w)).max(f64::from(target.1) / f64::from(h));
    (
        round(f64::from(w) * scale).max(target.0),
        round(f64::from(h) * scale).max(target.1),
    )
}

/// The largest resize that fits inside `target` keeping the aspect ratio (at least 1×1).
pub fn fit_dims(w: u32, h: u32, target: (u32, u32)) -> (u32, u32) {
    let scale = (f64::from(target.0) / f64::from(w)).min(f64::from(target.1) / f64::from(h));
    (
        round(f64::from(w) * scale).clamp(1, target.0),
        round(f64::from(h) * scale).clamp(1, target.1),
    )
}

/// Resizes `image` as `geometry` says; antialiased Lanczos3, the filter of Pillow's `LANCZOS`.
/// `image` may be a reduced-scale decode of the source: `geometry` is in source terms, only
/// `resized` matters here. When the window lies inside the resized image (every crop policy),
/// only the window is computed, as Pillow's `resize(box=…)` does: the same pixels for about a
/// third less work on a 3:2 photo.
pub fn prepare(image: RgbImage, geometry: Geometry) -> Result<Prepared> {
    let (w, h) = image.dimensions();
    let (tw, th) = geometry.resized;
    let (ox, oy) = geometry.offset;
    let (cw, ch) = geometry.target;
    let inside = ox >= 0 && oy >= 0 && ox as u32 + cw <= tw && oy as u32 + ch <= th;
    let keep = if inside {
        Region {
            left: ox as u32,
            top: oy as u32,
            width: cw,
            height: ch,
        }
    } else {
        Region {
            left: 0,
            top: 0,
            width: tw,
            height: th,
        }
    };
    let pixels = lanczos3(image, (tw, th), keep)
        .with_context(|| format!("resizing {w}x{h} to {tw}x{th}"))?;
    Ok(Prepared {
        pixels,
        width: keep.width,
        height: keep.height,
        crop_left: ox - keep.left as i32,
        crop_top: oy - keep.top as i32,
        crop_width: cw,
        crop_height: ch,
    })
}

/// The part of the resized image that is computed, in resized pixels.
#[derive(Debug, Clone, Copy)]
struct Region {
    left: u32,
    top: u32,
    width: u32,
    height: u32,
}

/// Resizes to `resized` and keeps `keep`, in Pillow's order: horizontal pass, then vertical,
/// each rounded to 8 bits. fast_image_resize runs the vertical pass first for u8 images; with
/// Lanczos' negative lobes the intermediate clamping then moves edge pixels by up to 12 levels
/// away from Pillow. Its crop box works like Pillow's `box`: output centres shift, the filter is
/// still clipped at the image's own edges. Buffers come from and go back to `pool::BYTES`.
fn lanczos3(image: RgbImage, resized: (u32, u32), keep: Region) -> Result<Vec<u8>> {
    let (w, h) = image.dimensions();
    let (tw, th) = resized;
    let whole = (keep.left, keep.top, keep.width, keep.height) == (0, 0, tw, th);
    if (tw, th) == (w, h) && whole {
        return Ok(image.into_raw());
    }
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    // The kept region in source pixels.
    let (sx, sy) = (f64::from(w) / f64::from(tw), f64::from(h) / f64::from(th));
    let x0 = f64::from(keep.left) * sx;
    let y0 = f64::from(keep.top) * sy;
    let bw = (f64::from(keep.width) * sx).min(f64::from(w) - x0);
    let bh = (f64::from(keep.height) * sy).min(f64::from(h) - y0);
    let source = image.into_raw();
    let len = 3 * keep.width as usize * keep.height as usize;
    let buffer = pool::BYTES.take_len(len);
    let result = RESIZER.with(|cell| -> Result<Vec<u8>> {
        let (resizer, between) = &mut *cell.borrow_mut();
        let src = ImageRef::new(w, h, &source, PixelType::U8x3)?;
        let mut out =
            fr::images::Image::from_vec_u8(keep.width, keep.height, buffer, PixelType::U8x3)?;
        if tw == w || th == h {
            resizer.resize(&src, &mut out, &options.crop(x0, y0, bw, bh))?;
        } else {
            // Only the source rows the vertical filter reaches: its radius is 3 input pixels
            // per output pixel, plus one for rounding. The image's edges clip as before.
            let radius = 3.0 * sy.max(1.0) + 1.0;
            let r0 = (y0 - radius).floor().max(0.0) as u32;
            let r1 = ((y0 + bh + radius).ceil() as u32).min(h);
            let rows = r1 - r0;
            between.resize(3 * keep.width as usize * rows as usize, 0);
            let mut wide =
                fr::images::Image::from_slice_u8(keep.width, rows, between, PixelType::U8x3)?;
            let horizontal = options.crop(x0, f64::from(r0), bw, f64::from(rows));
            resizer.resize(&src, &mut wide, &horizontal)?;
            let width = f64::from(keep.width);
            let vertical = options.crop(0.0, y0 - f64::from(r0), width, bh);
            resizer.resize(&wide, &mut out, &vertical)?;
        }
        Ok(out.into_vec())
    });
    pool::BYTES.give(source);
    result
}

impl Prepared {
    /// The window as HWC RGB8 (padding as level 127; for tests and reports).
    pub fn window_rgb(&self) -> Vec<u8> {
        let (w, h) = (self.crop_width as usize, self.crop_height as usize);
        let mut out = vec![127u8; w * h * 3];
        for y in 0..h {
            if let Some((x0, src)) = self.window_row(y) {
                out[(y * w + x0) * 3..(y * w + x0) * 3 + src.len()].copy_from_slice(src);
            }
        }
        out
    }

    /// The image pixels on window row `y`: the first window column they cover and their RGB8
    /// bytes; None when the row is all padding.
    fn window_row(&self, y: usize) -> Option<(usize, &[u8])> {
        let sy = self.crop_top + y as i32;
        if sy < 0 || sy >= self.height as i32 {
            return None;
        }
        let x0 = (-self.crop_left).max(0) as usize;
        let sx0 = (self.crop_left + x0 as i32) as usize;
        let sx1 = (self.crop_left + self.crop_width as i32).min(self.width as i32) as usize;
        if sx1 <= sx0 {
            return None;
        }
        let start = (sy as usize * self.width as usize + sx0) * 3;
        Some((x0, &self.pixels[start..start + (sx1 - sx0) * 3]))
    }

    /// Writes the window into `dst` (CHW, 3·w·h floats of the model's input type), mapping
    /// 0..=255 onto `range`; padding is the range's midpoint. `mirror` writes it flipped left to
    /// right. An f16 value is the f16 nearest the f32 one, as a converted f32 batch would hold.
    pub fn write_chw<T: Level>(&self, dst: &mut [T], range: [f32; 2], mirror: bool) {
        let (w, h) = (self.crop_width as usize, self.crop_height as usize);
        let plane = w * h;
        assert_eq!(dst.len(), 3 * plane, "destination must hold one CHW image");
        let lut = level_table(range).map(T::from_f32);
        let fill = T::from_f32((range[0] + range[1]) / 2.0);
        let (r, rest) = dst.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for y in 0..h {
            let at = y * w;
            let (x0, row) = self.window_row(y).unwrap_or((0, &[]));
            let covered = x0..x0 + row.len() / 3;
            // Only `pad` leaves window pixels uncovered; crops skip this loop.
            let padded = (0..w).filter(|x| !covered.contains(x));
            for x in padded.take(w - covered.len()) {
                let xi = if mirror { w - 1 - x } else { x };
                (r[at + xi], g[at + xi], b[at + xi]) = (fill, fill, fill);
            }
            for (i, px) in row.chunks_exact(3).enumerate() {
                let x = x0 + i;
                let xi = at + if mirror { w - 1 - x } else { x };
                r[xi] = lut[px[0] as usize];
                g[xi] = lut[px[1] as usize];
                b[xi] = lut[px[2] as usize];
            }
        }
    }
}

/// An element type an encoder takes: f32, or f16 for fp16 models.
pub trait Level: Copy {
    fn from_f32(v: f32) -> Self;
}

impl Level for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Level for half::f16 {
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// Every 8-bit level mapped to `range`: `v/255` in f32 as the goldens compute it, then scaled.
fn level_table([lo, hi]: [f32; 2]) -> [f32; 256] {
    std::array::from_fn(|v| lo + (v as f32 / 255.0) * (hi - lo))
}
