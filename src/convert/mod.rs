//! Convert: takes a shard set, hands on a trainer's own latent cache: kohya sd-scripts `.npz`
//! files, musubi-tuner `.safetensors` files, or a Parquet dataset for the diffusers SDXL script.
//! Everything that can be refused (an unfinished set, latent mode, model family, geometry the
//! trainer would not give, unsafe or clashing file names) is refused before anything is
//! written, every row checked and the problems listed with what to do; then rows stream through
//! a batch at a time, files are written in parallel, whole (temporary name, rename), and a file
//! that already holds the same bytes is left alone, so a rerun resumes.

mod npz;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema};
use rayon::prelude::*;

use crate::bucket::{KohyaBuckets, MusubiBuckets, Placement, TrainerBuckets};
use crate::identity::ModelIdentity;
use crate::shards::{ShardSet, StoredRow};
use crate::store;

/// The trainer whose cache to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trainer {
    /// kohya-ss sd-scripts: `<stem>_<W>x<H>_<arch>.npz` per image.
    Kohya,
    /// kohya-ss musubi-tuner: `<stem>_<W>x<H>_<arch>.safetensors` per image.
    Musubi,
    /// diffusers' `train_text_to_image_sdxl.py`: a Parquet dataset with `model_input`.
    Diffusers,
}

/// The model family the trainer trains, which fixes its latent convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Sd,
    Sdxl,
    Sd3,
    Flux,
    /// FLUX.2 (musubi `flux_2_dev`): 2×2-patchified, batch-norm-normalized latents.
    Flux2,
    /// FLUX.1 Kontext (musubi `flux_kontext`): needs control images, which shard sets lack.
    FluxKontext,
    /// Z-Image (musubi `z_image`), on the FLUX.1 autoencoder.
    ZImage,
    /// Qwen-Image (musubi `qwen_image`): per-channel normalized latents.
    QwenImage,
}

impl Trainer {
    fn name(self) -> &'static str {
        match self {
            Trainer::Kohya => "kohya",
            Trainer::Musubi => "musubi",
            Trainer::Diffusers => "diffusers",
        }
    }
}

impl Arch {
    /// Latent channels the family's VAE stores (FLUX.2: after patchify).
    fn channels(self) -> usize {
        match self {
            Arch::Sd | Arch::Sdxl => 4,
            Arch::Sd3 | Arch::Flux | Arch::FluxKontext | Arch::ZImage | Arch::QwenImage => 16,
            Arch::Flux2 => 128,
        }
    }

    /// Pixels per stored latent pixel.
    fn factor(self) -> u32 {
        if self == Arch::Flux2 {
            16
        } else {
            8
        }
    }

    fn name(self) -> &'static str {
        match self {
            Arch::Sd => "sd",
            Arch::Sdxl => "sdxl",
            Arch::Sd3 => "sd3",
            Arch::Flux => "flux",
            Arch::Flux2 => "flux2",
            Arch::FluxKontext => "flux-kontext",
            Arch::ZImage => "z-image",
            Arch::QwenImage => "qwen-image",
        }
    }

    /// The family a shipped card belongs to.
    fn of_model(model: &str, batch_norm: bool) -> Option<Self> {
        if batch_norm {
            return Some(Arch::Flux2);
        }
        match model {
            "sd15" | "sd2" => Some(Arch::Sd),
            "sdxl" => Some(Arch::Sdxl),
            "sd3" => Some(Arch::Sd3),
            "flux1" => Some(Arch::Flux),
            "qwen-image" => Some(Arch::QwenImage),
            _ => None,
        }
    }
}

