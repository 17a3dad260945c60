//! What the report leaves in `--out`: `metrics.parquet` (one row per image and model; on clips
//! one row per frame of every window and model), `summary.json` (per-model means, latent
//! statistics, recommended normalization and the card's; on clips the temporal flicker, overall
//! and per window), and `errors.jsonl` (inputs that could not be scored). The HTML page is
//! `html.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::metrics::{mean_std, Change, LatentStats};
use super::{ImageScore, Skipped};
use crate::frames::FrameOptions;
use crate::model::ModelCard;
use crate::store::write_atomic;

pub const METRICS: &str = "metrics.parquet";
pub const SUMMARY: &str = "summary.json";
pub const HTML: &str = "report.html";
pub const ERRORS: &str = "errors.jsonl";

/// How far the card's normalization may leave the stored latents from unit std and zero mean
/// before the verdict says it does not fit (10%, in units of the normalized latent's std).
pub const FIT_TOLERANCE: f64 = 0.10;

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub version: &'static str,
    /// `images` or `clips` (encoded here), or `shards` (stored latents decoded).
    pub source: &'static str,
    /// Clips: the frame options that cut them into windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video: Option<FrameOptions>,
    pub input: String,
    pub shards: Option<String>,
    pub size: u32,
    pub resize: String,
    /// Inputs (images or clips) looked at, and how many of them could not be read (for every
    /// model).
    pub inputs: usize,
    pub failed: usize,
    pub lpips: Option<String>,
    pub models: BTreeMap<String, ModelSummary>,
    /// `--model` order, for the page's columns.
    #[serde(skip)]
    pub order: Vec<String>,
}

/// One model's numbers. Non-finite values (no images; PSNR = ∞ for an exact reconstruction)
/// are written as `null`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub card: String,
    pub decoder: String,
    /// Images scored (on clips: frames), and images (clip windows) this model could not score
    /// (non-finite latents or output).
    pub images: usize,
    pub failed: usize,
    /// Clips: windows scored and their temporal flicker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clips: Option<ClipSummary>,
    pub psnr_mean: f64,
    pub psnr_std: f64,
    pub ssim_mean: f64,
    pub ssim_std: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lpips_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lpips_std: Option<f64>,
    /// Raw latents `z`: global mean and population std, then per channel.
    pub latent_mean: f64,
    pub latent_std: f64,
    pub latent_channel_mean: Vec<f64>,
    pub latent_channel_std: Vec<f64>,
    /// `1 / latent_std` and `latent_mean`: the normalization that gives these latents unit std
    /// and zero mean. For a card normalized per channel, the card's own values: its advice is
    /// `recommended_latents_mean` / `recommended_latents_std`.
    pub recommended_scaling_factor: f64,
    pub recommended_shift_factor: f64,
    pub card_scaling_factor: f64,
    pub card_shift_factor: f64,
    /// Per-channel cards (Qwen-Image, Wan): the card's `latents_mean`/`latents_std`, and the
    /// values that give every channel of these latents zero mean and unit std under the card's
    /// scale and shift.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_latents_mean: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_latents_std: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommended_latents_mean: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommended_latents_std: Option<Vec<f64>>,
    /// Std and mean of the latents as the card stores them: `((z − latents_mean[c]) /
    /// latents_std[c] − shift) · scale`, the per-channel step only for per-channel cards.
    pub stored_latent_std: f64,
    pub stored_latent_mean: f64,
    pub scaling_factor_fits: bool,
    pub shift_factor_fits: bool,
    pub verdict: String,
}

