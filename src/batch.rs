//! Batch: takes prepared images in order, hands on `Batch`es of one input shape: an NCHW tensor
//! in the encoder's input type (f32 or f16), filled straight from the resized pixels on the
//! rayon pool, plus the rows' metadata. A partial batch is flushed at the end.

use std::collections::BTreeMap;
use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::format::{InputShape, WindowMeta};
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
    /// A clip row's window of frames (None for images).
    pub window: Option<WindowMeta>,
}

/// What one row feeds the encoder: an image, or a clip window's frames (one size, shared
/// between overlapping windows).
pub enum RowPixels {
    Image(Prepared),
    Frames(Vec<Arc<Prepared>>),
}

impl RowPixels {
    fn frames(&self) -> usize {
        match self {
            RowPixels::Image(_) => 1,
            RowPixels::Frames(f) => f.len(),
        }
    }

    fn frame(&self, i: usize) -> &Prepared {
        match self {
            RowPixels::Image(p) => p,
            RowPixels::Frames(f) => &f[i],
        }
    }

    /// The batch shape this row joins.
    fn shape(&self) -> InputShape {
        let first = self.frame(0);
        InputShape {
            width: first.crop_width,
            height: first.crop_height,
            frames: match self {
                RowPixels::Image(_) => None,
                RowPixels::Frames(f) => Some(f.len() as u32),
            },
        }
    }
}

/// Images (or clip windows) of one shape, ready for the encoder.
pub struct Batch {
    pub width: u32,
    pub height: u32,
    /// Frames per clip window; None for images.
    pub frames: Option<u32>,
    pub rows: Vec<RowMeta>,
    /// `rows.len()` × 3 × height × width, NCHW, in the model's input range and element type;
    /// with `flipped`, each image is followed by its mirror image (2 × `rows.len()` images).
    /// Clips: `rows.len()` × T × 3 × height × width (frame-major), a flipped clip after its clip.
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

    /// Writes `rows` (slot i gets row i's frames and, with `copies` 2, their mirror images
    /// after them), all frames at once on the rayon pool.
    fn fill(&mut self, rows: &[RowPixels], copies: usize, range: [f32; 2]) {
        fn fill_as<T: Level + Send>(
            dst: &mut [T],
            rows: &[RowPixels],
            copies: usize,
            range: [f32; 2],
        ) {
            let per = dst.len() / rows.len().max(1);
            dst.par_chunks_mut(per)
                .zip(rows.par_iter())
                .for_each(|(slot, row)| {
                    let frames = row.frames();
                    slot.par_chunks_mut(per / (copies * frames))
                        .enumerate()
                        .for_each(|(i, dst)| {
                            row.frame(i % frames).write_chw(dst, range, i >= frames)
                        });
                });
        }
        match self {
            BatchPixels::F32(v) => fill_as(v, rows, copies, range),
            BatchPixels::F16(v) => fill_as(v, rows, copies, range),
        }
    }
}

impl Batch {
    fn with_capacity(shape: InputShape, rows: usize, flipped: bool, f16: bool) -> Self {
        let images = if flipped { 2 * rows } else { rows };
        let len = images * shape_len(shape);
        Batch {
            width: shape.width,
            height: shape.height,
            frames: shape.frames,
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

    pub fn input_shape(&self) -> InputShape {
        InputShape {
            width: self.width,
            height: self.height,
            frames: self.frames,
        }
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

/// Values of one row's pixels (all its frames).
fn shape_len(shape: InputShape) -> usize {
    3 * shape.width as usize * shape.height as usize * shape.frames.unwrap_or(1) as usize
}

/// A batch being filled: its rows so far and their pixels, written all at once when it is
/// handed on.
struct Filling {
    batch: Batch,
    pixels: Vec<RowPixels>,
}

/// Groups prepared images by shape into batches of `batch_size`.
pub struct Batcher {
    batch_size: usize,
    input_range: [f32; 2],
    flip: bool,
    f16: bool,
    open: BTreeMap<InputShape, Filling>,
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

    /// Adds one row; returns the batch it completed, if any.
    pub fn push(&mut self, pixels: RowPixels, meta: RowMeta) -> Option<Batch> {
        let shape = pixels.shape();
        let (batch_size, flip, f16) = (self.batch_size, self.flip, self.f16);
        let filling = self.open.entry(shape).or_insert_with(|| Filling {
            batch: Batch::with_capacity(shape, batch_size, flip, f16),
            pixels: Vec::with_capacity(batch_size),
        });
        filling.pixels.push(pixels);
        filling.batch.rows.push(meta);
        if filling.batch.len() == self.batch_size {
            let filling = self.open.remove(&shape).expect("present");
            Some(self.finish(filling))
        } else {
            None
        }
    }

    /// Writes a batch's rows into its tensor, cut to its rows.
    fn finish(&self, Filling { mut batch, pixels }: Filling) -> Batch {
        let filled = pixels.len() * self.copies() * shape_len(batch.input_shape());
        batch.pixels.truncate(filled);
        batch.pixels.fill(&pixels, self.copies(), self.input_range);
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
