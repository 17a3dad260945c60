//! The report on clips: the precompute clip stages (probe, windows, frames resized into the
//! clip's window, clip batches, the temporal encoder), then each card's temporal decoder on the
//! mean latent, and per frame of every window PSNR, SSIM and how the frame changed from the one
//! before it in the source and in the reconstruction (the window's temporal flicker).
//!
//! Clips flow a few at a time (one per thread), as in `precompute`, their frames as resized 8-bit
//! pictures; a batch's frames are widened to f32 only while it is scored. Only the scores, the
//! latent statistics and the gallery's pictures are kept.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::metrics::{psnr, ssim, Change};
use super::{planar01, ImageScore, Plan, Reconstructor, Scorer, Skipped};
use crate::batch::{Batch, Batcher, RowMeta, RowPixels};
use crate::failure::{Failure, FailureKind};
use crate::resize::Prepared;
use crate::rows::RowMaker;
use crate::source::{SampleRef, Source};

/// Where a scored frame sits in its window, and how it changed from the window's previous frame.
#[derive(Debug, Clone)]
pub struct FrameScore {
    /// Position in the window, from 0.
    pub index: usize,
    /// The clip's frame this is (`frame_indices` of the window's shard row).
    pub source_index: usize,
    /// None for a window's first frame.
    pub change: Option<Change>,
}

/// One window's frames as the encoder saw them, planar `3 × h × w` in [0, 1].
type Originals = Vec<Vec<f32>>;

/// A clip window's resized frames (shared with overlapping windows) and its row.
type ClipWindow = (Vec<Arc<Prepared>>, RowMeta);

/// A window's originals and per-frame (PSNR, SSIM, change), or None when the reconstruction is
/// not finite.
type WindowScores = Option<(Originals, Vec<(f64, f64, Option<Change>)>)>;

impl Scorer {
    /// Clips → windows of frames (parallel, a clip per thread) → per model: clip batches →
    /// temporal encoder → temporal decoder → per-frame scores.
    pub(super) fn score_clips(&mut self, plan: &Plan, chunk: usize) -> Result<()> {
        let source = plan.source.as_ref();
        let mut samples = source.list().take(plan.limit).peekable();
        while samples.peek().is_some() {
            let items: Vec<Result<SampleRef, Failure>> = samples.by_ref().take(chunk).collect();
            let prepared: Vec<Result<Vec<(RowPixels, RowMeta)>, Failure>> =
                self.pool.install(|| {
                    items
                        .into_par_iter()
                        .map(|item| item.and_then(|s| load_clip(source, &plan.rows, s)))
                        .collect()
                });
            let mut windows: Vec<ClipWindow> = Vec::new();
            let mut clips = 0;
            for item in prepared {
                match item {
                    Ok(rows) => {
                        clips += 1;
                        windows.extend(rows.into_iter().map(|(pixels, meta)| match pixels {
                            RowPixels::Frames(frames) => (frames, meta),
                            RowPixels::Image(image) => (vec![Arc::new(image)], meta),
                        }));
                    }
                    Err(failure) => self.skip_image(failure),
                }
            }
            let index: HashMap<&str, usize> = windows
                .iter()
                .enumerate()
                .map(|(i, (_, meta))| (meta.key.as_str(), i))
                .collect();
            for m in 0..self.models.len() {
                let mut batcher = Batcher::new(self.batch_size, self.models[m].card.input_range);
                for (frames, meta) in &windows {
                    if let Some(batch) =
                        batcher.push(RowPixels::Frames(frames.clone()), meta.clone())
                    {
                        self.encode_and_score_clips(m, batch, &windows, &index)?;
                    }
                }
                for batch in batcher.flush() {
                    self.encode_and_score_clips(m, batch, &windows, &index)?;
                }
                let name = self.models[m].card.name.clone();
                self.progress.advance(clips as u64, &name);
            }
        }
        Ok(())
    }

