//! The one home of configuration: a typed struct with defaults, filled from a preset TOML
//! (`--pipeline`) and then from flags. The run records it in every shard so a run can be
//! reproduced from its output.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How an image becomes the encoder's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ResizePolicy {
    /// Scale to cover size×size (antialiased Lanczos3), crop the centre.
    CenterCrop,
    /// Scale to cover size×size, crop at an offset drawn from (seed, key).
    RandomCrop,
    /// Resize to exactly size×size, ignoring the aspect ratio.
    Stretch,
    /// Scale to fit inside size×size, letterbox with mid-grey; the padding is recorded as
    /// negative crop offsets.
    Pad,
    /// Aspect-ratio buckets: scale to cover the image's bucket, crop per `--crop`.
    Bucket,
}

impl ResizePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ResizePolicy::CenterCrop => "center-crop",
            ResizePolicy::RandomCrop => "random-crop",
            ResizePolicy::Stretch => "stretch",
            ResizePolicy::Pad => "pad",
            ResizePolicy::Bucket => "bucket",
        }
    }
}

/// Where the crop window sits in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CropPlacement {
    Center,
    /// An offset drawn from (seed, key): the same on every run.
    Random,
}

impl CropPlacement {
    pub fn as_str(self) -> &'static str {
        match self {
            CropPlacement::Center => "center",
            CropPlacement::Random => "random",
        }
    }
}

/// What is stored for encoders whose output is mean ‖ logvar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LatentMode {
    /// The distribution's mode (its mean).
    Mean,
    /// mean + std·ε, ε drawn from an RNG seeded by `seed` and the key.
    Sample,
    /// Scaled mean in `latent`, scaled std in `latent_std`: the trainer resamples.
    Dist,
}

impl LatentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LatentMode::Mean => "mean",
            LatentMode::Sample => "sample",
            LatentMode::Dist => "dist",
        }
    }
}

pub use crate::decode::AlphaPolicy;
pub use crate::format::StorageDType;

use crate::bucket::{KohyaBuckets, MusubiBuckets, TrainerBuckets};
use crate::frames::FrameOptions;

/// `buckets` values that name a list or rule rather than a file.
pub const NAMED_BUCKETS: [&str; 3] = ["sdxl", "kohya", "musubi"];

/// Everything a `precompute` run needs. What decides the latents becomes the run's identity
/// (`identity::RunIdentity`, hashed); the rest are run settings, recorded per run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecomputeConfig {
    /// A folder, a file, a glob or a brace range (see `source::open`).
    pub input: PathBuf,
    /// Parquet inputs: the image, key and caption columns (None = detect).
    pub image_column: Option<String>,
    pub key_column: Option<String>,
    pub caption_column: Option<String>,
    pub out: PathBuf,
    /// Card name in `models/` or a path to a card TOML.
    pub model: String,
    pub size: u32,
    pub resize: ResizePolicy,
    pub batch_size: usize,
    pub latent_mode: LatentMode,
    pub dtype: StorageDType,
    pub seed: u64,
    pub shard_rows: usize,
    /// 0 = all cores.
    pub threads: usize,
    pub alpha: AlphaPolicy,
    /// Shorter sides below this are refused as `too_small`; 0 upscales everything.
    pub min_size: u32,
    /// Images with more pixels are refused as `too_large`, from the header.
    pub max_pixels: u64,
    /// The run exits non-zero when more than this fraction of inputs failed.
    pub max_failures: f64,
    /// `sdxl`, a file of `WxH` lines, or a trainer's own rule (`kohya`, `musubi`: its list, choice
    /// and crop, at `bucket_res`); generated from `bucket_res` when absent.
    pub buckets: Option<String>,
    /// `buckets = "kohya"`: kohya's `--min_bucket_reso` [256] and `--max_bucket_reso` [1024].
    pub min_bucket_reso: Option<u32>,
    pub max_bucket_reso: Option<u32>,
    /// Area of generated buckets, as a side (0 = `size`).
    pub bucket_res: u32,
    pub bucket_step: u32,
    pub max_aspect: f64,
    /// Crop placement inside buckets.
    pub crop: CropPlacement,
    /// Keep small images in smaller buckets instead of upscaling them.
    pub no_upscale: bool,
    /// Also store the latent of the mirrored image (`latent_flip`).
    pub flip: bool,
    /// CSV or Parquet with `key, caption`, overriding sidecar captions.
    pub captions: Option<PathBuf>,
    /// Encode identical source bytes once; later copies are `duplicate` error lines.
    pub dedupe: bool,
    /// At most this many inputs, in key order (0 = all).
    pub limit: usize,
    /// JPEGs decode at a reduced DCT scale while keeping this many times the resize target
    /// (Pillow's `reducing_gap`); 0 always decodes at full size.
    pub reducing_gap: f32,
    /// Where the encoder runs: `cpu`, or `cuda`, `cuda:N`, `cuda:0,1,…` (one session per GPU).
    pub device: String,
    /// How the tensor columns are encoded and compressed (`format::LatentCompression`): a run
    /// setting, readers need nothing to tell the choices apart.
    pub latent_compression: crate::format::LatentCompression,
    /// A many-worker run's partition count (0: one process writes the whole set).
    pub partitions: usize,
    /// The partitions this worker runs (`3`, `3,7`, `0-3`); None: from the scheduler's
    /// environment (`set::assigned`).
    pub partition: Option<String>,
    /// Added to a Slurm array or Kubernetes index: arrays longer than Slurm's `MaxArraySize`.
    pub partition_offset: usize,
    /// Clips: which windows of frames each clip gives, as musubi-tuner takes them (preset
    /// `[video]`, `--target-frames` …). Set, the run encodes clips with the card's temporal VAE;
    /// unset, images.
    pub video: Option<FrameOptions>,
    /// Discard an output folder of another config instead of refusing it. An action, not a
    /// setting: never read from presets or recorded.
    #[serde(skip)]
    pub overwrite: bool,
    /// Where values came from, for messages: the preset file and the keys it set (flags
    /// remove theirs). Not a setting.
    #[serde(skip)]
    pub origin: Origin,
}

