//! `report`: how well a VAE reconstructs *these* images or clips. Takes `ReportArgs`, reuses
//! the precompute stages (discover, decode+resize, batch, encode) or reads stored latents from
//! shards, decodes with each card's decoder (the temporal one for clips, `clips.rs`), and hands
//! on a `Summary` after writing `metrics.parquet`, `summary.json`, `errors.jsonl` and a
//! self-contained `report.html`.
//!
//! Images flow in chunks: decoded and resized in parallel, then per model batched, encoded,
//! decoded and scored (metrics in parallel). Only the scores, the running latent statistics and
//! the 12 pictures per model are kept, so memory does not grow with the dataset.

mod args;
mod charts;
mod clips;
mod gallery;
mod html;
mod lpips;
pub mod metrics;
mod output;

pub mod reconstruct;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

pub use args::ReportArgs;
pub use clips::FrameScore;
pub use output::{ModelSummary, Summary};

use self::args::{Origin, Plan};
use self::gallery::Gallery;
use self::lpips::Lpips;
use self::metrics::{psnr, ssim, LatentStats};
use self::reconstruct::{Decoder, Stored};
use crate::batch::{Batch, Batcher, RowMeta, RowPixels};
use crate::config::LatentMode;
use crate::encode::Encoder;
use crate::failure::{Failure, FailureKind};
use crate::model::ModelCard;
use crate::progress::Progress;
use crate::resize::Prepared;
use crate::rows::RowMaker;
use crate::shards::{ShardSet, StoredRow};
use crate::source::{SampleRef, Source};
use crate::temporal::ClipDecoder;

/// One image's (or one clip frame's) scores for one model: a row of `metrics.parquet`.
#[derive(Debug, Clone)]
pub struct ImageScore {
    pub key: String,
    pub psnr: f64,
    pub ssim: f64,
    pub lpips: Option<f64>,
    /// Mean and population std of the image's raw latent, all channels together (a clip
    /// frame: its window's latent).
    pub latent_mean: f64,
    pub latent_std: f64,
    /// A clip frame: which, and how it changed from the window's previous frame.
    pub frame: Option<FrameScore>,
}

/// An input the report could not score: a line of `errors.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub key: String,
    /// The model that failed on it; `None` when the image itself could not be used.
    pub model: Option<String>,
    pub kind: FailureKind,
    pub message: String,
}

impl Skipped {
    fn from_failure(f: Failure, model: Option<&str>) -> Self {
        Skipped {
            key: f.key,
            model: model.map(str::to_string),
            kind: f.kind,
            message: f.message,
        }
    }
}

/// What turns raw latents back into pixels: the image decoder, or the temporal one for clips.
enum Reconstructor {
    Images(Decoder),
    Clips(ClipDecoder),
}

/// One model's sessions, normalization and running results.
struct Model {
    card: ModelCard,
    /// Only when encoding images or clips; `--shards` decodes what is stored.
    encoder: Option<Encoder>,
    decoder: Reconstructor,
    /// The normalization to undo: the card's, or what the shards record.
    stored: Stored,
    scores: Vec<ImageScore>,
    stats: LatentStats,
    gallery: Gallery,
    failed: usize,
}

