//! Model cards: one VAE's contract (where its ONNX files are, what range it takes, what it
//! outputs, how its latents are normalized). Takes a card name or path, hands on a validated
//! `ModelCard` with absolute paths.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hex::hex;

/// What the encoder's single output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncoderOutput {
    /// Deterministic latents with `latent_channels` channels.
    Latent,
    /// mean ‖ logvar along channels (2 × `latent_channels`), as diffusers'
    /// `DiagonalGaussianDistribution` receives them.
    Moments,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub name: String,
    pub encoder: PathBuf,
    #[serde(default)]
    pub decoder: Option<PathBuf>,
    pub input_range: [f32; 2],
    pub output: EncoderOutput,
    pub latent_channels: usize,
    pub spatial_factor: u32,
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: f32,
    /// Names of the encoder's input and output; the single input/output when absent.
    #[serde(default)]
    pub input_name: Option<String>,
    #[serde(default)]
    pub output_name: Option<String>,
    /// FLUX.2's normalization, which replaces scale and shift: see `BatchNorm`.
    #[serde(default)]
    pub batch_norm: Option<BatchNorm>,
    /// Qwen-Image / Wan (and GLM-Image): per-channel statistics, `latent_channels` values each.
    /// The stored latent is `((z − latents_mean[c]) / latents_std[c] − shift_factor) ·
    /// scaling_factor`; their cards keep scale 1 and shift 0, as their pipelines do.
    #[serde(default)]
    pub latents_mean: Option<Vec<f32>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f32>>,
    /// Free text for users: where the weights come from, how to export them.
    #[serde(default)]
    pub source: Option<String>,
    /// Clip graphs (Wan family): present when the card encodes clips, see `TemporalCard`.
    #[serde(default)]
    pub temporal: Option<TemporalCard>,
    /// The card file this was read from.
    #[serde(skip)]
    pub card_path: PathBuf,
}

/// A card's `[temporal]` table: the clip graphs `export` writes for the Wan family (paths
/// resolved like `encoder`). diffusers' `AutoencoderKLWan` encodes the first frame alone, then
/// chunks of `frame_factor` frames, carrying each causal conv's last frames from chunk to chunk;
/// the `*_first` graphs run the first chunk and return the carried frames, the `*_chunk` graphs
/// take them and return the next (`crate::temporal` loops them). Checked when opened, not when
/// the card loads: image encoding does not need them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemporalCard {
    /// Frames per latent frame after the first: T frames give 1 + (T − 1)/frame_factor.
    pub frame_factor: usize,
    pub encoder_first: PathBuf,
    pub encoder_chunk: PathBuf,
    #[serde(default)]
    pub decoder_first: Option<PathBuf>,
    #[serde(default)]
    pub decoder_chunk: Option<PathBuf>,
}

/// FLUX.2 (`AutoencoderKLFlux2`) normalizes latents with its batch-norm running statistics
/// instead of a scale and shift: 2×2 patchify, then per channel (z − mean) / sqrt(var + eps).
/// Patchify puts pixel (2i+dy, 2j+dx) of latent channel c at channel 4c + 2dy + dx, pixel (i, j),
/// as diffusers' `Flux2Pipeline._patchify_latents`; stored latents are therefore
/// [4·latent_channels, h/2, w/2], and `running_mean`/`running_var` (4·latent_channels values
/// each, from the checkpoint's `bn.running_mean`/`bn.running_var`) are in that channel order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNorm {
    pub patch_size: usize,
    pub eps: f32,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