impl ModelSummary {
    pub fn new(
        card: &ModelCard,
        scores: &[ImageScore],
        stats: &LatentStats,
        failed: usize,
    ) -> Self {
        let column = |f: fn(&ImageScore) -> f64| scores.iter().map(f).collect::<Vec<_>>();
        let (psnr_mean, psnr_std) = mean_std(&column(|s| s.psnr));
        let (ssim_mean, ssim_std) = mean_std(&column(|s| s.ssim));
        let lpips: Option<Vec<f64>> = scores.iter().map(|s| s.lpips).collect();
        let lpips = lpips.filter(|l| !l.is_empty()).map(|l| mean_std(&l));
        let global = stats.global();
        let (mean, std) = (global.mean(), global.std());
        let (scale, shift) = (decimal(card.scaling_factor), decimal(card.shift_factor));
        let card_channels: Option<(Vec<f64>, Vec<f64>)> = card.per_channel().map(|p| {
            (
                p.mean.iter().map(|&v| decimal(v)).collect(),
                p.std.iter().map(|&v| decimal(v)).collect(),
            )
        });
        // stored = a·z + b per channel.
        let stored = stats.mapped(|c| match &card_channels {
            Some((m, s)) => (scale / s[c], -(m[c] / s[c] + shift) * scale),
            None => (scale, -shift * scale),
        });
        let (stored_std, stored_mean) = (stored.std(), stored.mean());
        let scaling_fits = (stored_std - 1.0).abs() <= FIT_TOLERANCE;
        let shift_fits = stored_mean.abs() <= FIT_TOLERANCE;
        // Per channel: std_c / s_c · |scale| = 1 and (mean_c − m_c) / s_c = shift.
        let recommended_channels = card_channels.as_ref().map(|_| {
            let s: Vec<f64> = stats
                .channels()
                .iter()
                .map(|m| m.std() * scale.abs())
                .collect();
            let m: Vec<f64> = stats
                .channels()
                .iter()
                .zip(&s)
                .map(|(moments, s)| moments.mean() - shift * s)
                .collect();
            (m, s)
        });
        let normalization = Normalization {
            scale,
            shift,
            per_channel: recommended_channels.is_some(),
            mean,
            std,
            stored_std,
            stored_mean,
        };
        ModelSummary {
            card: card.card_path.display().to_string(),
            decoder: card
                .decoder
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            images: scores.len(),
            failed,
            clips: ClipSummary::of(scores),
            psnr_mean,
            psnr_std,
            ssim_mean,
            ssim_std,
            lpips_mean: lpips.map(|l| l.0),
            lpips_std: lpips.map(|l| l.1),
            latent_mean: mean,
            latent_std: std,
            latent_channel_mean: stats.channels().iter().map(|m| m.mean()).collect(),
            latent_channel_std: stats.channels().iter().map(|m| m.std()).collect(),
            recommended_scaling_factor: if card_channels.is_some() {
                scale
            } else {
                1.0 / std
            },
            recommended_shift_factor: if card_channels.is_some() { shift } else { mean },
            card_scaling_factor: scale,
            card_shift_factor: shift,
            card_latents_mean: card_channels.as_ref().map(|c| c.0.clone()),
            card_latents_std: card_channels.map(|c| c.1),
            recommended_latents_mean: recommended_channels.as_ref().map(|c| c.0.clone()),
            recommended_latents_std: recommended_channels.map(|c| c.1),
            stored_latent_std: stored_std,
            stored_latent_mean: stored_mean,
            scaling_factor_fits: scaling_fits,
            shift_factor_fits: shift_fits,
            verdict: verdict(&normalization),
        }
    }
}

/// Temporal flicker over a set of frame pairs (consecutive frames of a window): means over the
/// pairs, each pair weighing the same, of `Change`'s three values (all in [0, 1] units), and how
/// the reconstruction's compares with the source's. None where there is no pair (one-frame
/// windows) and, for the ratio, where the source does not change at all.
#[derive(Debug, Clone, Serialize)]
pub struct Flicker {
    /// Frame pairs averaged over: T − 1 per window of T frames.
    pub pairs: usize,
    /// Mean absolute frame-to-frame difference of the source frames.
    pub source: Option<f64>,
    /// The same of the reconstructed frames.
    pub reconstruction: Option<f64>,
    /// `reconstruction / source`: above 1 the reconstruction flickers more than the clip moves,
    /// below 1 it smooths motion away.
    pub ratio: Option<f64>,
    /// `reconstruction − source`.
    pub difference: Option<f64>,
    /// Mean absolute difference between the two frame-to-frame changes, per pixel.
    pub error: Option<f64>,
}