/// Which values came from a preset, so a message names `key` in that file rather than a flag
/// the user never typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    pub preset: Option<PathBuf>,
    pub preset_keys: std::collections::BTreeSet<String>,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        PrecomputeConfig {
            input: PathBuf::new(),
            image_column: None,
            key_column: None,
            caption_column: None,
            out: PathBuf::new(),
            model: "taef2".into(),
            size: 256,
            resize: ResizePolicy::CenterCrop,
            batch_size: 4,
            latent_mode: LatentMode::Mean,
            dtype: StorageDType::F16,
            seed: 0,
            shard_rows: 4096,
            threads: 0,
            alpha: AlphaPolicy::White,
            min_size: 0,
            max_pixels: crate::decode::DEFAULT_MAX_PIXELS,
            max_failures: 1.0,
            buckets: None,
            min_bucket_reso: None,
            max_bucket_reso: None,
            bucket_res: 0,
            bucket_step: 64,
            max_aspect: 4.0,
            crop: CropPlacement::Center,
            no_upscale: false,
            flip: false,
            captions: None,
            dedupe: false,
            limit: 0,
            reducing_gap: crate::decode::DEFAULT_REDUCING_GAP,
            device: "cpu".into(),
            partitions: 0,
            partition: None,
            partition_offset: 0,
            latent_compression: Default::default(),
            video: None,
            overwrite: false,
            origin: Origin::default(),
        }
    }
}

impl PrecomputeConfig {
    /// What the decode stage accepts.
    pub fn decode_options(&self) -> crate::decode::DecodeOptions {
        crate::decode::DecodeOptions {
            max_pixels: self.max_pixels,
            min_size: self.min_size,
            alpha: self.alpha,
            reducing_gap: self.reducing_gap,
        }
    }