/// Runs the report; everything checkable is checked before the first image is read.
pub fn run(args: &ReportArgs) -> Result<Summary> {
    let plan = args.plan()?;
    let threads = plan.threads;
    let mut models = Vec::with_capacity(plan.cards.len());
    let clips = plan.rows.video.is_some();
    for card in &plan.cards {
        let encoder = match plan.origin {
            Origin::Images if clips => Some(Encoder::open_clips(
                card,
                None,
                threads,
                LatentMode::Mean,
                0,
            )?),
            Origin::Images => Some(Encoder::open(card, threads, LatentMode::Mean, 0)?),
            Origin::Shards(_) => None,
        };
        let decoder = if clips {
            Reconstructor::Clips(ClipDecoder::open(card, threads, None)?)
        } else {
            Reconstructor::Images(Decoder::open(card, threads)?)
        };
        let stored = match &plan.origin {
            Origin::Images => Stored {
                scaling_factor: card.scaling_factor,
                shift_factor: card.shift_factor,
                per_channel: card
                    .per_channel()
                    .map(|p| (p.mean.to_vec(), p.std.to_vec())),
            },
            Origin::Shards(set) => {
                let model = &set.info.identity.model;
                Stored {
                    scaling_factor: set.info.metadata.scaling_factor,
                    shift_factor: set.info.metadata.shift_factor,
                    per_channel: model.latents_mean.clone().zip(model.latents_std.clone()),
                }
            }
        };
        models.push(Model {
            decoder,
            encoder,
            stored,
            scores: Vec::new(),
            stats: LatentStats::new(card.latent_channels),
            gallery: Gallery::default(),
            failed: 0,
            card: card.clone(),
        });
    }
    let size = plan.rows.framing.size as usize;
    let lpips = match &args.lpips {
        Some(path) => Some(Lpips::open(path, threads, size)?),
        None => None,
    };
    let inputs = match &plan.origin {
        Origin::Images => plan.source.metadata_pass().take(plan.limit).count(),
        Origin::Shards(set) => set.rows.min(plan.limit),
    };
    if inputs == 0 {
        match &plan.origin {
            Origin::Images if clips => bail!("--input {} holds no clips", plan.input.display()),
            Origin::Images => bail!("--input {} holds no images", plan.input.display()),
            Origin::Shards(set) => bail!("--shards {} holds no rows", set.store.describe()),
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("report-{i}"))
        .build()
        .context("cannot start the report's thread pool")?;

    let mut scorer = Scorer {
        models,
        lpips,
        pool,
        progress: Progress::new(
            (inputs * plan.cards.len()) as u64,
            if clips { "clip×model" } else { "image×model" },
        ),
        skipped: Vec::new(),
        batch_size: args.batch_size,
    };
    let chunk = (args.batch_size * threads).max(32);
    match &plan.origin {
        // A clip holds many frames: a chunk is one clip per thread, as in `precompute`.
        Origin::Images if clips => scorer.score_clips(&plan, threads)?,
        Origin::Images => scorer.score_images(&plan, chunk)?,
        Origin::Shards(set) => scorer.score_shards(&plan, set, chunk)?,
    }
    scorer.progress.finish();
    let summary = finish(args, &plan, scorer, inputs)?;
    // A report with no numbers must not pass for a good one (in CI, in a make rule).
    if let Some(name) = summary
        .order
        .iter()
        .find(|n| summary.models[*n].images == 0)
    {
        bail!(
            "model {name} could not score any of the {inputs} inputs: see {}",
            args.out.join(output::ERRORS).display()
        );
    }
    Ok(summary)
}

/// Writes the four outputs and returns the summary.
fn finish(args: &ReportArgs, plan: &Plan, scorer: Scorer, inputs: usize) -> Result<Summary> {
    let Scorer {
        models, skipped, ..
    } = scorer;
    let mut summary = Summary {
        version: env!("CARGO_PKG_VERSION"),
        source: match plan.origin {
            Origin::Images if plan.rows.video.is_some() => "clips",
            Origin::Images => "images",
            Origin::Shards(_) => "shards",
        },
        video: plan.rows.video.clone(),
        input: plan.input.display().to_string(),
        shards: args.shards.as_ref().map(|s| s.display().to_string()),
        size: plan.rows.framing.size,
        resize: plan.rows.framing.policy.as_str().to_string(),
        inputs,
        failed: skipped.iter().filter(|s| s.model.is_none()).count(),
        lpips: args.lpips.as_ref().map(|p| p.display().to_string()),
        models: BTreeMap::new(),
        order: models.iter().map(|m| m.card.name.clone()).collect(),
    };
    for m in &models {
        let model = ModelSummary::new(&m.card, &m.scores, &m.stats, m.failed);
        summary.models.insert(m.card.name.clone(), model);
    }
    let out = &args.out;
    let rows: Vec<(&str, &[ImageScore])> = models
        .iter()
        .map(|m| (m.card.name.as_str(), m.scores.as_slice()))
        .collect();
    output::write_metrics(&out.join(output::METRICS), &rows, args.lpips.is_some())?;
    output::write_summary(&out.join(output::SUMMARY), &summary)?;
    output::write_errors(&out.join(output::ERRORS), &skipped)?;

    let psnrs: Vec<(&str, Vec<f64>)> = models
        .iter()
        .map(|m| {
            (
                m.card.name.as_str(),
                m.scores.iter().map(|s| s.psnr).collect(),
            )
        })
        .collect();
    let unit = if plan.rows.video.is_some() {
        "frames"
    } else {
        "images"
    };
    let psnr_chart = charts::psnr_histogram(&psnrs, unit)?;
    let mut pages = Vec::with_capacity(models.len());
    for (i, m) in models.into_iter().enumerate() {
        let (name, s) = summary
            .models
            .get_key_value(&m.card.name)
            .expect("summarized above");
        let latent_chart = charts::latent_channels(
            i,
            &s.latent_channel_mean,
            &s.latent_channel_std,
            s.latent_mean,
            s.card_shift_factor,
        )?;
        let (worst, best) = m.gallery.finish();
        pages.push(html::ModelPage {
            name,
            summary: s,
            latent_chart,
            worst,
            best,
        });
    }
    let page = html::render(&summary, &psnr_chart, &pages)?;
    crate::store::write_atomic(&out.join(output::HTML), page.as_bytes())
        .with_context(|| format!("cannot write {}", out.join(output::HTML).display()))?;
    Ok(summary)
}

impl Summary {
    /// The run's outcome on stderr: one line per model and where the report is.
    pub fn print(&self, out: &Path) {
        for name in &self.order {
            let m = &self.models[name];
            let lpips = m
                .lpips_mean
                .map(|l| format!(", LPIPS {l:.4}"))
                .unwrap_or_default();
            // Per-channel cards (Qwen-Image, Wan) are judged by what they store: the advice is
            // their own latents_mean/latents_std, never a scaling_factor on top.
            let normalization = if m.recommended_latents_mean.is_some() {
                format!(
                    "stored latents std {:.4}, mean {:.4} (per-channel card: recommended \
                     latents_mean/latents_std in summary.json)",
                    m.stored_latent_std, m.stored_latent_mean
                )
            } else {
                format!(
                    "latent std {:.4}, mean {:.4} → recommended scaling_factor {:.4} (card {}), \
                     shift_factor {:.4} (card {})",
                    m.latent_std,
                    m.latent_mean,
                    m.recommended_scaling_factor,
                    m.card_scaling_factor,
                    m.recommended_shift_factor,
                    m.card_shift_factor
                )
            };
            let (scored, flicker) = match &m.clips {
                Some(c) => (
                    format!(
                        "{} windows, {} frames ({} windows failed)",
                        c.windows, m.images, m.failed
                    ),
                    format!(
                        "; flicker: source {:.5}, reconstruction {:.5} (ratio {:.3})",
                        c.flicker.source.unwrap_or(f64::NAN),
                        c.flicker.reconstruction.unwrap_or(f64::NAN),
                        c.flicker.ratio.unwrap_or(f64::NAN)
                    ),
                ),
                None => (
                    format!("{} images ({} failed)", m.images, m.failed),
                    String::new(),
                ),
            };
            eprintln!(
                "{name}: {scored}: PSNR {:.2} ± {:.2} dB, SSIM {:.4} ± {:.4}{lpips}{flicker}; \
                 {normalization}",
                m.psnr_mean, m.psnr_std, m.ssim_mean, m.ssim_std,
            );
            eprintln!("  {}", m.verdict);
        }
        if self.failed > 0 {
            eprintln!(
                "{} of {} inputs could not be read (see {})",
                self.failed,
                self.inputs,
                out.join(output::ERRORS).display()
            );
        }
        eprintln!("report: {}", out.join(output::HTML).display());
    }
}

/// The run's state while images stream through.
struct Scorer {
    models: Vec<Model>,
    lpips: Option<Lpips>,
    pool: rayon::ThreadPool,
    progress: Progress,
    skipped: Vec<Skipped>,
    batch_size: usize,
}

/// The crop window as planar `3 × h × w` in [0, 1] (`v / 255` in f32, as the encoder sees it
/// for a [0, 1] card).
fn planar01(image: &Prepared) -> Vec<f32> {
    let mut out = vec![0.0; 3 * image.crop_width as usize * image.crop_height as usize];
    image.write_chw(&mut out, [0.0, 1.0], false);
    out
}

impl Scorer {
    /// Discover → decode+resize (parallel) → per model: batch → encode → decode → score.
    fn score_images(&mut self, plan: &Plan, chunk: usize) -> Result<()> {
        let source = plan.source.as_ref();
        let mut sources = source.list().take(plan.limit).peekable();
        while sources.peek().is_some() {
            let items: Vec<Result<SampleRef, Failure>> = sources.by_ref().take(chunk).collect();
            let prepared: Vec<Result<(Prepared, RowMeta), Failure>> = self.pool.install(|| {
                items
                    .into_par_iter()
                    .map(|item| item.and_then(|s| load_row(source, &plan.rows, s)))
                    .collect()
            });
            let mut images = Vec::with_capacity(prepared.len());
            for item in prepared {
                match item {
                    Ok(image) => images.push(image),
                    Err(failure) => self.skip_image(failure),
                }
            }
            let originals: Vec<Vec<f32>> = self
                .pool
                .install(|| images.par_iter().map(|(p, _)| planar01(p)).collect());
            let index: HashMap<&str, usize> = images
                .iter()
                .enumerate()
                .map(|(i, (_, meta))| (meta.key.as_str(), i))
                .collect();
            for m in 0..self.models.len() {
                let input_f16 = self.models[m]
                    .encoder
                    .as_ref()
                    .is_some_and(|e| e.input_f16());
                let mut batcher = Batcher::new(self.batch_size, self.models[m].card.input_range)
                    .with_f16(input_f16);
                for (image, meta) in &images {
                    if let Some(batch) = batcher.push(RowPixels::Image(image.clone()), meta.clone())
                    {
                        self.encode_and_score(m, batch, &originals, &index)?;
                    }
                }
                for batch in batcher.flush() {
                    self.encode_and_score(m, batch, &originals, &index)?;
                }
            }
        }
        Ok(())
    }

    fn encode_and_score(
        &mut self,
        m: usize,
        batch: Batch,
        originals: &[Vec<f32>],
        index: &HashMap<&str, usize>,
    ) -> Result<()> {
        let (width, height) = (batch.width as usize, batch.height as usize);
        let model = &mut self.models[m];
        let encoded = model
            .encoder
            .as_mut()
            .expect("images mode opens encoders")
            .encode(batch)?;
        for failure in encoded.failures {
            model.failed += 1;
            let name = model.card.name.clone();
            self.skipped
                .push(Skipped::from_failure(failure, Some(&name)));
            self.progress.advance(1, &name);
        }
        let keys: Vec<String> = encoded.rows.into_iter().map(|r| r.key).collect();
        let refs: Vec<&[f32]> = keys
            .iter()
            .map(|k| originals[index[k.as_str()]].as_slice())
            .collect();
        self.score(
            m,
            &keys,
            &encoded.latents,
            &encoded.latent_shape,
            &refs,
            width,
            height,
        )
    }

    /// Shard rows → re-read and check their sources (parallel) → decode → score.
    fn score_shards(&mut self, plan: &Plan, set: &ShardSet, chunk: usize) -> Result<()> {
        let source = plan.source.as_ref();
        set.for_each_chunk(chunk, plan.limit, true, |rows| {
            // A key that breaks FORMAT.md's rule names no file: the set itself is broken.
            if let Some((row, why)) = rows
                .iter()
                .find_map(|r| crate::source::key_problem(&r.key).map(|why| (r, why)))
            {
                bail!(
                    "{:?}: not a valid key ({why}); this shard set breaks FORMAT.md's key rule \
                     (`vae-pipeline verify` lists every such key)",
                    row.key
                );
            }
            let checked: Vec<Result<(StoredRow, Vec<f32>), Skipped>> = self.pool.install(|| {
                rows.into_par_iter()
                    .map(|row| reread(row, source, &plan.rows))
                    .collect()
            });
            let mut ready = Vec::with_capacity(checked.len());
            for item in checked {
                match item {
                    Ok(pair) => ready.push(pair),
                    Err(skipped) => {
                        self.progress.advance(1, &self.models[0].card.name);
                        self.skipped.push(skipped);
                    }
                }
            }
            let window = |r: &StoredRow| (r.shape.clone(), r.width, r.height);
            for group in ready.chunk_by(|a, b| window(&a.0) == window(&b.0)) {
                for batch in group.chunks(self.batch_size) {
                    let keys: Vec<String> = batch.iter().map(|(r, _)| r.key.clone()).collect();
                    let stored: Vec<f32> = batch
                        .iter()
                        .flat_map(|(r, _)| r.latent.iter().copied())
                        .collect();
                    let refs: Vec<&[f32]> = batch.iter().map(|(_, o)| o.as_slice()).collect();
                    let (shape, width, height) = window(&batch[0].0);
                    let (width, height) = (width as usize, height as usize);
                    self.score(0, &keys, &stored, &shape, &refs, width, height)?;
                }
            }
            Ok(())
        })
    }

    /// Decodes one batch of stored latents and scores every image against its original.
    #[allow(clippy::too_many_arguments)]
    fn score(
        &mut self,
        m: usize,
        keys: &[String],
        stored: &[f32],
        latent_shape: &[usize],
        originals: &[&[f32]],
        width: usize,
        height: usize,
    ) -> Result<()> {
        let n = keys.len();
        if n == 0 {
            return Ok(());
        }
        let Ok(latent_shape) = <[usize; 3]>::try_from(latent_shape) else {
            bail!("report scores images; latents {latent_shape:?} are clip windows");
        };
        let model = &mut self.models[m];
        let z = model.stored.raw_latents(stored, &latent_shape);
        let Reconstructor::Images(decoder) = &mut model.decoder else {
            unreachable!("image reports open image decoders");
        };
        let recon = decoder.decode(&z, n, latent_shape)?;
        let plane = 3 * width * height;
        if recon.len() != n * plane {
            bail!(
                "model {}: latents {latent_shape:?} decode to {} values per image, but the \
                 images are {width}x{height}",
                model.card.name,
                recon.len() / n
            );
        }
        let lpips = match self.lpips.as_mut() {
            Some(l) => Some(l.score(&originals.concat(), &recon, n, height, width)?),
            None => None,
        };
        let scored: Vec<Option<(f64, f64)>> = self.pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let r = &recon[i * plane..(i + 1) * plane];
                    r.iter()
                        .all(|v| v.is_finite())
                        .then(|| (psnr(originals[i], r), ssim(originals[i], r, width, height)))
                })
                .collect()
        });
        let per_latent = latent_shape.iter().product::<usize>();
        for (i, score) in scored.into_iter().enumerate() {
            let Some((p, s)) = score else {
                model.failed += 1;
                self.skipped.push(Skipped {
                    key: keys[i].clone(),
                    model: Some(model.card.name.clone()),
                    kind: FailureKind::Nonfinite,
                    message: format!("decoder of {} produced NaN or Inf", model.card.name),
                });
                continue;
            };
            let moments = model.stats.add(&z[i * per_latent..(i + 1) * per_latent]);
            model.scores.push(ImageScore {
                key: keys[i].clone(),
                psnr: p,
                ssim: s,
                lpips: lpips.as_ref().map(|l| l[i]),
                latent_mean: moments.mean(),
                latent_std: moments.std(),
                frame: None,
            });
            let r = &recon[i * plane..(i + 1) * plane];
            model
                .gallery
                .offer(&keys[i], p, s, originals[i], r, width, height);
        }
        self.progress.advance(n as u64, &model.card.name);
        Ok(())
    }

    /// An input that could not be read counts as done for every model.
    fn skip_image(&mut self, failure: Failure) {
        let name = self.models[0].card.name.clone();
        self.progress.advance(self.models.len() as u64, &name);
        self.skipped.push(Skipped::from_failure(failure, None));
    }
}