impl Flicker {
    pub fn of<'a>(changes: impl Iterator<Item = &'a Change>) -> Self {
        let (mut pairs, mut source, mut reconstruction, mut error) = (0, 0.0, 0.0, 0.0);
        for c in changes {
            pairs += 1;
            source += c.source;
            reconstruction += c.reconstruction;
            error += c.error;
        }
        let mean = |sum: f64| (pairs > 0).then(|| sum / pairs as f64);
        let (source, reconstruction) = (mean(source), mean(reconstruction));
        Flicker {
            pairs,
            source,
            reconstruction,
            ratio: source
                .zip(reconstruction)
                .filter(|(s, _)| *s > 0.0)
                .map(|(s, r)| r / s),
            difference: source.zip(reconstruction).map(|(s, r)| r - s),
            error: mean(error),
        }
    }
}

/// One clip window's numbers in `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct WindowSummary {
    pub key: String,
    pub frames: usize,
    pub psnr_mean: f64,
    pub psnr_min: f64,
    pub ssim_mean: f64,
    pub flicker: Flicker,
}

/// A clip report's windows: how many, the flicker over all their frame pairs, and every
/// window's own numbers (in input order).
#[derive(Debug, Clone, Serialize)]
pub struct ClipSummary {
    pub windows: usize,
    pub flicker: Flicker,
    pub per_window: Vec<WindowSummary>,
}

impl ClipSummary {
    /// None for images. A window's frames are consecutive scores of one key.
    fn of(scores: &[ImageScore]) -> Option<Self> {
        scores.first()?.frame.as_ref()?;
        let changes = |s: &[ImageScore]| -> Vec<Change> {
            s.iter()
                .filter_map(|s| s.frame.as_ref().and_then(|f| f.change))
                .collect()
        };
        let per_window: Vec<WindowSummary> = scores
            .chunk_by(|a, b| a.key == b.key)
            .map(|w| {
                let psnrs: Vec<f64> = w.iter().map(|s| s.psnr).collect();
                let ssims: Vec<f64> = w.iter().map(|s| s.ssim).collect();
                WindowSummary {
                    key: w[0].key.clone(),
                    frames: w.len(),
                    psnr_mean: mean_std(&psnrs).0,
                    psnr_min: psnrs.iter().copied().fold(f64::INFINITY, f64::min),
                    ssim_mean: mean_std(&ssims).0,
                    flicker: Flicker::of(changes(w).iter()),
                }
            })
            .collect();
        Some(ClipSummary {
            windows: per_window.len(),
            flicker: Flicker::of(changes(scores).iter()),
            per_window,
        })
    }
}

/// An f32 card value as the decimal the card wrote (0.18215, not 0.1821500062942505).
fn decimal(v: f32) -> f64 {
    v.to_string().parse().expect("an f32 prints as a number")
}

/// The card's normalization and what it makes of the measured latents.
struct Normalization {
    scale: f64,
    shift: f64,
    /// The card normalizes per channel (`latents_mean`/`latents_std`).
    per_channel: bool,
    /// Raw latents `z`.
    mean: f64,
    std: f64,
    /// The latents as stored.
    stored_std: f64,
    stored_mean: f64,
}

/// The plain-words judgement of the card's normalization on these latents, with advice in
/// the card's own terms: `scaling_factor`/`shift_factor`, or per-channel statistics.
fn verdict(n: &Normalization) -> String {
    let Normalization {
        scale,
        shift,
        per_channel,
        mean,
        std,
        stored_std,
        stored_mean,
    } = *n;
    if !std.is_finite() {
        return "No latents were measured, so the normalization cannot be judged.".into();
    }
    let std_off = (stored_std - 1.0).abs() > FIT_TOLERANCE;
    let mean_off = stored_mean.abs() > FIT_TOLERANCE;
    let mut parts = Vec::new();
    if per_channel {
        if std_off || mean_off {
            parts.push(format!(
                "the card's latents_mean/latents_std do not fit these images: the stored latents \
                 have std {stored_std:.3} and mean {stored_mean:.3} (a diffusion model expects 1 \
                 and 0); recommended_latents_mean and recommended_latents_std in summary.json \
                 (each channel's measured mean and std) would give every channel mean 0 and std 1"
            ));
        }
    } else {
        if std_off {
            let how = if stored_std > 1.0 {
                "larger"
            } else {
                "smaller"
            };
            parts.push(format!(
                "the card's scaling_factor {scale} does not fit these images: the stored latents \
                 have std {stored_std:.3}, {:.0}% {how} than the unit std a diffusion model \
                 expects; scaling_factor {:.4} would give std 1",
                (stored_std - 1.0).abs() * 100.0,
                1.0 / std
            ));
        }
        if mean_off {
            parts.push(format!(
                "the card's shift_factor {shift} leaves the stored latents with mean \
                 {stored_mean:.3} (more than {:.0}% of their std away from 0); shift_factor \
                 {mean:.4} would centre them",
                FIT_TOLERANCE * 100.0
            ));
        }
    }
    if parts.is_empty() {
        format!(
            "The card's normalization fits these images: the stored latents have std \
             {stored_std:.3} and mean {stored_mean:.3} (within {:.0}% of 1 and 0).",
            FIT_TOLERANCE * 100.0
        )
    } else {
        let mut text = parts.join("; and ");
        text[..1].make_ascii_uppercase();
        text + "."
    }
}