    /// Reads a preset; unknown keys are errors so a typo cannot silently fall back to a default.
    /// Relative paths in it (`input`, `out`, `captions`, a `buckets` file, a `model` card path)
    /// are relative to the preset's folder, as paths in a model card are to the card's.
    pub fn from_preset(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline preset {}", path.display()))?;
        let mut c: Self = toml::from_str(&text)
            .with_context(|| format!("invalid pipeline preset {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text)?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let anchor = |p: &Path| {
            // URLs (`s3://…`) are not paths.
            if p.as_os_str().is_empty() || p.is_absolute() || p.to_string_lossy().contains("://") {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        if table.contains_key("input") {
            c.input = anchor(&c.input);
        }
        if table.contains_key("out") {
            c.out = anchor(&c.out);
        }
        c.captions = c.captions.as_deref().map(anchor);
        if let Some(b) = c.buckets.as_deref().filter(|b| !NAMED_BUCKETS.contains(b)) {
            c.buckets = Some(anchor(Path::new(b)).display().to_string());
        }
        if crate::model::is_card_path(&c.model) {
            c.model = anchor(Path::new(&c.model)).display().to_string();
        }
        c.origin = Origin {
            preset: Some(path.to_path_buf()),
            preset_keys: table.keys().cloned().collect(),
        };
        Ok(c)
    }

    /// How to name a setting in a message: the flag, or the key in the preset that set it.
    pub fn knob(&self, field: &str) -> String {
        match &self.origin.preset {
            Some(p) if self.origin.preset_keys.contains(field) => {
                format!("`{field}` in preset {}", p.display())
            }
            _ => format!("--{}", field.replace('_', "-")),
        }
    }

    /// Marks `field` as set by a flag.
    pub fn set_by_flag(&mut self, field: &str) {
        self.origin.preset_keys.remove(field);
    }

    /// Checks values that need no files: fails before any work with what to change.
    pub fn validate(&self) -> Result<()> {
        let k = |f: &str| self.knob(f);
        if self.input.as_os_str().is_empty() {
            bail!("no input: pass --input DIR (or a file, a glob or a brace range)");
        }
        if self.out.as_os_str().is_empty() {
            bail!("no output folder: pass --out DIR");
        }
        if self.size == 0 {
            bail!("{} must be a positive number of pixels", k("size"));
        }
        if self.partitions == 0 && (self.partition.is_some() || self.partition_offset > 0) {
            bail!(
                "{} and {} need {} (the run's partition count)",
                k("partition"),
                k("partition_offset"),
                k("partitions")
            );
        }
        if self.batch_size == 0 {
            bail!("{} must be at least 1", k("batch_size"));
        }
        if self.shard_rows == 0 {
            bail!("{} must be at least 1", k("shard_rows"));
        }
        if !(0.0..=1.0).contains(&self.max_failures) {
            bail!(
                "{} is a fraction between 0 and 1, got {}",
                k("max_failures"),
                self.max_failures
            );
        }
        if self.max_pixels == 0 {
            bail!("{} must be positive", k("max_pixels"));
        }
        if !(self.reducing_gap == 0.0 || self.reducing_gap >= 1.0) {
            bail!(
                "{} is 0 (always decode JPEGs at full size) or at least 1, got {}",
                k("reducing_gap"),
                self.reducing_gap
            );
        }
        crate::runtime::Device::parse(&self.device).with_context(|| k("device"))?;
        if self.bucket_step == 0 {
            bail!("{} must be positive", k("bucket_step"));
        }
        if self.max_aspect.is_nan() || self.max_aspect < 1.0 {
            bail!(
                "{} is a ratio of at least 1, got {}",
                k("max_aspect"),
                self.max_aspect
            );
        }
        if self.trainer_buckets().is_some() {
            if self.crop != CropPlacement::Center {
                bail!(
                    "{} {}: the trainer crops the centre; drop {}",
                    k("buckets"),
                    self.buckets.as_deref().unwrap_or_default(),
                    k("crop")
                );
            }
        } else if self.min_bucket_reso.is_some() || self.max_bucket_reso.is_some() {
            bail!(
                "{} and {} are kohya's: they apply to {} kohya",
                k("min_bucket_reso"),
                k("max_bucket_reso"),
                k("buckets")
            );
        }
        if self.resize != ResizePolicy::Bucket
            && (self.buckets.is_some()
                || self.bucket_res > 0
                || self.no_upscale
                || self.crop != CropPlacement::Center)
        {
            bail!(
                "--buckets, --bucket-res, --no-upscale and --crop apply to --resize bucket, not {} {}",
                k("resize"),
                self.resize.as_str()
            );
        }
        Ok(())
    }

    /// The side of the bucket area: `bucket_res`, or `size` when 0.
    pub fn bucket_side(&self) -> u32 {
        if self.bucket_res > 0 {
            self.bucket_res
        } else {
            self.size
        }
    }

    /// The trainer rule `buckets = "kohya"` / `"musubi"` names, at `bucket_side()` (kohya's
    /// `--enable_bucket`, musubi's `enable_bucket = true`).
    pub fn trainer_buckets(&self) -> Option<TrainerBuckets> {
        if self.resize != ResizePolicy::Bucket {
            return None;
        }
        let side = self.bucket_side();
        match self.buckets.as_deref()? {
            "kohya" => Some(TrainerBuckets::Kohya(KohyaBuckets {
                resolution: (side, side),
                enable_bucket: true,
                min_bucket_reso: self.min_bucket_reso.unwrap_or(256),
                max_bucket_reso: self.max_bucket_reso.unwrap_or(1024),
                bucket_reso_steps: self.bucket_step,
                bucket_no_upscale: self.no_upscale,
            })),
            "musubi" => {
                let buckets = MusubiBuckets {
                    resolution: (side, side),
                    enable_bucket: true,
                    no_upscale: self.no_upscale,
                    steps: MusubiBuckets::STEPS,
                };
                // musubi's video datasets bucket clips whatever their config says.
                Some(TrainerBuckets::Musubi(match self.video {
                    Some(_) => buckets.for_video(),
                    None => buckets,
                }))
            }
            _ => None,
        }
    }

    /// The shards' `resize` metadata: the policy and what sizes its windows (`center-crop 256`,
    /// `bucket 1024` for buckets generated at --bucket-res 1024, `bucket sdxl`, `bucket FILE`,
    /// or the trainer's own settings).
    pub fn resize_text(&self) -> String {
        if let Some(rule) = self.trainer_buckets() {
            return format!("bucket {}", rule.describe());
        }
        match (self.resize, self.buckets.as_deref()) {
            (ResizePolicy::Bucket, Some(list)) => format!("bucket {list}"),
            (ResizePolicy::Bucket, None) => format!("bucket {}", self.bucket_side()),
            (policy, _) => format!("{} {}", policy.as_str(), self.size),
        }
    }

    /// Worker threads for the run: `threads`, or every core when 0.
    pub fn thread_budget(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The effective config as TOML, as `--print-config` shows it and shards record it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes to TOML")
    }
}