    /// Encodes one batch of windows, decodes the mean latents with the temporal decoder and
    /// scores every frame against the frame the encoder saw.
    fn encode_and_score_clips(
        &mut self,
        m: usize,
        batch: Batch,
        windows: &[ClipWindow],
        index: &HashMap<&str, usize>,
    ) -> Result<()> {
        let (width, height) = (batch.width as usize, batch.height as usize);
        let frames = batch.frames.unwrap_or(1) as usize;
        let model = &mut self.models[m];
        let encoded = model
            .encoder
            .as_mut()
            .expect("clip reports open encoders")
            .encode(batch)?;
        for failure in encoded.failures {
            model.failed += 1;
            self.skipped
                .push(Skipped::from_failure(failure, Some(&model.card.name)));
        }
        let n = encoded.rows.len();
        if n == 0 {
            return Ok(());
        }
        let shape = encoded.latent_shape.as_slice();
        let &[_, t_latent, h, w] = shape else {
            bail!("the temporal encoder gave latents {shape:?}; expected [C, T', h, w]");
        };
        let z = model.stored.raw_latents(&encoded.latents, shape);
        let Reconstructor::Clips(decoder) = &mut model.decoder else {
            unreachable!("clip reports open temporal decoders");
        };
        let mut recon = decoder.decode(&z, n, t_latent, h, w)?;
        let plane = 3 * width * height;
        if recon.len() != n * frames * plane {
            bail!(
                "model {}: latents {shape:?} decode to {} values per window, but the windows are \
                 {frames} frames of {width}x{height}",
                model.card.name,
                recon.len() / n
            );
        }
        let [lo, hi] = model.card.input_range;
        for v in &mut recon {
            *v = ((*v - lo) / (hi - lo)).clamp(0.0, 1.0);
        }
        let sources: Vec<&[Arc<Prepared>]> = encoded
            .rows
            .iter()
            .map(|r| windows[index[r.key.as_str()]].0.as_slice())
            .collect();
        let lpips = match self.lpips.as_mut() {
            Some(l) => {
                let all: Vec<f32> = sources
                    .iter()
                    .flat_map(|w| w.iter().flat_map(|f| planar01(f)))
                    .collect();
                Some(l.score(&all, &recon, n * frames, height, width)?)
            }
            None => None,
        };
        let window_len = frames * plane;
        let scored: Vec<WindowScores> = self.pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let r = &recon[i * window_len..(i + 1) * window_len];
                    r.iter().all(|v| v.is_finite()).then(|| {
                        let originals: Originals = sources[i].iter().map(|f| planar01(f)).collect();
                        let scores = score_window(&originals, r, width, height);
                        (originals, scores)
                    })
                })
                .collect()
        });
        let per_latent = shape.iter().product::<usize>();
        for (i, (row, score)) in encoded.rows.iter().zip(scored).enumerate() {
            let Some((originals, frame_scores)) = score else {
                model.failed += 1;
                self.skipped.push(Skipped {
                    key: row.key.clone(),
                    model: Some(model.card.name.clone()),
                    kind: FailureKind::Nonfinite,
                    message: format!(
                        "temporal decoder of {} produced NaN or Inf",
                        model.card.name
                    ),
                });
                continue;
            };
            let moments = model.stats.add(&z[i * per_latent..(i + 1) * per_latent]);
            let sources = row
                .window
                .as_ref()
                .map(|w| w.indices.as_slice())
                .unwrap_or(&[]);
            for (t, (p, s, change)) in frame_scores.into_iter().enumerate() {
                let at = (i * frames + t) * plane;
                let r = &recon[at..at + plane];
                model.scores.push(ImageScore {
                    key: row.key.clone(),
                    psnr: p,
                    ssim: s,
                    lpips: lpips.as_ref().map(|l| l[i * frames + t]),
                    latent_mean: moments.mean(),
                    latent_std: moments.std(),
                    frame: Some(FrameScore {
                        index: t,
                        source_index: sources.get(t).map_or(t, |&s| s as usize),
                        change,
                    }),
                });
                model.gallery.offer(
                    &format!("{} frame {t}", row.key),
                    p,
                    s,
                    &originals[t],
                    r,
                    width,
                    height,
                );
            }
        }
        Ok(())
    }
}

/// PSNR, SSIM and the change from the previous frame, for each frame of one window
/// (`reconstruction`: the window's frames one after another, planar, in [0, 1]).
fn score_window(
    originals: &Originals,
    reconstruction: &[f32],
    width: usize,
    height: usize,
) -> Vec<(f64, f64, Option<Change>)> {
    let plane = 3 * width * height;
    let frame = |t: usize| &reconstruction[t * plane..(t + 1) * plane];
    (0..originals.len())
        .map(|t| {
            let (x, r) = (originals[t].as_slice(), frame(t));
            let change = (t > 0).then(|| Change::between(&originals[t - 1], x, frame(t - 1), r));
            (psnr(x, r), ssim(x, r, width, height), change)
        })
        .collect()
}

/// Loads one clip and makes a row per window: the `precompute` clip stages, one clip.
fn load_clip(
    source: &dyn Source,
    rows: &RowMaker,
    sample: SampleRef,
) -> Result<Vec<(RowPixels, RowMeta)>, Failure> {
    let loaded = source.load(sample)?;
    let text = rows.text(&loaded);
    let (info, windows) = rows.clip_windows(&loaded)?;
    rows.prepare_clip(&loaded, &text, &info, windows)
}