/// Flags of `vae-pipeline convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The trainer whose cache format to write.
    #[arg(long, value_enum)]
    pub to: Trainer,
    /// A `precompute --out` folder.
    #[arg(long)]
    pub shards: PathBuf,
    /// Where to write: a folder that mirrors the images' folders (kohya), the cache folder
    /// (musubi), or the dataset folder (diffusers).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// kohya: write each `.npz` beside its image under this folder (the --input of precompute)
    /// instead of into --out.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// The model family the trainer trains [default: the shards' model card's family].
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Convert a set whose precompute run has not finished (no `_SUCCESS`, partitions
    /// missing): the trainer then sees only the rows written so far.
    #[arg(long)]
    pub allow_partial: bool,
    /// The trainer's training resolution, `W` or `W,H` (kohya `--resolution`, musubi
    /// `resolution`) [default: the shards' --size; shards made with `--buckets kohya|musubi`
    /// record all bucket settings, and these flags are then not needed].
    #[arg(long)]
    pub resolution: Option<String>,
    /// The trainer buckets by aspect ratio (kohya `--enable_bucket`, musubi `enable_bucket`).
    #[arg(long)]
    pub enable_bucket: bool,
    /// kohya `--min_bucket_reso` [default: 256].
    #[arg(long)]
    pub min_bucket_reso: Option<u32>,
    /// kohya `--max_bucket_reso` (SDXL configs usually set 2048) [default: 1024].
    #[arg(long)]
    pub max_bucket_reso: Option<u32>,
    /// kohya `--bucket_reso_steps` [default: 64].
    #[arg(long)]
    pub bucket_reso_steps: Option<u32>,
    /// kohya `--bucket_no_upscale`, musubi `bucket_no_upscale`.
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Threads writing files; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ConvertArgs {
    /// The bucket flags given, as text for messages (empty when none).
    fn bucket_flags(&self) -> Vec<&'static str> {
        [
            (self.resolution.is_some(), "--resolution"),
            (self.enable_bucket, "--enable-bucket"),
            (self.min_bucket_reso.is_some(), "--min-bucket-reso"),
            (self.max_bucket_reso.is_some(), "--max-bucket-reso"),
            (self.bucket_reso_steps.is_some(), "--bucket-reso-steps"),
            (self.bucket_no_upscale, "--bucket-no-upscale"),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect()
    }
}

/// What a conversion did.
#[derive(Debug, Default)]
pub struct ConvertSummary {
    pub written: usize,
    /// Files that already held the same bytes.
    pub unchanged: usize,
    pub out: PathBuf,
    /// Why some files are not where the keys alone would put them (tar and Parquet inputs).
    pub notes: Vec<String>,
}

impl ConvertSummary {
    pub fn print(&self) {
        for note in &self.notes {
            eprintln!("note: {note}");
        }
        eprintln!(
            "wrote {} file(s), {} already up to date, in {}",
            self.written,
            self.unchanged,
            self.out.display()
        );
    }
}

/// A latent normalization: stored = `((z − mean[c]) / std[c] − shift) · scale`, the per-channel
/// step only where `channel` is set.
#[derive(Debug, Clone, PartialEq)]
struct Norm {
    scale: f32,
    shift: f32,
    channel: Option<(Vec<f32>, Vec<f32>)>,
}

impl Norm {
    fn scale_shift(shift: f32, scale: f32) -> Self {
        Norm {
            scale,
            shift,
            channel: None,
        }
    }

    /// What the shards' card stored.
    fn of_model(model: &ModelIdentity) -> Self {
        Norm {
            scale: model.scaling_factor,
            shift: model.shift_factor,
            channel: model.latents_mean.clone().zip(model.latents_std.clone()),
        }
    }
}

/// musubi's Qwen-Image VAE normalization (qwen_image_autoencoder_kl.py `latents_mean`,
/// `latents_std`; `encode_pixels_to_latents` stores `(z − mean) / std`).
const QWEN_IMAGE_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const QWEN_IMAGE_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.916,
];

/// How stored latents become the trainer's values: through `z` from the shards' normalization
/// to the trainer's; None passes them through (FLUX.2's batch-norm latents, or the same
/// normalization on both sides).
#[derive(Debug, Clone)]
struct Rescale {
    from: Norm,
    to: Option<Norm>,
}

impl Rescale {
    fn new(from: Norm, to: Option<Norm>) -> Self {
        let to = to.filter(|to| *to != from);
        Rescale { from, to }
    }

    /// `stored` is one `[C, h, w]` latent.
    fn apply(&self, stored: &[f32], shape: &[usize]) -> Vec<f32> {
        let Some(to) = &self.to else {
            return stored.to_vec();
        };
        let plane = shape[1..].iter().product::<usize>();
        let from = &self.from;
        stored
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let c = i / plane.max(1);
                let mut z = s / from.scale + from.shift;
                if let Some((mean, std)) = &from.channel {
                    z = z * std[c] + mean[c];
                }
                if let Some((mean, std)) = &to.channel {
                    z = (z - mean[c]) / std[c];
                }
                (z - to.shift) * to.scale
            })
            .collect()
    }
}

/// A row (or the set) that cannot be written, and what the user can do about it.
struct Problem {
    what: String,
    fix: String,
}