/// Loads a sample and makes its row: the `precompute` stages, one image.
fn load_row(
    source: &dyn Source,
    rows: &RowMaker,
    sample: SampleRef,
) -> Result<(Prepared, RowMeta), Failure> {
    let loaded = source.load(sample)?;
    let text = rows.text(&loaded);
    rows.prepare(loaded, text)
}

/// Re-reads a stored row's source with the shards' own settings and checks it is the same
/// file (sha256) cropped the same way; hands on the row and the original in [0, 1].
fn reread(
    row: StoredRow,
    source: &dyn Source,
    rows: &RowMaker,
) -> Result<(StoredRow, Vec<f32>), Skipped> {
    let Some(sample) = source.locate(&row.key) else {
        return Err(Skipped {
            key: row.key.clone(),
            model: None,
            kind: FailureKind::Io,
            message: format!(
                "key {:?} names no image file under --input (a sample in a tar or Parquet \
                 file cannot be re-read by its key)",
                row.key
            ),
        });
    };
    let origin = sample.describe();
    let (image, meta) =
        load_row(source, rows, sample).map_err(|f| Skipped::from_failure(f, None))?;
    let stale = |message: String| Skipped {
        key: row.key.clone(),
        model: None,
        kind: FailureKind::Stale,
        message,
    };
    if meta.source_sha256 != row.source_sha256 {
        return Err(stale(format!(
            "{origin} changed since the shards were written (its sha256 differs from source_sha256)"
        )));
    }
    if (meta.crop_top, meta.crop_left) != (row.crop_top, row.crop_left) {
        return Err(stale(format!(
            "re-reading gives crop ({}, {}) but the shards recorded ({}, {})",
            meta.crop_top, meta.crop_left, row.crop_top, row.crop_left
        )));
    }
    Ok((row, planar01(&image)))
}
