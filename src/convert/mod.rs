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
    /// Wan 2.1, and Wan 2.2 A14B (musubi `wan`): the Wan 2.1 VAE's per-channel normalized
    /// latents of clip windows `[C, F, h, w]` (and of images, as musubi's image datasets).
    Wan,
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
            Arch::Sd3
            | Arch::Flux
            | Arch::FluxKontext
            | Arch::ZImage
            | Arch::QwenImage
            | Arch::Wan => 16,
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
            Arch::Wan => "wan",
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
            "wan2.1" => Some(Arch::Wan),
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
/// `latents_std`; `encode_pixels_to_latents` stores `(z − mean) / std`), which is also its Wan
/// VAE's (wan/modules/vae.py `WanVAE` `mean`, `std`, `scale = [mean, 1 / std]`): one VAE.
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

    /// `stored` is one latent of `shape`, channels first (`[C, h, w]` or `[C, F, h, w]`).
    fn apply(&self, stored: &[f32], shape: &[usize]) -> Vec<f32> {
        let Some(to) = &self.to else {
            return stored.to_vec();
        };
        let plane: usize = shape[1..].iter().product();
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
        Trainer::Musubi => &[Arch::Flux2, Arch::ZImage, Arch::QwenImage, Arch::Wan],
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
    let wan_vae = matches!(arch, Arch::QwenImage | Arch::Wan);
    if per_channel != wan_vae {
        bail!(
            "--arch {} needs {} latents, but these shards were normalized as {}: {}",
            arch.name(),
            if wan_vae {
                "per-channel normalized (`latents_mean`/`latents_std`, the qwen-image or \
                 wan2.1 card)"
            } else {
                "scale-and-shift"
            },
            meta.normalization,
            if per_channel {
                "per-channel shards (Qwen-Image, Wan cards) convert to --to musubi --arch \
                 qwen-image or wan"
            } else {
                "precompute with the qwen-image or wan2.1 card"
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
        (_, Arch::QwenImage | Arch::Wan) => Some(Norm {
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
    // Whether rows are clip windows: musubi's image and video datasets each read their own
    // cache folder, and its video dataset takes every `*_wan.safetensors` there for a window.
    let mut kinds = std::collections::BTreeSet::new();
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
            let clip = clip_window(&row.key).filter(|_| row.shape.len() == 4);
            kinds.insert(clip.is_some());
            if args.to == Trainer::Musubi {
                // musubi names latent files by base name and size, and the text-encoder cache
                // by base name alone: two images (clips) of one base name share a caption. A
                // clip's windows share its base name and caption.
                let owner = clip.map_or(row.key.as_str(), |(clip, _, _)| clip);
                let stem = row_stem(owner);
                if let Some(other) = stems
                    .insert(stem.clone(), owner.to_string())
                    .filter(|other| other != owner)
                {
                    problems.push(Problem::new(
                        format!(
                            "{} and {other} share the base name {:?}: musubi's cache folder is \
                             flat, and its text-encoder cache is named by base name alone \
                             ({}_{}_te.safetensors), so one image would train with the other's \
                             caption",
                            owner,
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
    if kinds.len() > 1 {
        problems.insert(
            0,
            Problem::new(
                "the shards hold both images and clip windows; musubi reads a video dataset's \
                 cache folder as windows only (and an image dataset's as images only)",
                "precompute the images and the clips into two shard sets and convert each to \
                 its own --out (one cache_directory per musubi dataset)",
            ),
        );
    }
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
                        _ => plan.musubi_safetensors(row, &rescale),
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
    /// musubi's rule for clips (`MusubiBuckets::for_video`) and its bucket list.
    video: Option<(TrainerBuckets, Vec<(u32, u32)>)>,
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
            video: match &rule {
                Some(TrainerBuckets::Musubi(m)) => {
                    let video = TrainerBuckets::Musubi(m.for_video());
                    let resolutions = video.resolutions();
                    Some((video, resolutions))
                }
                _ => None,
            },
            rule,
            side,
        })
    }

    /// The row is what the trainer would have cached for its image or clip window, or why not.
    fn check(&self, row: &StoredRow) -> Result<(), Problem> {
        let dims = &row.shape;
        let (c, h, w) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
        let f = self.arch.factor() as usize;
        let key = &row.key;
        if c != self.arch.channels() {
            return Err(Problem::new(
                format!(
                    "{key}: {c} latent channels; {} latents have {}",
                    self.arch.name(),
                    self.arch.channels()
                ),
                if self.arch == Arch::Wan {
                    "musubi's Wan (2.1, and 2.2 A14B) trains on the Wan 2.1 VAE's 16 channels: \
                     precompute with the wan2.1 card"
                } else {
                    "pass the --arch of the model card the shards were made with"
                },
            ));
        }
        let clip = dims.len() == 4;
        if clip && (self.to, self.arch) != (Trainer::Musubi, Arch::Wan) {
            return Err(Problem::new(
                format!("{key}: a clip window ({}x{h}x{w} latent frames)", dims[1]),
                "clip windows convert to --to musubi --arch wan",
            ));
        }
        if clip {
            let Some((_, _, count)) = clip_window(key) else {
                return Err(Problem::new(
                    format!("{key}: a clip window whose key does not end in /<start>-<count>"),
                    "the set breaks FORMAT.md's window keys: precompute the clips again",
                ));
            };
            let latent_frames = 1 + count.saturating_sub(1) / crate::frames::FRAME_FACTOR;
            if count % crate::frames::FRAME_FACTOR != 1 || dims[1] != latent_frames {
                return Err(Problem::new(
                    format!(
                        "{key}: {count} frames gave {} latent frames; musubi's Wan windows are \
                         N·4+1 frames, 1 + N latent frames",
                        dims[1]
                    ),
                    "precompute the clips with the wan2.1 card and target_frames of N·4+1",
                ));
            }
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
        let placement: Option<Placement> = match (&self.video, clip) {
            (Some((video, resolutions)), true) => video.place(resolutions, ow, oh),
            _ => rule.place(&self.resolutions, ow, oh),
        };
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
                    "{key}: {} puts a {ow}x{oh} {} in bucket {}x{}, the shards hold a {}x{} \
                     window",
                    self.to.name(),
                    if row.window.is_some() {
                        "clip"
                    } else {
                        "image"
                    },
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
        // A clip window's file is named after its clip, then the window (musubi's item key
        // `{stem}_{start:05d}-{count:03d}`).
        let (source, window) = match clip_window(&row.key).filter(|_| row.shape.len() == 4) {
            Some((clip, start, count)) => (clip, format!("_{start:05}-{count:03}")),
            None => (row.key.as_str(), String::new()),
        };
        let (key, container) = unpack_container(source);
        let Some(image) = crate::source::path_of(&self.out, &key) else {
            return Some(Err(unsafe_key()));
        };
        let Some(stem) = image.file_stem() else {
            return Some(Err(unsafe_key()));
        };
        let (w, h) = named_size(row);
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
        name.push(window);
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
        let dims = &row.shape;
        let [c, h, w] = image_dims(dims);
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
                &rescale.apply(&row.latent, dims),
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
                &rescale.apply(flip, dims),
            ));
        }
        npz::npz(&arrays)
    }

    /// musubi's `.safetensors` (cache_io.py): FLUX.2 `latents_{H}x{W}_float32` of (C, H, W)
    /// (`save_latent_cache_flux_2`), Z-Image `latents_1x{H}x{W}_float32` of (C, H, W)
    /// (`save_latent_cache_z_image`), Qwen-Image `latents_1x{H}x{W}_float32` of (C, 1, H, W)
    /// (`save_latent_cache_qwen_image`), Wan `latents_{F}x{H}x{W}_float32` of (C, F, H, W), an
    /// image's F = 1 (`save_latent_cache_wan`); metadata architecture, width, height,
    /// format_version, and a window's frame_count (`save_latent_cache_common`). float32, as
    /// musubi writes with `--vae_dtype float32` (its default is bfloat16; it trains on either).
    fn musubi_safetensors(&self, row: &StoredRow, rescale: &Rescale) -> Vec<u8> {
        let dims = &row.shape;
        let values = rescale.apply(&row.latent, dims);
        let (c, h, w) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
        let (key, shape) = match (self.arch, dims.len()) {
            (Arch::Flux2, _) => (format!("latents_{h}x{w}_float32"), vec![c, h, w]),
            (Arch::QwenImage, _) | (Arch::Wan, 3) => {
                (format!("latents_1x{h}x{w}_float32"), vec![c, 1, h, w])
            }
            (Arch::Wan, _) => (format!("latents_{}x{h}x{w}_float32", dims[1]), dims.clone()),
            _ => (format!("latents_1x{h}x{w}_float32"), vec![c, h, w]),
        };
        let mut metadata = vec![
            ("architecture", musubi_arch(self.arch).1.to_string()),
            ("width", named_size(row).0.to_string()),
            ("height", named_size(row).1.to_string()),
            ("format_version", "1.0.1".to_string()),
        ];
        if let Some((_, _, count)) = clip_window(&row.key).filter(|_| dims.len() == 4) {
            metadata.push(("frame_count", count.to_string()));
        }
        safetensors_f32(&key, &shape, &values, &metadata)
    }
}

/// One f32 tensor as a `.safetensors` file: the 8-byte header length, the JSON header (keys
/// sorted, `__metadata__` first, padded with spaces to 8 bytes as the safetensors crate pads),
/// the little-endian data. Written here rather than by `safetensors::serialize`, whose metadata
/// map comes out in a random order, so a rerun writes the same bytes and leaves files alone.
fn safetensors_f32(
    name: &str,
    shape: &[usize],
    values: &[f32],
    metadata: &[(&str, String)],
) -> Vec<u8> {
    let metadata: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str())))
        .collect();
    let header = serde_json::json!({
        "__metadata__": metadata,
        name: {"dtype": "F32", "shape": shape, "data_offsets": [0, values.len() * 4]},
    });
    let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + header.len() + values.len() * 4);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// The size a cache file is named by (and musubi records as `width`/`height`): an image's original
/// size, but a clip's bucket: its video caching reads the frames already resized to the bucket
/// (`load_video` with the bucket selector) and takes their size as the "original" one.
fn named_size(row: &StoredRow) -> (i32, i32) {
    if row.shape.len() == 4 {
        (row.width, row.height)
    } else {
        (row.orig_width, row.orig_height)
    }
}

/// An image row's `[C, h, w]` (clip windows are refused before kohya and diffusers files).
fn image_dims(dims: &[usize]) -> [usize; 3] {
    [dims[0], dims[dims.len() - 2], dims[dims.len() - 1]]
}

/// A clip window's key `<clip key>/<start:05d>-<count:03d>` (FORMAT.md) as (clip key, start,
/// count); None for other keys.
fn clip_window(key: &str) -> Option<(&str, usize, usize)> {
    let (clip, window) = key.rsplit_once('/')?;
    let (start, count) = window.split_once('-')?;
    let digits = |t: &str, width: usize| t.len() >= width && t.bytes().all(|b| b.is_ascii_digit());
    if clip.is_empty() || !digits(start, 5) || !digits(count, 3) {
        return None;
    }
    Some((clip, start.parse().ok()?, count.parse().ok()?))
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
        Arch::Wan => ("wan", "wan"),
        _ => ("zi", "z_image"),
    }
}

/// One Parquet file of the diffusers dataset: `model_input` as nested [C][h][w] float32 lists
/// (`latent · scaling_factor`, what the script's `compute_vae_encodings` returns), `original_sizes`
/// (h, w), `crop_top_lefts` (top, left), `text` (the caption) and `key`.
fn diffusers_part(rows: &[StoredRow], rescale: &Rescale) -> Result<Vec<u8>> {
    let [c, h, w] = image_dims(&rows[0].shape);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wan_metadata(
        width: &str,
        height: &str,
        frames: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let mut m = vec![
            ("architecture", "wan".to_string()),
            ("width", width.to_string()),
            ("height", height.to_string()),
            ("format_version", "1.0.1".to_string()),
        ];
        m.extend(frames.map(|f| ("frame_count", f.to_string())));
        m
    }

    /// (header as JSON, data bytes) of a `.safetensors` file.
    fn parts(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        (header, bytes[8 + n..].to_vec())
    }

    /// The fixture is what musubi's own `save_latent_cache_wan` wrote for this tensor
    /// (`benches/musubi_wan_check.py --fixture`); its metadata order is random, so the headers
    /// are compared as JSON and the data byte for byte.
    #[test]
    fn wan_latent_file_is_musubis() {
        let theirs = include_bytes!("../../tests/fixtures/musubi_wan_latent.safetensors");
        let values: Vec<f32> = (0..16 * 2 * 2 * 3)
            .map(|i| i as f32 * 0.25 - 10.0)
            .collect();
        let metadata = wan_metadata("64", "48", Some("5"));
        let ours = safetensors_f32("latents_2x2x3_float32", &[16, 2, 2, 3], &values, &metadata);
        assert_eq!(parts(&ours), parts(theirs));
        assert_eq!(ours.len() % 8, 0);
        let read = safetensors::SafeTensors::deserialize(&ours).unwrap();
        assert_eq!(
            read.tensor("latents_2x2x3_float32").unwrap().shape(),
            [16, 2, 2, 3]
        );
    }

    fn image_row(key: &str) -> StoredRow {
        StoredRow {
            key: key.to_string(),
            source_sha256: [0; 32],
            orig_width: 100,
            orig_height: 75,
            crop_top: 0,
            crop_left: 2,
            width: 64,
            height: 48,
            shape: vec![16, 6, 8],
            latent: (0..16 * 6 * 8).map(|i| i as f32).collect(),
            latent_flip: None,
            caption: None,
            window: None,
        }
    }

    /// An image row as musubi's Wan image datasets cache it: `{stem}_{W}x{H}_wan.safetensors`
    /// (the original size), `latents_1x{h}x{w}` of (C, 1, h, w), no frame_count; the same bytes
    /// on every run (the safetensors crate's metadata order changes from run to run, so a rerun
    /// rewrote every file).
    #[test]
    fn wan_image_rows_and_same_bytes_every_time() {
        let plan = Plan {
            to: Trainer::Musubi,
            arch: Arch::Wan,
            out: PathBuf::from("cache"),
            rule: None,
            resolutions: Vec::new(),
            video: None,
            side: 0,
        };
        let row = image_row("photos/a.b.jpg");
        let Some(Ok((path, None))) = plan.path(&row) else {
            panic!("no path")
        };
        assert_eq!(path, Path::new("cache/a.b_0100x0075_wan.safetensors"));
        let norm = Norm::scale_shift(0.0, 1.0);
        let rescale = Rescale::new(norm.clone(), Some(norm));
        let bytes = plan.musubi_safetensors(&row, &rescale);
        let (header, data) = parts(&bytes);
        assert_eq!(
            header["latents_1x6x8_float32"]["shape"],
            serde_json::json!([16, 1, 6, 8])
        );
        let metadata: serde_json::Map<_, _> = wan_metadata("100", "75", None)
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
            .collect();
        assert_eq!(header["__metadata__"], serde_json::Value::Object(metadata));
        assert_eq!(data.len(), 16 * 6 * 8 * 4);
        for _ in 0..8 {
            assert_eq!(plan.musubi_safetensors(&row, &rescale), bytes);
        }
    }

    /// A clip window: named `{clip stem}_{start}-{count}_{bucket W}x{H}_wan.safetensors` (musubi's
    /// video caching records the resized frames' size), `latents_{F}x{h}x{w}` of (C, F, h, w),
    /// `frame_count`; checked against musubi's clip rule (bucketed although the image rule
    /// says `enable_bucket = false`).
    #[test]
    fn wan_clip_windows() {
        let plan = Plan {
            to: Trainer::Musubi,
            arch: Arch::Wan,
            out: PathBuf::from("cache"),
            rule: Some(TrainerBuckets::Musubi(MusubiBuckets {
                resolution: (80, 48),
                enable_bucket: false,
                no_upscale: false,
                steps: MusubiBuckets::STEPS,
            })),
            resolutions: vec![(80, 48)],
            video: None,
            side: 0,
        };
        let video = TrainerBuckets::Musubi(MusubiBuckets {
            resolution: (80, 48),
            enable_bucket: true,
            no_upscale: false,
            steps: MusubiBuckets::STEPS,
        });
        let plan = Plan {
            video: Some((video.clone(), video.resolutions())),
            ..plan
        };
        let bucket = video.place(&video.resolutions(), 1280, 960).unwrap().bucket;
        assert_ne!(bucket, (80, 48), "the image rule's only bucket");
        let (bw, bh) = (bucket.0 as usize, bucket.1 as usize);
        let clip_row = |key: &str| StoredRow {
            key: key.into(),
            orig_width: 1280,
            orig_height: 960,
            crop_left: 0,
            crop_top: 0,
            width: bucket.0 as i32,
            height: bucket.1 as i32,
            shape: vec![16, 2, bh / 8, bw / 8],
            window: Some(crate::format::WindowMeta {
                start: 4,
                count: 5,
                indices: vec![4, 5, 6, 7, 8],
                source_fps: 16.0,
                fps: 16.0,
            }),
            latent: vec![0.5; 16 * 2 * (bh / 8) * (bw / 8)],
            ..image_row("unused")
        };
        let row = clip_row("clips/a_b.mp4/00004-005");
        if let Err(p) = plan.check(&row) {
            panic!("{} / {}", p.what, p.fix);
        }
        let Some(Ok((path, None))) = plan.path(&row) else {
            panic!("no path")
        };
        let name = format!(
            "a_b_00004-005_{:04}x{:04}_wan.safetensors",
            bucket.0, bucket.1
        );
        assert_eq!(path, Path::new("cache").join(name));
        let norm = Norm::scale_shift(0.0, 1.0);
        let (header, data) =
            parts(&plan.musubi_safetensors(&row, &Rescale::new(norm.clone(), Some(norm))));
        let key = format!("latents_2x{}x{}_float32", bh / 8, bw / 8);
        assert_eq!(
            header[&key]["shape"],
            serde_json::json!([16, 2, bh / 8, bw / 8])
        );
        let (w, h) = (bucket.0.to_string(), bucket.1.to_string());
        let metadata: serde_json::Map<_, _> = wan_metadata(&w, &h, Some("5"))
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
            .collect();
        assert_eq!(header["__metadata__"], serde_json::Value::Object(metadata));
        assert_eq!(data.len(), row.latent.len() * 4);
        let six = clip_row("clips/a_b.mp4/00004-006");
        assert!(plan.check(&six).unwrap_err().what.contains("N·4+1"));
    }

    #[test]
    fn window_keys() {
        assert_eq!(
            clip_window("clips/a_b.mp4/00004-005"),
            Some(("clips/a_b.mp4", 4, 5))
        );
        assert_eq!(
            clip_window("x.mkv/123456-1001"),
            Some(("x.mkv", 123_456, 1001))
        );
        for key in [
            "photos/2024-001.jpg",
            "a/0004-005",
            "/00000-001",
            "00000-001",
            "a/00000-01",
        ] {
            assert_eq!(clip_window(key), None, "{key}");
        }
    }
}
