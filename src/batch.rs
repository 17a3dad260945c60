//! Batch: takes prepared images in order, hands on `Batch`es of one input shape: an NCHW tensor
//! in the encoder's input type (f32 or f16), filled straight from the resized pixels on the
//! rayon pool, plus the rows' metadata. A partial batch is flushed at the end.

use std::collections::BTreeMap;

use half::f16;
use rayon::prelude::*;

use crate::pool;
use crate::resize::{Level, Prepared};
use crate::runtime::Pixels;

/// What the shard records about one source image besides its latent.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMeta {
    pub key: String,
    pub source_sha256: [u8; 32],
    /// Upright size after EXIF orientation.
    pub orig_width: i32,
    pub orig_height: i32,
    /// Offset of the crop in resized pixels.
    pub crop_top: i32,
    pub crop_left: i32,
    /// Pixel size fed to the encoder.
    pub width: i32,
    pub height: i32,
    pub caption: Option<String>,
    /// Values of the run's JSON sidecar columns, in `SidecarSchema` order.
    pub extra: Vec<Option<crate::sidecar::Scalar>>,
}

/// Images of one shape, ready for the encoder.
pub struct Batch {
    pub width: u32,
    pub height: u32,
    pub rows: Vec<RowMeta>,
    /// `rows.len()` × 3 × height × width, NCHW, in the model's input range and element type;
    /// with `flipped`, each image is followed by its mirror image (2 × `rows.len()` images).
    pub pixels: BatchPixels,
    pub flipped: bool,
}

/// A batch tensor in the element type the encoder takes, so nothing converts it on the way in.
/// Sized for a full batch while it fills (reused from the pool, not zeroed); a flushed partial
/// batch is cut to its rows.
pub enum BatchPixels {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl BatchPixels {
    pub fn view(&self) -> Pixels<'_> {
        match self {
            BatchPixels::F32(v) => Pixels::F32(v),
            BatchPixels::F16(v) => Pixels::F16(v),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            BatchPixels::F32(v) => v.len(),
            BatchPixels::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn truncate(&mut self, len: usize) {
        match self {
            BatchPixels::F32(v) => v.truncate(len),
            BatchPixels::F16(v) => v.truncate(len),
        }
    }

    /// Writes `images` (slot i gets image i and, with `copies` 2, its mirror after it), all
    /// images at once on the rayon pool.
    fn fill(&mut self, images: &[Prepared], copies: usize, range: [f32; 2]) {
        fn fill_as<T: Level + Send>(
            dst: &mut [T],
            images: &[Prepared],
            copies: usize,
            range: [f32; 2],
        ) {
            let per = dst.len() / images.len().max(1);
            dst.par_chunks_mut(per)
                .zip(images.par_iter())
                .for_each(|(slot, image)| {
                    for (i, dst) in slot.chunks_mut(per / copies).enumerate() {
                        image.write_chw(dst, range, i == 1);
                    }
                });
        }
        match self {
            BatchPixels::F32(v) => fill_as(v, images, copies, range),
            BatchPixels::F16(v) => fill_as(v, images, copies, range),
        }
    }
}

impl Batch {
    fn with_capacity(width: u32, height: u32, rows: usize, flipped: bool, f16: bool) -> Self {
        let images = if flipped { 2 * rows } else { rows };
        let len = images * image_len(width, height);
        Batch {
            width,
            height,
            rows: Vec::with_capacity(rows),
            pixels: if f16 {
                BatchPixels::F16(pool::HALVES.take_len(len))
            } else {
                BatchPixels::F32(pool::FLOATS.take_len(len))
            },
            flipped,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        match &mut self.pixels {
            BatchPixels::F32(v) => pool::FLOATS.give(std::mem::take(v)),
            BatchPixels::F16(v) => pool::HALVES.give(std::mem::take(v)),
        }
    }
}

fn image_len(width: u32, height: u32) -> usize {
    3 * width as usize * height as usize
}

/// A batch being filled: its rows so far and their images, written all at once when it is
/// handed on.
struct Filling {
    batch: Batch,
    images: Vec<Prepared>,
}

/// Groups prepared images by shape into batches of `batch_size`.
pub struct Batcher {
    batch_size: usize,
    input_range: [f32; 2],
    flip: bool,
    f16: bool,
    open: BTreeMap<(u32, u32), Filling>,
}

impl Batcher {
    pub fn new(batch_size: usize, input_range: [f32; 2]) -> Self {
        Batcher {
            batch_size,
            input_range,
            flip: false,
            f16: false,
            open: BTreeMap::new(),
        }
    }

    /// Also batch each image's mirror image (`--flip`).
    pub fn with_flip(mut self, flip: bool) -> Self {
        self.flip = flip;
        self
    }

    /// Write float16 batches, for an encoder whose input is float16.
    pub fn with_f16(mut self, f16: bool) -> Self {
        self.f16 = f16;
        self
    }

    fn copies(&self) -> usize {
        if self.flip {
            2
        } else {
            1
        }
    }

    /// Adds one image; returns the batch it completed, if any.
    pub fn push(&mut self, image: Prepared, meta: RowMeta) -> Option<Batch> {
        let shape = (image.crop_width, image.crop_height);
        let (batch_size, flip, f16) = (self.batch_size, self.flip, self.f16);
        let filling = self.open.entry(shape).or_insert_with(|| Filling {
            batch: Batch::with_capacity(shape.0, shape.1, batch_size, flip, f16),
            images: Vec::with_capacity(batch_size),
        });
        filling.images.push(image);
        filling.batch.rows.push(meta);
        if filling.batch.len() == self.batch_size {
            let filling = self.open.remove(&shape).expect("present");
            Some(self.finish(filling))
        } else {
            None
        }
    }

    /// Writes a batch's images into its tensor, cut to its rows.
    fn finish(&self, Filling { mut batch, images }: Filling) -> Batch {
        let filled = images.len() * self.copies() * image_len(batch.width, batch.height);
        batch.pixels.truncate(filled);
        batch.pixels.fill(&images, self.copies(), self.input_range);
        batch
    }

    /// The partial batches left at the end of the input, in shape order, cut to their rows.
    pub fn flush(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.open)
            .into_values()
            .filter(|f| !f.batch.is_empty())
            .map(|f| self.finish(f))
            .collect()
    }
}