/// `metrics.parquet`: key, model, psnr, ssim, lpips (only with `--lpips`), latent_mean,
/// latent_std; models in `--model` order, images in input order. On clips one row per frame:
/// key is the window's, and after model come `frame` (position in the window) and
/// `source_frame` (the clip's frame index), after the scores `flicker_source`,
/// `flicker_reconstruction` and `flicker_error` (the frame's `Change` from the window's
/// previous frame; null on a window's first frame), so a window's flicker is the mean of its
/// rows' values.
pub fn write_metrics(
    path: &Path,
    models: &[(&str, &[ImageScore])],
    with_lpips: bool,
) -> Result<()> {
    let rows = || {
        models
            .iter()
            .flat_map(|(m, scores)| scores.iter().map(move |s| (*m, s)))
    };
    let floats = |f: fn(&ImageScore) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows().map(|(_, s)| f(s))))
    };
    let clips = rows().any(|(_, s)| s.frame.is_some());
    let mut fields = vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows().map(|(_, s)| s.key.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(rows().map(|(m, _)| m))),
    ];
    fn frame(s: &ImageScore) -> &super::FrameScore {
        s.frame
            .as_ref()
            .expect("every row of a clip report is a frame")
    }
    if clips {
        let ints = |f: fn(&super::FrameScore) -> usize| -> ArrayRef {
            Arc::new(Int32Array::from_iter_values(
                rows().map(|(_, s)| f(frame(s)) as i32),
            ))
        };
        fields.push(Field::new("frame", DataType::Int32, false));
        fields.push(Field::new("source_frame", DataType::Int32, false));
        columns.push(ints(|f| f.index));
        columns.push(ints(|f| f.source_index));
    }
    fields.push(Field::new("psnr", DataType::Float64, false));
    fields.push(Field::new("ssim", DataType::Float64, false));
    columns.push(floats(|s| s.psnr));
    columns.push(floats(|s| s.ssim));
    if with_lpips {
        fields.push(Field::new("lpips", DataType::Float64, false));
        columns.push(floats(|s| s.lpips.unwrap_or(f64::NAN)));
    }
    if clips {
        type Value = fn(&Change) -> f64;
        let changes: [(&str, Value); 3] = [
            ("flicker_source", |c| c.source),
            ("flicker_reconstruction", |c| c.reconstruction),
            ("flicker_error", |c| c.error),
        ];
        for (name, f) in changes {
            fields.push(Field::new(name, DataType::Float64, true));
            columns.push(Arc::new(Float64Array::from_iter(
                rows().map(|(_, s)| frame(s).change.as_ref().map(f)),
            )));
        }
    }
    fields.push(Field::new("latent_mean", DataType::Float64, false));
    fields.push(Field::new("latent_std", DataType::Float64, false));
    columns.push(floats(|s| s.latent_mean));
    columns.push(floats(|s| s.latent_std));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

