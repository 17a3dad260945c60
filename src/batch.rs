//! Batch: takes prepared images in order, hands on `Batch`es of one input shape: an NCHW f32
//! tensor filled straight from the resized pixels, plus the rows' metadata. A partial batch is
//! flushed at the end.

use std::collections::BTreeMap;

use crate::pool;
use crate::resize::Prepared;

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
    /// `rows.len()` × 3 × height × width, NCHW, in the model's input range; with `flipped`,
    /// each image is followed by its mirror image (2 × `rows.len()` images). Sized for a full
    /// batch while it fills (reused, not zeroed); a flushed partial batch is cut to its rows.
    pub pixels: Vec<f32>,
    pub flipped: bool,
}

impl Batch {
    fn with_capacity(width: u32, height: u32, rows: usize, flipped: bool) -> Self {
        let images = if flipped { 2 * rows } else { rows };
        Batch {
            width,
            height,
            rows: Vec::with_capacity(rows),
            pixels: pool::FLOATS.take_len(images * image_len(width, height)),
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
        pool::FLOATS.give(std::mem::take(&mut self.pixels));
    }
}

fn image_len(width: u32, height: u32) -> usize {
    3 * width as usize * height as usize
}

/// Groups prepared images by shape into batches of `batch_size`.
pub struct Batcher {
    batch_size: usize,
    input_range: [f32; 2],
    flip: bool,
    open: BTreeMap<(u32, u32), Batch>,
}

impl Batcher {
    pub fn new(batch_size: usize, input_range: [f32; 2]) -> Self {
        Batcher {
            batch_size,
            input_range,
            flip: false,
            open: BTreeMap::new(),
        }
    }

    /// Also batch each image's mirror image (`--flip`).
    pub fn with_flip(mut self, flip: bool) -> Self {
        self.flip = flip;
        self
    }

    /// Adds one image; returns the batch it completed, if any.
    pub fn push(&mut self, image: &Prepared, meta: RowMeta) -> Option<Batch> {
        let shape = (image.crop_width, image.crop_height);
        let (batch_size, flip, len) = (self.batch_size, self.flip, image_len(shape.0, shape.1));
        let batch = self
            .open
            .entry(shape)
            .or_insert_with(|| Batch::with_capacity(shape.0, shape.1, batch_size, flip));
        let copies = if flip { 2 } else { 1 };
        for mirror in [false, true].into_iter().take(copies) {
            let start = (batch.rows.len() * copies + usize::from(mirror)) * len;
            image.write_chw(
                &mut batch.pixels[start..start + len],
                self.input_range,
                mirror,
            );
        }
        batch.rows.push(meta);
        if batch.len() == self.batch_size {
            self.open.remove(&shape)
        } else {
            None
        }
    }

    /// The partial batches left at the end of the input, in shape order, cut to their rows.
    pub fn flush(&mut self) -> Vec<Batch> {
        let copies = if self.flip { 2 } else { 1 };
        std::mem::take(&mut self.open)
            .into_values()
            .filter(|b| !b.is_empty())
            .map(|mut b| {
                let filled = b.rows.len() * copies * image_len(b.width, b.height);
                b.pixels.truncate(filled);
                b
            })
            .collect()
    }
}
