//! Convert: takes a shard set, hands on a trainer's own latent cache: kohya sd-scripts `.npz`
//! files, musubi-tuner `.safetensors` files, or a Parquet dataset for the diffusers SDXL script.
//! Everything that can be refused (latent mode, model family, geometry the trainer would not
//! give, unsafe or clashing file names) is refused before anything is written; then rows stream
//! through a batch at a time, files are written in parallel, whole (temporary name, rename), and
//! a file that already holds the same bytes is left alone, so a rerun resumes.

mod buckets;
mod npz;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema};
use rayon::prelude::*;

use self::buckets::{KohyaBuckets, MusubiBuckets, Placement};
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
    /// FLUX.1 Kontext (musubi `flux_kontext`).
    FluxKontext,
    /// Z-Image (musubi `z_image`), on the FLUX.1 autoencoder.
    ZImage,
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
            Arch::Sd3 | Arch::Flux | Arch::FluxKontext | Arch::ZImage => 16,
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
    /// The trainer's training resolution, `W` or `W,H` (kohya `--resolution`, musubi
    /// `resolution`) [default: the shards' --size].
    #[arg(long)]
    pub resolution: Option<String>,
    /// The trainer buckets by aspect ratio (kohya `--enable_bucket`, musubi `enable_bucket`).
    #[arg(long)]
    pub enable_bucket: bool,
    /// kohya `--min_bucket_reso`.
    #[arg(long, default_value_t = 256)]
    pub min_bucket_reso: u32,
    /// kohya `--max_bucket_reso` (SDXL configs usually set 2048).
    #[arg(long, default_value_t = 1024)]
    pub max_bucket_reso: u32,
    /// kohya `--bucket_reso_steps`.
    #[arg(long, default_value_t = 64)]
    pub bucket_reso_steps: u32,
    /// Threads writing files; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// What a conversion did.
#[derive(Debug, Default)]
pub struct ConvertSummary {
    pub written: usize,
    /// Files that already held the same bytes.
    pub unchanged: usize,
    pub out: PathBuf,
}

impl ConvertSummary {
    pub fn print(&self) {
        eprintln!(
            "wrote {} file(s), {} already up to date, in {}",
            self.written,
            self.unchanged,
            self.out.display()
        );
    }
}

/// How stored latents become the trainer's values: `z = stored / scale + shift`, then
/// `(z − shift') · scale'`; FLUX.2's normalized latents pass through.
#[derive(Debug, Clone, Copy)]
struct Rescale {
    from: (f32, f32),
    to: Option<(f32, f32)>,
}

impl Rescale {
    fn apply(&self, stored: &[f32]) -> Vec<f32> {
        let Some((shift, scale)) = self.to else {
            return stored.to_vec();
        };
        let (from_scale, from_shift) = self.from;
        stored
            .iter()
            .map(|&s| (s / from_scale + from_shift - shift) * scale)
            .collect()
    }
}