impl ModelCard {
    /// `spec` is a card name (`models/<spec>.toml` beside the repo or the binary) or a path.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = find_card(spec)?;
        Self::load(&path)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model card {}", path.display()))?;
        let mut card: ModelCard = toml::from_str(&text)
            .with_context(|| format!("invalid model card {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        card.encoder = onnx_path(dir, &card.encoder);
        card.decoder = card.decoder.map(|d| onnx_path(dir, &d));
        if let Some(t) = &mut card.temporal {
            t.encoder_first = onnx_path(dir, &t.encoder_first);
            t.encoder_chunk = onnx_path(dir, &t.encoder_chunk);
            t.decoder_first = t.decoder_first.as_deref().map(|d| onnx_path(dir, d));
            t.decoder_chunk = t.decoder_chunk.as_deref().map(|d| onnx_path(dir, d));
        }
        card.card_path = path.to_path_buf();
        card.check_values()?;
        Ok(card)
    }

    fn check_values(&self) -> Result<()> {
        let at = self.card_path.display();
        let [lo, hi] = self.input_range;
        if lo >= hi || !lo.is_finite() || !hi.is_finite() {
            bail!("model card {at}: field `input_range` must be [low, high] with low < high, got [{lo}, {hi}]");
        }
        if self.temporal.as_ref().is_some_and(|t| t.frame_factor == 0) {
            bail!("model card {at}: `[temporal]` frame_factor must be positive");
        }
        if self.latent_channels == 0 {
            bail!("model card {at}: field `latent_channels` must be positive");
        }
        if self.spatial_factor == 0 {
            bail!("model card {at}: field `spatial_factor` must be positive");
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            bail!("model card {at}: field `scaling_factor` must be a non-zero number");
        }
        if !self.shift_factor.is_finite() {
            bail!("model card {at}: field `shift_factor` must be a number");
        }
        if let Some(bn) = &self.batch_norm {
            let channels = self.latent_channels * bn.patch_size * bn.patch_size;
            if bn.patch_size == 0
                || bn.running_mean.len() != channels
                || bn.running_var.len() != channels
            {
                bail!(
                    "model card {at}: `[batch_norm]` needs patch_size > 0 and {channels} values in \
                     running_mean and running_var (latent_channels × patch_size²), got {} and {}",
                    bn.running_mean.len(),
                    bn.running_var.len()
                );
            }
            if !bn.running_var.iter().all(|&v| v + bn.eps > 0.0) {
                bail!("model card {at}: `[batch_norm]` running_var + eps must be positive");
            }
        }
        match (&self.latents_mean, &self.latents_std) {
            (None, None) => {}
            (Some(mean), Some(std)) => {
                if mean.len() != self.latent_channels || std.len() != self.latent_channels {
                    bail!(
                        "model card {at}: `latents_mean` and `latents_std` need latent_channels = {} \
                         values each, got {} and {}",
                        self.latent_channels,
                        mean.len(),
                        std.len()
                    );
                }
                if !mean.iter().all(|m| m.is_finite())
                    || !std.iter().all(|s| s.is_finite() && *s > 0.0)
                {
                    bail!(
                        "model card {at}: `latents_mean` must be numbers and `latents_std` positive numbers"
                    );
                }
                if self.batch_norm.is_some() {
                    bail!(
                        "model card {at}: `latents_mean`/`latents_std` and `[batch_norm]` are two \
                         normalizations; a card has one"
                    );
                }
            }
            _ => bail!(
                "model card {at}: `latents_mean` and `latents_std` go together; one is missing"
            ),
        }
        if !self.encoder.is_file() {
            bail!(
                "model card {at}: field `encoder` names {}, which does not exist.\n\
                 Run `make models` to copy the shared test models into models/onnx/, or make it from \
                 the VAE's checkpoint with `vae-pipeline export` (docs/models.md, \"Use your own VAE\")",
                self.encoder.display()
            );
        }
        Ok(())
    }

    /// Channels the encoder's output must have.
    pub fn output_channels(&self) -> usize {
        match self.output {
            EncoderOutput::Latent => self.latent_channels,
            EncoderOutput::Moments => 2 * self.latent_channels,
        }
    }

    /// A `--size` the encoder can take, or an error naming the card and field.
    pub fn check_size(&self, size: u32) -> Result<()> {
        if !size.is_multiple_of(self.spatial_factor) {
            bail!(
                "--size {size} is not a multiple of `spatial_factor` = {} in model card {}: use {} or {}",
                self.spatial_factor,
                self.card_path.display(),
                size / self.spatial_factor * self.spatial_factor,
                (size / self.spatial_factor + 1) * self.spatial_factor
            );
        }
        if let Some(bn) = &self.batch_norm {
            // Patchified latents need whole patches.
            let factor = self.spatial_factor * bn.patch_size as u32;
            if !size.is_multiple_of(factor) {
                bail!(
                    "--size {size} is not a multiple of {factor} (`spatial_factor` × `batch_norm.patch_size`) \
                     in model card {}: use {} or {}",
                    self.card_path.display(),
                    size / factor * factor,
                    (size / factor + 1) * factor
                );
            }
        }
        Ok(())
    }

    /// sha256 of the encoder file: recorded in shards so a changed model is detectable.
    pub fn encoder_sha256(&self) -> Result<String> {
        let bytes = std::fs::read(&self.encoder)
            .with_context(|| format!("cannot read encoder {}", self.encoder.display()))?;
        Ok(hex(&Sha256::digest(&bytes)))
    }

    /// What makes a clip run's latents: the two temporal encoder graphs (first chunk, then
    /// later chunks), hashed together.
    pub fn clip_encoder_sha256(&self) -> Result<String> {
        let t = self.temporal.as_ref().with_context(|| {
            format!(
                "model card {} has no [temporal] table",
                self.card_path.display()
            )
        })?;
        let mut h = Sha256::new();
        for path in [&t.encoder_first, &t.encoder_chunk] {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read clip encoder {}", path.display()))?;
            h.update(Sha256::digest(&bytes));
        }
        Ok(hex(&h.finalize()))
    }

    /// Human-readable normalization, as recorded in shard metadata.
    pub fn normalization(&self) -> String {
        match &self.batch_norm {
            Some(bn) => format!(
                "{p}x{p} patchify, then (z - bn_mean) / sqrt(bn_var + {}) per channel",
                bn.eps,
                p = bn.patch_size
            ),
            None => {
                let scale_shift = format!("(z - {}) * {}", self.shift_factor, self.scaling_factor);
                match self.per_channel() {
                    Some(stats) => format!(
                        "(z - latents_mean[c]) / latents_std[c] per channel (mean {:?}, std {:?}), then {scale_shift}",
                        stats.mean, stats.std
                    ),
                    None => scale_shift,
                }
            }
        }
    }

    /// The per-channel statistics, when the card has them.
    pub fn per_channel(&self) -> Option<PerChannel<'_>> {
        match (&self.latents_mean, &self.latents_std) {
            (Some(mean), Some(std)) => Some(PerChannel { mean, std }),
            _ => None,
        }
    }
}