impl Problem {
    fn new(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            what: what.into(),
            fix: fix.into(),
        }
    }
}

/// Rows shown in a refusal; the rest are counted.
const SHOWN_PROBLEMS: usize = 8;

/// Runs `convert`.
pub fn run(args: &ConvertArgs) -> Result<ConvertSummary> {
    let set = ShardSet::open(&args.shards)?;
    if !args.allow_partial {
        if let Some(why) = set.unfinished(&args.shards)? {
            bail!(
                "{why}; or pass --allow-partial to convert the {} rows there are",
                set.rows
            );
        }
    }
    let identity = &set.info.identity;
    let meta = &set.info.metadata;
    let batch_norm = identity.model.batch_norm.is_some();
    let per_channel = identity.model.latents_mean.is_some();
    let arch = match args.arch {
        Some(a) => a,
        None => Arch::of_model(&meta.model, batch_norm).with_context(|| {
            format!(
                "the shards were made with model {:?}, which is no family this converter knows: \
                 pass --arch",
                meta.model
            )
        })?,
    };
    if (args.to, arch) == (Trainer::Musubi, Arch::FluxKontext) {
        bail!(
            "musubi's FLUX.1 Kontext cache holds each image's control latent beside its latent \
             (`latents_control_1x<h>x<w>`, save_latent_cache_flux_kontext); shard sets hold no \
             control images, so no Kontext cache can be written: cache Kontext datasets with \
             musubi's own flux_kontext_cache_latents.py"
        );
    }
    let supported: &[Arch] = match args.to {
        Trainer::Kohya => &[Arch::Sd, Arch::Sdxl, Arch::Sd3, Arch::Flux],
        Trainer::Musubi => &[Arch::Flux2, Arch::ZImage, Arch::QwenImage],
        Trainer::Diffusers => &[Arch::Sd, Arch::Sdxl],
    };
    if !supported.contains(&arch) {
        bail!(
            "{} caches have no {} latents: use --arch {}",
            args.to.name(),
            arch.name(),
            supported
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if meta.latent_mode == "dist" {
        bail!(
            "the shards hold `dist` latents (mean and std); {} caches hold one latent per \
             image: precompute with --latent-mode mean or sample",
            args.to.name()
        );
    }
    if per_channel != (arch == Arch::QwenImage) {
        bail!(
            "--arch {} needs {} latents, but these shards were normalized as {}: {}",
            arch.name(),
            if arch == Arch::QwenImage {
                "per-channel normalized (`latents_mean`/`latents_std`, the qwen-image card)"
            } else {
                "scale-and-shift"
            },
            meta.normalization,
            if per_channel {
                "per-channel shards (Qwen-Image, Wan cards) convert to --to musubi --arch qwen-image"
            } else {
                "precompute with the qwen-image card"
            }
        );
    }
    if batch_norm != (arch == Arch::Flux2) {
        bail!(
            "--arch {} needs {} shards, but these were normalized as {}",
            arch.name(),
            if arch == Arch::Flux2 {
                "FLUX.2 (batch-norm normalized, `[batch_norm]` card)"
            } else {
                "scale-and-shift"
            },
            meta.normalization
        );
    }
    let to = match (args.to, arch) {
        (_, Arch::Flux2) => None,
        (_, Arch::QwenImage) => Some(Norm {
            scale: 1.0,
            shift: 0.0,
            channel: Some((QWEN_IMAGE_MEAN.to_vec(), QWEN_IMAGE_STD.to_vec())),
        }),
        (Trainer::Kohya, Arch::Flux) => Some(Norm::scale_shift(0.1159, 0.3611)),
        (Trainer::Diffusers, Arch::Sd) => Some(Norm::scale_shift(0.0, 0.18215)),
        (Trainer::Diffusers, Arch::Sdxl) => Some(Norm::scale_shift(0.0, 0.13025)),
        _ => Some(Norm::scale_shift(0.0, 1.0)),
    };
    let rescale = Rescale::new(Norm::of_model(&identity.model), to);
    let out = match (args.to, &args.images, &args.out) {
        (Trainer::Kohya, Some(images), _) => images.clone(),
        (_, _, Some(out)) => out.clone(),
        (Trainer::Kohya, None, None) => bail!("pass --out DIR (a mirror folder) or --images DIR"),
        (_, _, None) => bail!("pass --out DIR"),
    };
    if args.images.is_some() && args.to != Trainer::Kohya {
        bail!("--images is for --to kohya (npz files beside the images)");
    }

    // Check every row before writing anything: keys and geometry only, no latents.
    let plan = Plan::new(args, arch, identity, &out)?;
    let mut names: HashMap<PathBuf, String> = HashMap::new();
    let mut stems: HashMap<OsString, String> = HashMap::new();
    let mut problems: Vec<Problem> = Vec::new();
    let mut containers = std::collections::BTreeSet::new();
    let mut shapes = std::collections::BTreeSet::new();
    set.for_each_chunk(4096, usize::MAX, false, |rows| {
        for row in rows {
            shapes.insert((row.width, row.height));
            // Shard sets come from strangers: a key that breaks FORMAT.md's rule names no file.
            if let Some(why) = crate::source::key_problem(&row.key) {
                problems.push(Problem::new(
                    format!("{:?}: not a valid key ({why})", row.key),
                    "the set breaks FORMAT.md's key rule (written by another tool, or edited): \
                     precompute the images again",
                ));
                continue;
            }
            if let Err(p) = plan.check(&row) {
                problems.push(p);
                continue;
            }
            let Some(target) = plan.path(&row) else {
                continue;
            };
            let (path, container) = match target {
                Ok(t) => t,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            if let Some(c) = container {
                containers.insert(c);
            }
            if args.to == Trainer::Musubi {
                // musubi names latent files by base name and size, and the text-encoder cache
                // by base name alone: two images of one base name share a caption.
                let stem = row_stem(&row.key);
                if let Some(other) = stems.insert(stem.clone(), row.key.clone()) {
                    problems.push(Problem::new(
                        format!(
                            "{} and {other} share the base name {:?}: musubi's cache folder is \
                             flat, and its text-encoder cache is named by base name alone \
                             ({}_{}_te.safetensors), so one image would train with the other's \
                             caption",
                            row.key,
                            stem,
                            stem.to_string_lossy(),
                            musubi_arch(arch).0
                        ),
                        "give every image a distinct file name (rename the duplicates and \
                         precompute again), or make one shard set, and one musubi dataset with \
                         its own cache_directory, per folder",
                    ));
                    continue;
                }
            }
            if let Some(other) = names.insert(path.clone(), row.key.clone()) {
                problems.push(Problem::new(
                    format!("{} and {other} both become {}", row.key, path.display()),
                    "give the images distinct file names and precompute again",
                ));
            }
        }
        Ok(())
    })?;
    let rows_with_problems = problems.len();
    if args.to == Trainer::Diffusers && shapes.len() > 1 {
        problems.insert(
            0,
            Problem::new(
                format!(
                    "the shards hold {} window sizes; the diffusers script trains at one square \
                 resolution",
                    shapes.len()
                ),
                "precompute with --resize center-crop (one square size) for the diffusers script",
            ),
        );
    }
    if !problems.is_empty() {
        bail!(refusal(
            &problems,
            rows_with_problems,
            set.rows,
            &format!("a {} {} cache", args.to.name(), arch.name())
        ));
    }

    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the conversion's thread pool")?;
    let mut summary = ConvertSummary {
        out: out.clone(),
        ..ConvertSummary::default()
    };
    if let Some(example) = containers.iter().next() {
        summary.notes.push(format!(
            "{} key(s)' images are inside tar or Parquet files, which kohya cannot read: their \
             .npz files are in folders named after each file without its extension (e.g. \
             {example}/); extract each file's images into that folder (`tar -xf {example}.tar \
             -C {example}`) before training",
            containers.len()
        ));
    }
    if args.to == Trainer::Diffusers {
        let mut part = 0;
        set.for_each_chunk(1024, usize::MAX, true, |rows| {
            let bytes = diffusers_part(&rows, &rescale)?;
            let path = out.join(format!("train-{part:05}.parquet"));
            part += 1;
            if write_if_changed(&path, &bytes)? {
                summary.written += 1;
            } else {
                summary.unchanged += 1;
            }
            Ok(())
        })?;
        return Ok(summary);
    }
    set.for_each_chunk(64, usize::MAX, true, |rows| {
        let written: Vec<bool> = pool.install(|| {
            rows.par_iter()
                .map(|row| {
                    let Some(Ok((path, _))) = plan.path(row) else {
                        unreachable!("every row's path was checked above")
                    };
                    let bytes = match args.to {
                        Trainer::Kohya => plan.kohya_npz(row, &rescale),
                        _ => plan.musubi_safetensors(row, &rescale)?,
                    };
                    write_if_changed(&path, &bytes)
                })
                .collect::<Result<_>>()
        })?;
        for w in written {
            if w {
                summary.written += 1;
            } else {
                summary.unchanged += 1;
            }
        }
        Ok(())
    })?;
    Ok(summary)
}

/// The refusal: how many rows (of `rows`) cannot be written, the first few problems, and each
/// distinct fix once.
fn refusal(problems: &[Problem], bad_rows: usize, rows: usize, what: &str) -> String {
    let mut text = if bad_rows > 0 {
        format!("{bad_rows} of {rows} row(s) cannot be written as {what}; nothing was written:")
    } else {
        format!("the shards cannot be written as {what}; nothing was written:")
    };
    for p in problems.iter().take(SHOWN_PROBLEMS) {
        text.push_str("\n  ");
        text.push_str(&p.what);
    }
    if problems.len() > SHOWN_PROBLEMS {
        text.push_str(&format!(
            "\n  … and {} more",
            problems.len() - SHOWN_PROBLEMS
        ));
    }
    let mut fixes: Vec<&str> = Vec::new();
    for p in problems {
        if !fixes.contains(&p.fix.as_str()) {
            fixes.push(&p.fix);
        }
    }
    for fix in fixes {
        text.push_str("\nto fix: ");
        text.push_str(fix);
    }
    text
}

/// The key's base name without its extension, as musubi's `os.path.splitext(basename)`.
fn row_stem(key: &str) -> OsString {
    let name = key.rsplit('/').next().unwrap_or(key);
    Path::new(name)
        .file_stem()
        .map(|s| s.to_os_string())
        .unwrap_or_default()
}

/// `W` or `W,H`.
fn parse_resolution(text: Option<&str>, default: u32) -> Result<(u32, u32)> {
    let Some(text) = text else {
        return Ok((default, default));
    };
    let parse = |s: &str| -> Result<u32> {
        s.trim()
            .parse()
            .with_context(|| format!("--resolution {text:?} is not W or W,H"))
    };
    Ok(match text.split_once(',') {
        Some((w, h)) => (parse(w)?, parse(h)?),
        None => {
            let side = parse(text)?;
            (side, side)
        }
    })
}

/// The trainer's bucket rule: the one the shards record (`precompute --buckets kohya|musubi`),
/// else the one the flags describe. None for the diffusers script (one square size).
fn bucket_rule(
    args: &ConvertArgs,
    identity: &crate::identity::RunIdentity,
) -> Result<Option<TrainerBuckets>> {
    if let Some(recorded) = &identity.framing.trainer {
        if recorded.name() != args.to.name() {
            bail!(
                "the shards were bucketed as {} buckets ({}), and {} buckets differ: precompute \
                 again with --buckets {}",
                recorded.name(),
                recorded.describe(),
                args.to.name(),
                args.to.name()
            );
        }
        let flags = args.bucket_flags();
        if !flags.is_empty() {
            bail!(
                "the shards record their bucket settings ({}): drop {} (convert reads them \
                 from the shards)",
                recorded.describe(),
                flags.join(", ")
            );
        }
        return Ok(Some(recorded.clone()));
    }
    let resolution = parse_resolution(args.resolution.as_deref(), identity.framing.size)?;
    Ok(match args.to {
        Trainer::Kohya => {
            let steps = args.bucket_reso_steps.unwrap_or(64);
            let min = args.min_bucket_reso.unwrap_or(256);
            if steps == 0 || min == 0 {
                bail!("--bucket-reso-steps and --min-bucket-reso must be positive");
            }
            Some(TrainerBuckets::Kohya(KohyaBuckets {
                resolution,
                enable_bucket: args.enable_bucket,
                min_bucket_reso: min,
                max_bucket_reso: args.max_bucket_reso.unwrap_or(1024),
                bucket_reso_steps: steps,
                bucket_no_upscale: args.bucket_no_upscale,
            }))
        }
        Trainer::Musubi => {
            let kohya_only: Vec<&str> = args
                .bucket_flags()
                .into_iter()
                .filter(|f| f.contains("bucket-reso"))
                .collect();
            if !kohya_only.is_empty() {
                bail!(
                    "{} are kohya's flags; musubi's buckets step by {} pixels",
                    kohya_only.join(", "),
                    MusubiBuckets::STEPS
                );
            }
            Some(TrainerBuckets::Musubi(MusubiBuckets {
                resolution,
                enable_bucket: args.enable_bucket,
                no_upscale: args.bucket_no_upscale,
                steps: MusubiBuckets::STEPS,
            }))
        }
        Trainer::Diffusers => {
            if resolution.0 != resolution.1 {
                bail!(
                    "--resolution {}x{}: the diffusers script trains on squares; pass one side",
                    resolution.0,
                    resolution.1
                );
            }
            None
        }
    })
}

/// The checked conversion: where files go and what geometry the trainer gives each image.
struct Plan {
    to: Trainer,
    arch: Arch,
    out: PathBuf,
    rule: Option<TrainerBuckets>,
    resolutions: Vec<(u32, u32)>,
    /// The diffusers script's square side.
    side: u32,
}

impl Plan {
    fn new(
        args: &ConvertArgs,
        arch: Arch,
        identity: &crate::identity::RunIdentity,
        out: &Path,
    ) -> Result<Self> {
        let rule = bucket_rule(args, identity)?;
        let side = parse_resolution(args.resolution.as_deref(), identity.framing.size)?.0;
        Ok(Plan {
            to: args.to,
            arch,
            out: out.to_path_buf(),
            resolutions: rule.as_ref().map(|r| r.resolutions()).unwrap_or_default(),
            rule,
            side,
        })
    }

    /// The row is what the trainer would have cached for its image, or why not.
    fn check(&self, row: &StoredRow) -> Result<(), Problem> {
        let key = &row.key;
        if row.shape.len() != 3 {
            return Err(Problem::new(
                format!(
                    "{key}: a clip window (latent {:?}), not an image",
                    row.shape
                ),
                "convert clip sets with --to musubi --arch wan",
            ));
        }
        let [c, h, w] = chw(&row.shape);
        let f = self.arch.factor() as usize;
        if c != self.arch.channels() {
            return Err(Problem::new(
                format!(
                    "{key}: {c} latent channels; {} latents have {}",
                    self.arch.name(),
                    self.arch.channels()
                ),
                "pass the --arch of the model card the shards were made with",
            ));
        }
        if (h * f, w * f) != (row.height as usize, row.width as usize) {
            return Err(Problem::new(
                format!(
                    "{key}: a {}x{} window gave a {w}x{h} latent; {} latents are 1/{f} of the \
                     window",
                    row.width,
                    row.height,
                    self.arch.name()
                ),
                "pass the --arch of the model card the shards were made with",
            ));
        }
        let Some(rule) = &self.rule else {
            if row.width as u32 != self.side || row.height != row.width {
                return Err(Problem::new(
                    format!(
                        "{key}: a {}x{} window; the diffusers script trains on {}x{} squares",
                        row.width, row.height, self.side, self.side
                    ),
                    "pass the --resolution you train at, or precompute with --resize \
                     center-crop --size of that resolution",
                ));
            }
            return Ok(());
        };
        if row.crop_top < 0 || row.crop_left < 0 {
            return Err(Problem::new(
                format!("{key}: padded (negative crop offsets); trainers crop, they do not pad"),
                "precompute with --resize center-crop or bucket, not pad",
            ));
        }
        let (ow, oh) = (row.orig_width as u32, row.orig_height as u32);
        let placement: Option<Placement> = rule.place(&self.resolutions, ow, oh);
        let Some(p) = placement else {
            return Err(Problem::new(
                format!(
                    "{key}: {} gives a {ow}x{oh} image an empty bucket (smaller than one step)",
                    self.to.name()
                ),
                "leave out images smaller than the bucket step (precompute --min-size)",
            ));
        };
        if (row.width as u32, row.height as u32) != p.bucket {
            return Err(Problem::new(
                format!(
                    "{key}: {} puts a {ow}x{oh} image in bucket {}x{}, the shards hold a {}x{} \
                     window",
                    self.to.name(),
                    p.bucket.0,
                    p.bucket.1,
                    row.width,
                    row.height,
                ),
                format!(
                    "pass the bucket settings you train with (now: {}), or precompute with \
                     --resize bucket --buckets {} and those settings, so the shards hold the \
                     trainer's own buckets",
                    rule.describe(),
                    self.to.name()
                ),
            ));
        }
        if (row.crop_left as u32, row.crop_top as u32) != p.crop {
            return Err(Problem::new(
                format!(
                    "{key}: {} crops the centre at ({}, {}), the shards at ({}, {})",
                    self.to.name(),
                    p.crop.0,
                    p.crop.1,
                    row.crop_left,
                    row.crop_top
                ),
                "precompute with --crop center (the trainers crop the centre)",
            ));
        }
        Ok(())
    }

    /// The file a row becomes and, when its key starts inside a tar or Parquet file, that
    /// file's folder name (None for the diffusers dataset, written in parts). Keys name files
    /// only through `source::path_of`, which refuses `..`, absolute and empty components.
    fn path(&self, row: &StoredRow) -> Option<Result<(PathBuf, Option<String>), Problem>> {
        if self.to == Trainer::Diffusers {
            return None;
        }
        let unsafe_key = || {
            Problem::new(
                format!("{:?}: not a safe relative path", row.key),
                "precompute the images again (the key names no file)",
            )
        };
        let (key, container) = unpack_container(&row.key);
        let Some(image) = crate::source::path_of(&self.out, &key) else {
            return Some(Err(unsafe_key()));
        };
        let Some(stem) = image.file_stem() else {
            return Some(Err(unsafe_key()));
        };
        let (w, h) = (row.orig_width, row.orig_height);
        let (suffix, dir) = match self.to {
            Trainer::Kohya => (
                format!(
                    "_{w:04}x{h:04}_{}.npz",
                    match self.arch {
                        Arch::Sd => "sd",
                        Arch::Sdxl => "sdxl",
                        Arch::Sd3 => "sd3",
                        _ => "flux",
                    }
                ),
                image.parent().map(Path::to_path_buf).unwrap_or_default(),
            ),
            // musubi reads one flat cache folder by the images' base names.
            _ => (
                format!("_{w:04}x{h:04}_{}.safetensors", musubi_arch(self.arch).0),
                self.out.clone(),
            ),
        };
        let mut name = stem.to_os_string();
        name.push(suffix);
        Some(Ok((
            dir.join(name),
            container.filter(|_| self.to == Trainer::Kohya),
        )))
    }

    /// kohya's `.npz` (strategy_base.py `save_latents_to_disk`): `latents` (C,h,w) f32,
    /// `original_size` [W,H], `crop_ltrb`, `latents_flipped`; SD3 and FLUX suffix every key
    /// with `_{h}x{w}` (strategy_sd3.py / strategy_flux.py: multi-resolution caches).
    fn kohya_npz(&self, row: &StoredRow, rescale: &Rescale) -> Vec<u8> {
        let [c, h, w] = chw(&row.shape);
        let suffix = match self.arch {
            Arch::Sd3 | Arch::Flux => format!("_{h}x{w}"),
            _ => String::new(),
        };
        let bucket = (row.width as u32, row.height as u32);
        let original = (row.orig_width as u32, row.orig_height as u32);
        let mut arrays = vec![
            npz::Array::f32(
                &format!("latents{suffix}"),
                vec![c, h, w],
                &rescale.apply(&row.latent, &row.shape),
            ),
            npz::Array::i64(
                &format!("original_size{suffix}"),
                &[i64::from(original.0), i64::from(original.1)],
            ),
            npz::Array::f64(
                &format!("crop_ltrb{suffix}"),
                &KohyaBuckets::crop_ltrb(bucket, original),
            ),
        ];
        if let Some(flip) = &row.latent_flip {
            arrays.push(npz::Array::f32(
                &format!("latents_flipped{suffix}"),
                vec![c, h, w],
                &rescale.apply(flip, &row.shape),
            ));
        }
        npz::npz(&arrays)
    }

    /// musubi's `.safetensors` (cache_io.py): FLUX.2 `latents_{H}x{W}_float32` of (C, H, W)
    /// (`save_latent_cache_flux_2`), Z-Image `latents_1x{H}x{W}_float32` of (C, H, W)
    /// (`save_latent_cache_z_image`), Qwen-Image `latents_1x{H}x{W}_float32` of (C, 1, H, W)
    /// (`save_latent_cache_qwen_image`); metadata architecture, width, height, format_version
    /// (`save_latent_cache_common`).
    fn musubi_safetensors(&self, row: &StoredRow, rescale: &Rescale) -> Result<Vec<u8>> {
        let [c, h, w] = chw(&row.shape);
        let values = rescale.apply(&row.latent, &row.shape);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (key, shape) = match self.arch {
            Arch::Flux2 => (format!("latents_{h}x{w}_float32"), vec![c, h, w]),
            Arch::QwenImage => (format!("latents_1x{h}x{w}_float32"), vec![c, 1, h, w]),
            _ => (format!("latents_1x{h}x{w}_float32"), vec![c, h, w]),
        };
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
        let metadata: HashMap<String, String> = [
            ("architecture", musubi_arch(self.arch).1.to_string()),
            ("width", row.orig_width.to_string()),
            ("height", row.orig_height.to_string()),
            ("format_version", "1.0.1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(safetensors::tensor::serialize(
            [(key, view)],
            Some(metadata),
        )?)
    }
}

/// A key whose first components lead into a tar or Parquet input (`data/00003.tar/000030017`),
/// with that file's component replaced by its name without the extension (`data/00003/…`): the
/// folder its images go to once extracted. Also that folder's path, or None for other keys.
fn unpack_container(key: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = key.split('/').collect();
    let last = parts.len().saturating_sub(1);
    for (i, part) in parts.iter().enumerate().take(last) {
        let lower = part.to_ascii_lowercase();
        let stem = [".tar.gz", ".tgz", ".tar", ".parquet"]
            .iter()
            .find_map(|ext| {
                lower
                    .ends_with(ext)
                    .then(|| &part[..part.len() - ext.len()])
            });
        if let Some(stem) = stem.filter(|s| !s.is_empty()) {
            let mut out: Vec<&str> = parts.clone();
            out[i] = stem;
            let folder = out[..=i].join("/");
            return (out.join("/"), Some(folder));
        }
    }
    (key.to_string(), None)
}

/// musubi's short and full architecture names (dataset/architectures.py).
fn musubi_arch(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::Flux2 => ("f2d", "flux_2_dev"),
        Arch::FluxKontext => ("fk", "flux_kontext"),
        Arch::QwenImage => ("qi", "qwen_image"),
        _ => ("zi", "z_image"),
    }
}

/// `[C, h, w]` of an image row's latent (`check` refused clip rows for image targets).
fn chw(shape: &[usize]) -> [usize; 3] {
    [shape[0], shape[shape.len() - 2], shape[shape.len() - 1]]
}

/// One Parquet file of the diffusers dataset: `model_input` as nested [C][h][w] float32 lists
/// (`latent · scaling_factor`, what the script's `compute_vae_encodings` returns), `original_sizes`
/// (h, w), `crop_top_lefts` (top, left), `text` (the caption) and `key`.
fn diffusers_part(rows: &[StoredRow], rescale: &Rescale) -> Result<Vec<u8>> {
    let [c, h, w] = chw(&rows[0].shape);
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|r| rescale.apply(&r.latent, &r.shape))
        .collect();
    let f32_field = Arc::new(Field::new("item", DataType::Float32, true));
    let row_list = FixedSizeListArray::new(
        f32_field,
        w as i32,
        Arc::new(Float32Array::from(values)),
        None,
    );
    let rows_field = Arc::new(Field::new("item", row_list.data_type().clone(), true));
    let plane = FixedSizeListArray::new(rows_field, h as i32, Arc::new(row_list), None);
    let plane_field = Arc::new(Field::new("item", plane.data_type().clone(), true));
    let tensor = FixedSizeListArray::new(plane_field, c as i32, Arc::new(plane), None);
    let pair = |f: &dyn Fn(&StoredRow) -> [i32; 2]| -> ArrayRef {
        let flat: Vec<i32> = rows.iter().flat_map(f).collect();
        let item = Arc::new(Field::new("item", DataType::Int32, true));
        Arc::new(FixedSizeListArray::new(
            item,
            2,
            Arc::new(Int32Array::from(flat)),
            None,
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.key.as_str()),
        )),
        Arc::new(tensor),
        pair(&|r| [r.orig_height, r.orig_width]),
        pair(&|r| [r.crop_top, r.crop_left]),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.caption.clone()).collect::<Vec<_>>(),
        )),
    ];
    let fields: Vec<Field> = [
        "key",
        "model_input",
        "original_sizes",
        "crop_top_lefts",
        "text",
    ]
    .iter()
    .zip(&columns)
    .map(|(name, a)| Field::new(*name, a.data_type().clone(), *name == "text"))
    .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut bytes = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(
            parquet::basic::ZstdLevel::try_new(3)?,
        ))
        .set_dictionary_enabled(false)
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(bytes)
}

/// Writes `bytes` to `path` whole, unless it already holds exactly them; true when written.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    store::write_atomic(path, bytes)?;
    Ok(true)
}