/// Runs `convert`.
pub fn run(args: &ConvertArgs) -> Result<ConvertSummary> {
    let set = ShardSet::open(&args.shards)?;
    let identity = &set.info.identity;
    let meta = &set.info.metadata;
    let batch_norm = identity.model.batch_norm.is_some();
    if identity.model.latents_mean.is_some() {
        bail!(
            "the shards were normalized per channel (`latents_mean`/`latents_std`, a Qwen-Image or \
             Wan card: {}); no trainer cache this converter writes holds those latents",
            meta.normalization
        );
    }
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
    let supported: &[Arch] = match args.to {
        Trainer::Kohya => &[Arch::Sd, Arch::Sdxl, Arch::Sd3, Arch::Flux],
        Trainer::Musubi => &[Arch::Flux2, Arch::FluxKontext, Arch::ZImage],
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
        (Trainer::Kohya, Arch::Flux) | (Trainer::Musubi, Arch::FluxKontext) => {
            Some((0.1159, 0.3611))
        }
        (Trainer::Diffusers, Arch::Sd) => Some((0.0, 0.18215)),
        (Trainer::Diffusers, Arch::Sdxl) => Some((0.0, 0.13025)),
        _ => Some((0.0, 1.0)),
    };
    let rescale = Rescale {
        from: (meta.scaling_factor, meta.shift_factor),
        to,
    };
    let resolution = parse_resolution(args.resolution.as_deref(), identity.framing.size)?;
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
    let plan = Plan::new(args, arch, resolution, &out)?;
    let mut names: HashMap<PathBuf, String> = HashMap::new();
    let mut problems = Vec::new();
    let mut shapes = std::collections::BTreeSet::new();
    set.for_each_chunk(4096, usize::MAX, false, |rows| {
        for row in rows {
            shapes.insert((row.width, row.height));
            // Shard sets come from strangers: a key that breaks FORMAT.md's rule names no file.
            if let Some(why) = crate::source::key_problem(&row.key) {
                problems.push(format!("{:?}: not a valid key ({why})", row.key));
                continue;
            }
            if let Err(e) = plan.check(&row) {
                problems.push(format!("{}: {e}", row.key));
                continue;
            }
            if let Some(path) = plan.path(&row)? {
                if let Some(other) = names.insert(path.clone(), row.key.clone()) {
                    problems.push(format!(
                        "{} and {other} both become {}",
                        row.key,
                        path.display()
                    ));
                }
            }
        }
        Ok(())
    })?;
    if args.to == Trainer::Diffusers && shapes.len() > 1 {
        problems.push(format!(
            "the shards hold {} window sizes; the diffusers script trains at one square resolution",
            shapes.len()
        ));
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(8).collect();
        bail!(
            "{} row(s) cannot be written as a {} {} cache, nothing was written:\n  {}{}",
            problems.len(),
            args.to.name(),
            arch.name(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            if problems.len() > shown.len() {
                "\n  …"
            } else {
                ""
            }
        );
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
    if args.to == Trainer::Diffusers {
        let mut part = 0;
        set.for_each_chunk(1024, usize::MAX, true, |rows| {
            let bytes = diffusers_part(&rows, rescale)?;
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
                    let path = plan.path(row)?.expect("checked above");
                    let bytes = match args.to {
                        Trainer::Kohya => plan.kohya_npz(row, rescale),
                        _ => plan.musubi_safetensors(row, rescale)?,
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

/// The checked conversion: where files go and what geometry the trainer gives each image.
struct Plan {
    to: Trainer,
    arch: Arch,
    out: PathBuf,
    kohya: KohyaBuckets,
    musubi: MusubiBuckets,
    resolutions: Vec<(u32, u32)>,
    resolution: (u32, u32),
}

impl Plan {
    fn new(args: &ConvertArgs, arch: Arch, resolution: (u32, u32), out: &Path) -> Result<Self> {
        let kohya = KohyaBuckets {
            resolution,
            enable_bucket: args.enable_bucket,
            min_bucket_reso: args.min_bucket_reso,
            max_bucket_reso: args.max_bucket_reso,
            bucket_reso_steps: args.bucket_reso_steps,
        };
        let musubi = MusubiBuckets {
            resolution,
            enable_bucket: args.enable_bucket,
            steps: 16,
        };
        if args.bucket_reso_steps == 0 || args.min_bucket_reso == 0 {
            bail!("--bucket-reso-steps and --min-bucket-reso must be positive");
        }
        let resolutions = match args.to {
            Trainer::Kohya => kohya.resolutions(),
            Trainer::Musubi => musubi.resolutions(),
            Trainer::Diffusers => vec![resolution],
        };
        Ok(Plan {
            to: args.to,
            arch,
            out: out.to_path_buf(),
            kohya,
            musubi,
            resolutions,
            resolution,
        })
    }

    /// What the trainer does with an image of the row's original size.
    fn placement(&self, w: u32, h: u32) -> Placement {
        match self.to {
            Trainer::Kohya => self.kohya.place(&self.resolutions, w, h),
            Trainer::Musubi => self.musubi.place(&self.resolutions, w, h),
            Trainer::Diffusers => Placement {
                bucket: self.resolution,
                resized: (w, h),
                crop: (0, 0),
            },
        }
    }

    /// The row is what the trainer would have cached for its image, or why not.
    fn check(&self, row: &StoredRow) -> Result<()> {
        let [c, h, w] = row.shape;
        let f = self.arch.factor() as usize;
        if c != self.arch.channels() {
            bail!(
                "{c} latent channels; {} latents have {}",
                self.arch.name(),
                self.arch.channels()
            );
        }
        if (h * f, w * f) != (row.height as usize, row.width as usize) {
            bail!(
                "a {}x{} window gave a {w}x{h} latent; {} latents are 1/{f} of the window",
                row.width,
                row.height,
                self.arch.name()
            );
        }
        if self.to == Trainer::Diffusers {
            if row.width as u32 != self.resolution.0 || row.height != row.width {
                bail!(
                    "a {}x{} window; the diffusers script trains on {}x{} squares (--resolution)",
                    row.width,
                    row.height,
                    self.resolution.0,
                    self.resolution.0
                );
            }
            return Ok(());
        }
        if row.crop_top < 0 || row.crop_left < 0 {
            bail!("padded (negative crop offsets); trainers crop, they do not pad");
        }
        let p = self.placement(row.orig_width as u32, row.orig_height as u32);
        if (row.width as u32, row.height as u32) != p.bucket {
            bail!(
                "{} puts a {}x{} image in bucket {}x{}, the shards hold a {}x{} window: pass \
                 the bucket settings you train with (--resolution, --enable-bucket{}), or \
                 precompute with those buckets",
                self.to.name(),
                row.orig_width,
                row.orig_height,
                p.bucket.0,
                p.bucket.1,
                row.width,
                row.height,
                if self.to == Trainer::Kohya {
                    ", --min/--max-bucket-reso, --bucket-reso-steps"
                } else {
                    ""
                }
            );
        }
        if (row.crop_left as u32, row.crop_top as u32) != p.crop {
            bail!(
                "{} crops the centre at ({}, {}), the shards at ({}, {}) (a random crop?)",
                self.to.name(),
                p.crop.0,
                p.crop.1,
                row.crop_left,
                row.crop_top
            );
        }
        Ok(())
    }

    /// The file a row becomes (None for the diffusers dataset, written in parts). Keys name
    /// files only through `source::path_of`, which refuses `..`, absolute and empty components.
    fn path(&self, row: &StoredRow) -> Result<Option<PathBuf>> {
        if self.to == Trainer::Diffusers {
            return Ok(None);
        }
        let image = crate::source::path_of(&self.out, &row.key)
            .with_context(|| format!("key {:?} is not a safe relative path", row.key))?;
        let stem = image
            .file_stem()
            .with_context(|| format!("key {:?} has no file name", row.key))?;
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
        Ok(Some(dir.join(name)))
    }

    /// kohya's `.npz` (strategy_base.py `save_latents_to_disk`): `latents` (C,h,w) f32,
    /// `original_size` [W,H], `crop_ltrb`, `latents_flipped`; SD3 and FLUX suffix every key
    /// with `_{h}x{w}` (strategy_sd3.py / strategy_flux.py: multi-resolution caches).
    fn kohya_npz(&self, row: &StoredRow, rescale: Rescale) -> Vec<u8> {
        let [c, h, w] = row.shape;
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
                &rescale.apply(&row.latent),
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
                &rescale.apply(flip),
            ));
        }
        npz::npz(&arrays)
    }

    /// musubi's `.safetensors` (cache_io.py `save_latent_cache_*`): one tensor
    /// `latents_{F}x{H}x{W}_float32` of shape (C, F, H, W), FLUX.2 `latents_{H}x{W}_float32` of
    /// (C, H, W); metadata architecture, width, height, format_version.
    fn musubi_safetensors(&self, row: &StoredRow, rescale: Rescale) -> Result<Vec<u8>> {
        let [c, h, w] = row.shape;
        let values = rescale.apply(&row.latent);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (key, shape) = if self.arch == Arch::Flux2 {
            (format!("latents_{h}x{w}_float32"), vec![c, h, w])
        } else {
            (format!("latents_1x{h}x{w}_float32"), vec![c, 1, h, w])
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

/// musubi's short and full architecture names (dataset/architectures.py).
fn musubi_arch(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::Flux2 => ("f2d", "flux_2_dev"),
        Arch::FluxKontext => ("fk", "flux_kontext"),
        _ => ("zi", "z_image"),
    }
}

/// One Parquet file of the diffusers dataset: `model_input` as nested [C][h][w] float32 lists
/// (`latent · scaling_factor`, what the script's `compute_vae_encodings` returns), `original_sizes`
/// (h, w), `crop_top_lefts` (top, left), `text` (the caption) and `key`.
fn diffusers_part(rows: &[StoredRow], rescale: Rescale) -> Result<Vec<u8>> {
    let [c, h, w] = rows[0].shape;
    let values: Vec<f32> = rows.iter().flat_map(|r| rescale.apply(&r.latent)).collect();
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