/// A card's `latents_mean` / `latents_std`: stored = (z − mean[c]) / std[c] (before the card's
/// scale and shift), so a raw latent is stored · std[c] + mean[c].
#[derive(Debug, Clone, Copy)]
pub struct PerChannel<'a> {
    pub mean: &'a [f32],
    pub std: &'a [f32],
}

impl PerChannel<'_> {
    /// Normalizes a [C, h, w] latent in place; with `center` false (a std) it only scales.
    pub fn normalize(&self, values: &mut [f32], center: bool) {
        let plane = values.len() / self.mean.len();
        for (c, chunk) in values.chunks_exact_mut(plane).enumerate() {
            let (mean, inv) = (if center { self.mean[c] } else { 0.0 }, 1.0 / self.std[c]);
            chunk.iter_mut().for_each(|v| *v = (*v - mean) * inv);
        }
    }

    /// Undoes [`PerChannel::normalize`] on any number of [C, h, w] latents laid end to end.
    pub fn denormalize(&self, values: &mut [f32], plane: usize) {
        let c = self.mean.len();
        for (i, chunk) in values.chunks_exact_mut(plane).enumerate() {
            let (mean, std) = (self.mean[i % c], self.std[i % c]);
            chunk.iter_mut().for_each(|v| *v = *v * std + mean);
        }
    }
}

/// Folders searched for `--model NAME`, in order: each folder of `$VAE_PIPELINE_MODELS`
/// (`:`-separated), the user folder (`$XDG_CONFIG_HOME/vae-pipeline/models`, else
/// `~/.config/vae-pipeline/models`), `models/` in the working directory (a checkout), and the
/// cards installed with the package (`<prefix>/share/vae-pipeline/models`); each folder once.
pub fn card_dirs() -> Vec<PathBuf> {
    let mut dirs = model_path();
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(config) = config {
        dirs.push(config.join("vae-pipeline").join("models"));
    }
    dirs.push(PathBuf::from("models"));
    if let Some(prefix) = crate::runtime::installed_prefix() {
        dirs.push(prefix.join("share").join("vae-pipeline").join("models"));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())));
    dirs
}

/// The folders of `$VAE_PIPELINE_MODELS`.
fn model_path() -> Vec<PathBuf> {
    std::env::var_os("VAE_PIPELINE_MODELS")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// An ONNX path a card names: relative to the card's folder, else (for a shipped card whose
/// weights live elsewhere) relative to a folder of `$VAE_PIPELINE_MODELS`.
fn onnx_path(card_dir: &Path, named: &Path) -> PathBuf {
    let beside = card_dir.join(named);
    if beside.is_file() || named.is_absolute() {
        return beside;
    }
    model_path()
        .into_iter()
        .map(|d| d.join(named))
        .find(|p| p.is_file())
        .unwrap_or(beside)
}

/// Whether `--model` names a card file rather than a card name.
pub fn is_card_path(spec: &str) -> bool {
    spec.ends_with(".toml") || Path::new(spec).components().count() > 1
}

fn find_card(spec: &str) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if is_card_path(spec) {
        if as_path.is_file() {
            return Ok(as_path.to_path_buf());
        }
        bail!("model card {spec} does not exist");
    }
    let dirs = card_dirs();
    for dir in &dirs {
        let candidate = dir.join(format!("{spec}.toml"));
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let known: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "toml").then_some(())?;
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    bail!(
        "unknown model {spec:?}: no {spec}.toml in {}. Known cards: {}. \
         Pass a card name or a path to a card TOML",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}