pub fn write_summary(path: &Path, summary: &Summary) -> Result<()> {
    let mut text = serde_json::to_string_pretty(summary)?;
    text.push('\n');
    write_atomic(path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

pub fn write_errors(path: &Path, skipped: &[Skipped]) -> Result<()> {
    let mut text = String::new();
    for s in skipped {
        text += &serde_json::to_string(s)?;
        text.push('\n');
    }
    write_atomic(path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{verdict, Change, ClipSummary, Normalization};
    use crate::report::{FrameScore, ImageScore};

    fn frame(key: &str, index: usize, psnr: f64, change: Option<(f64, f64, f64)>) -> ImageScore {
        ImageScore {
            key: key.into(),
            psnr,
            ssim: 0.5,
            lpips: None,
            latent_mean: 0.0,
            latent_std: 1.0,
            frame: Some(FrameScore {
                index,
                source_index: index,
                change: change.map(|(source, reconstruction, error)| Change {
                    source,
                    reconstruction,
                    error,
                }),
            }),
        }
    }

    #[test]
    fn flicker_is_the_mean_over_frame_pairs_per_window_and_overall() {
        let scores = [
            frame("a/00000-003", 0, 20.0, None),
            frame("a/00000-003", 1, 22.0, Some((0.1, 0.2, 0.15))),
            frame("a/00000-003", 2, 24.0, Some((0.3, 0.3, 0.05))),
            frame("b/00000-002", 0, 30.0, None),
            frame("b/00000-002", 1, 30.0, Some((0.0, 0.1, 0.1))),
            frame("c/00000-001", 0, 40.0, None),
        ];
        let clips = ClipSummary::of(&scores).expect("frames make a clip summary");
        assert_eq!(clips.windows, 3);
        let a = &clips.per_window[0];
        assert_eq!(
            (a.key.as_str(), a.frames, a.psnr_min, a.psnr_mean),
            ("a/00000-003", 3, 20.0, 22.0)
        );
        assert_eq!(a.flicker.pairs, 2);
        assert!((a.flicker.source.unwrap() - 0.2).abs() < 1e-12);
        assert!((a.flicker.reconstruction.unwrap() - 0.25).abs() < 1e-12);
        assert!((a.flicker.ratio.unwrap() - 1.25).abs() < 1e-12);
        assert!((a.flicker.difference.unwrap() - 0.05).abs() < 1e-12);
        assert!((a.flicker.error.unwrap() - 0.1).abs() < 1e-12);
        // A still source has no ratio; a one-frame window has no pair at all.
        let b = &clips.per_window[1].flicker;
        assert_eq!((b.source, b.ratio), (Some(0.0), None));
        let c = &clips.per_window[2].flicker;
        assert_eq!(
            (c.pairs, c.source, c.reconstruction, c.error),
            (0, None, None, None)
        );
        // Overall: every pair weighs the same (3 pairs), not every window.
        let all = &clips.flicker;
        assert_eq!(all.pairs, 3);
        assert!((all.source.unwrap() - 0.4 / 3.0).abs() < 1e-12);
        assert!((all.ratio.unwrap() - 0.6 / 0.4).abs() < 1e-12);
        let images = [ImageScore {
            frame: None,
            ..scores[0].clone()
        }];
        assert!(ClipSummary::of(&images).is_none());
    }

    fn judge(per_channel: bool, mean: f64, std: f64, stored_std: f64, stored_mean: f64) -> String {
        verdict(&Normalization {
            scale: 1.0,
            shift: 0.0,
            per_channel,
            mean,
            std,
            stored_std,
            stored_mean,
        })
    }

    #[test]
    fn verdict_names_what_does_not_fit() {
        let fits = judge(false, 0.02, 1.03, 1.03, 0.02);
        assert!(fits.starts_with("The card's normalization fits"), "{fits}");
        let scale = judge(false, 0.0, 0.5, 0.5, 0.0);
        assert!(
            scale.contains("scaling_factor 1 does not fit") && scale.contains("2.0000"),
            "{scale}"
        );
        assert!(!scale.contains("shift_factor"), "{scale}");
        let shift = judge(false, 0.3, 1.0, 1.0, 0.3);
        assert!(
            shift.starts_with("The card's shift_factor 0") && shift.contains("0.3000"),
            "{shift}"
        );
        // Per-channel cards are advised in their own terms, never with a scaling_factor.
        let channels = judge(true, 0.1, 0.288, 0.392, 0.05);
        assert!(
            channels.contains("latents_mean/latents_std do not fit")
                && channels.contains("std 0.392")
                && !channels.contains("scaling_factor"),
            "{channels}"
        );
    }
}
