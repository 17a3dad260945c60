//! The command line: parses arguments and calls the library. Nothing else lives here.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use vae_pipeline::config::{
    AlphaPolicy, CropPlacement, LatentMode, PrecomputeConfig, ResizePolicy, StorageDType,
};
use vae_pipeline::convert::{self, ConvertArgs};
use vae_pipeline::export::{self, ExportArgs};
use vae_pipeline::frames::{FrameExtraction, FrameOptions};
use vae_pipeline::model::ModelCard;
use vae_pipeline::report::{self, ReportArgs};
use vae_pipeline::runtime::Device;
use vae_pipeline::{set, throughput, verify};

#[derive(Parser)]
#[command(
    name = "vae-pipeline",
    version,
    about = "Image folders → normalized VAE latents in Parquet shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode every image under --input into latent shards under --out.
    Precompute(Box<PrecomputeArgs>),
    /// Create a many-worker run's plan in --out ahead of its workers (same flags as precompute,
    /// with --partitions N); prints the partition and unit counts.
    Plan(Box<PrecomputeArgs>),
    /// Where a many-worker run stands: done, running and missing partitions, and the sbatch
    /// lines that run the missing ones.
    Status {
        /// The --out of the run.
        shards: PathBuf,
        /// Print JSON: {partitions, units, done, running, missing, rows, resubmit, finalized}.
        #[arg(long)]
        json: bool,
        /// Slurm's MaxArraySize: resubmit lines are split into windows of this many indices.
        #[arg(long, default_value_t = vae_pipeline::set::MAX_ARRAY_SIZE)]
        max_array_size: usize,
    },
    /// Complete a many-worker run once every partition is done: _errors.jsonl, _manifest.jsonl,
    /// then _SUCCESS (refused while partitions are missing).
    Finalize {
        /// The --out of the run.
        shards: PathBuf,
    },
    /// Encode and decode images or clips (or decode stored shards) and report reconstruction
    /// quality: PSNR, SSIM, latent statistics (clips: per frame, and temporal flicker) and a
    /// self-contained HTML page under --out.
    Report {
        #[command(flatten)]
        args: Box<ReportArgs>,
        /// The clip flags of `precompute`: given, the report runs on clips.
        #[command(flatten)]
        frames: ClipArgs,
    },
    /// Check a shard set is complete and sane; prints a one-line verdict, exits non-zero on any problem.
    Verify {
        /// The --out folder of a precompute run.
        shards: PathBuf,
    },
    /// Show what a shard set holds: rows per shape, latent type, model, normalization, errors, config.
    Inspect {
        /// The --out folder of a precompute run.
        shards: PathBuf,
    },
    /// Encoder-only throughput on synthetic batches (no files, decoding or writing): the ceiling
    /// for `precompute`. Prints one JSON line.
    BenchEncoder(BenchEncoderArgs),
    /// Show what this binary finds: the ONNX Runtime library and its execution providers, CUDA,
    /// and the model card folders it searches.
    Doctor,
    /// Write a trainer's own latent cache from a shard set: kohya sd-scripts .npz, musubi-tuner
    /// .safetensors, or a Parquet dataset for the diffusers SDXL script.
    Convert(ConvertArgs),
    /// Convert a VAE checkpoint (diffusers folder or single .safetensors) into encoder/decoder
    /// ONNX files and a model card; --inspect drafts a card for an ONNX file made elsewhere.
    Export(ExportArgs),
    /// What this binary sees in a clip, as JSON: size, rotation, fps, codec, frame times; with
    /// --frames FILE also every decoded frame's upright RGB bytes (diagnostics and tests).
    #[command(hide = true)]
    ProbeClip {
        clip: PathBuf,
        #[arg(long)]
        frames: Option<PathBuf>,
    },
}

#[derive(Args)]
struct BenchEncoderArgs {
    /// Model card: a name in models/ or a card TOML path.
    #[arg(long, default_value = "taef2")]
    model: String,
    /// Side of the square images.
    #[arg(long, default_value_t = 256)]
    size: u32,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Images to encode (after one warm-up batch per session).
    #[arg(long, default_value_t = 64)]
    images: usize,
    /// ONNX Runtime intra-op threads per session; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda, cuda:N or cuda:0,1,…, then CUDA options (nhwc=, algo=, fuse_conv_bias=, cuda_graph=, tf32=, sessions=).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Flags override the preset (--pipeline), which overrides the defaults shown here.
#[derive(Args)]
struct PrecomputeArgs {
    /// Folder of images (walked recursively; symlinks followed), or an image, WebDataset tar (.tar, .tar.gz) or Parquet file, a glob ('data/*.tar') or a brace range ('data/{00000..00099}.tar').
    #[arg(long)]
    input: Option<PathBuf>,
    /// Parquet inputs: the image column (an Image struct {bytes, path} or binary) [default: detected].
    #[arg(long)]
    image_column: Option<String>,
    /// Parquet inputs: the column whose values key the rows [default: `key` if present, else the row index].
    #[arg(long)]
    key_column: Option<String>,
    /// Parquet inputs: the caption column [default: `caption` or `text` if present].
    #[arg(long)]
    caption_column: Option<String>,
    /// Output folder for shards, _errors.jsonl, _manifest.jsonl and _SUCCESS.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model card: a name in models/ (taef2, taef2-fp16, tiny-kl, sd15, sdxl, …) or a card TOML path [default: taef2].
    #[arg(long)]
    model: Option<String>,
    /// Preset TOML with any of these settings (see pipelines/).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Side of the square fed to the encoder, in pixels; a multiple of the card's spatial_factor [default: 256].
    #[arg(long)]
    size: Option<u32>,
    /// How images become size×size [default: center-crop].
    #[arg(long, value_enum)]
    resize: Option<ResizePolicy>,
    /// Images per encoder call; on CPUs larger batches only cost memory, GPUs want 32 or more [default: 4].
    #[arg(long)]
    batch_size: Option<usize>,
    /// For moments encoders (AutoencoderKL): store the mean, a seeded sample, or mean and std [default: mean].
    #[arg(long, value_enum)]
    latent_mode: Option<LatentMode>,
    /// Storage type of latents; bf16 is stored as its uint16 bits [default: f16].
    #[arg(long, value_enum)]
    dtype: Option<StorageDType>,
    /// Seed for --latent-mode sample (combined with each image's key) [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Rows per Parquet shard before a new one starts [default: 4096].
    #[arg(long)]
    shard_rows: Option<usize>,
    /// Threads for decoding and ONNX Runtime together; 0 = all cores [default: 0].
    #[arg(long)]
    threads: Option<usize>,
    /// Transparent pixels: composite on white or black, or refuse the image [default: white].
    #[arg(long, value_enum)]
    alpha: Option<AlphaPolicy>,
    /// Refuse images whose shorter side is below N pixels (kind too_small); 0 upscales all [default: 0].
    #[arg(long)]
    min_size: Option<u32>,
    /// Refuse images with more pixels than this, judged from the header (kind too_large) [default: 178956970].
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Exit non-zero (and write no _SUCCESS) when more than this fraction of inputs failed [default: 1.0].
    #[arg(long)]
    max_failures: Option<f64>,
    /// Bucket list for --resize bucket: `sdxl` (the SDXL 1024² list), a file of WxH lines, or a trainer's own buckets, choice and crop at --bucket-res: `kohya` (sd-scripts --enable_bucket; --bucket-step, --no-upscale, --min/--max-bucket-reso are its numbers) or `musubi` (musubi-tuner's BucketSelector) [default: generated].
    #[arg(long)]
    buckets: Option<String>,
    /// --buckets kohya: kohya's --min_bucket_reso [default: 256].
    #[arg(long)]
    min_bucket_reso: Option<u32>,
    /// --buckets kohya: kohya's --max_bucket_reso (SDXL configs usually set 2048) [default: 1024].
    #[arg(long)]
    max_bucket_reso: Option<u32>,
    /// Generated buckets: every WxH with sides multiple of --bucket-step and W·H ≤ R² (0 = --size) [default: 0].
    #[arg(long)]
    bucket_res: Option<u32>,
    /// Side step of generated buckets, in pixels [default: 64].
    #[arg(long)]
    bucket_step: Option<u32>,
    /// Largest aspect ratio of generated buckets [default: 4.0].
    #[arg(long)]
    max_aspect: Option<f64>,
    /// Crop placement inside a bucket: center, or random from (seed, key) [default: center].
    #[arg(long, value_enum)]
    crop: Option<CropPlacement>,
    /// Keep small images in smaller buckets instead of upscaling them.
    #[arg(long)]
    no_upscale: bool,
    /// Also encode the horizontally mirrored image into a `latent_flip` column.
    #[arg(long)]
    flip: bool,
    /// CSV or Parquet with columns key, caption; overrides sidecar NAME.txt / NAME.caption.
    #[arg(long)]
    captions: Option<PathBuf>,
    /// Encode identical source files once; later copies are listed as `duplicate` in _errors.jsonl.
    #[arg(long)]
    dedupe: bool,
    /// At most N inputs, in key order (0 = all) [default: 0].
    #[arg(long)]
    limit: Option<usize>,
    /// JPEGs decode at a reduced DCT scale (libjpeg-turbo) while still holding this many times the resize target, as Pillow's `reducing_gap`; 0 = always full size [default: 3.0].
    #[arg(long)]
    reducing_gap: Option<f32>,
    /// Where the encoder runs: cpu, cuda, cuda:N, or cuda:0,1,… fed from one queue, then CUDA options: cuda:0,nhwc=1,algo=heuristic|exhaustive,fuse_conv_bias=0,tf32=1,sessions=2 [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// How latent columns are stored: none, zstd[:LEVEL] or split-zstd[:LEVEL] (BYTE_STREAM_SPLIT, then zstd) [default: zstd:3].
    #[arg(long, value_parser = vae_pipeline::format::LatentCompression::parse)]
    latent_compression: Option<vae_pipeline::format::LatentCompression>,
    /// Split the run into N partitions written by separate workers (Slurm, Kubernetes, Ray); every worker passes the same N [default: 0 = one process].
    #[arg(long)]
    partitions: Option<usize>,
    /// The partitions this worker runs: I, I,J or I-J [default: from SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX, SLURM_PROCID or RANK].
    #[arg(long)]
    partition: Option<String>,
    /// Added to the array or job index: arrays longer than Slurm's MaxArraySize [default: 0].
    #[arg(long)]
    partition_offset: Option<usize>,
    #[command(flatten)]
    frames: ClipArgs,
    /// Replace an output folder made with a different config instead of refusing it.
    #[arg(long)]
    overwrite: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// The clip flags: musubi-tuner's frame options (`frames::FrameOptions`).
#[derive(Args)]
struct ClipArgs {
    /// Clips: window lengths in frames, each N·4+1 (musubi's target_frames); setting any clip flag (or a preset [video] table) makes the run encode clips with the card's temporal VAE [default: 1].
    #[arg(long, value_delimiter = ',')]
    target_frames: Option<Vec<usize>>,
    /// Clips: which windows each clip gives, as musubi-tuner's frame_extraction [default: head].
    #[arg(long, value_enum)]
    frame_extraction: Option<FrameExtraction>,
    /// Clips, --frame-extraction slide: frames between window starts [default: 1].
    #[arg(long)]
    frame_stride: Option<usize>,
    /// Clips, --frame-extraction uniform: windows per clip and target length [default: 1].
    #[arg(long)]
    frame_sample: Option<usize>,
    /// Clips, --frame-extraction full: the most frames one window takes [default: 129].
    #[arg(long)]
    max_frames: Option<usize>,
    /// Clips: the frame rate every clip is taken to have (musubi's source_fps); set, frames are kept or dropped by index toward --target-fps as musubi does, whatever the clip's timestamps [default: none: every frame].
    #[arg(long)]
    source_fps: Option<f64>,
    /// Clips: the frame rate windows are sampled at when --source-fps is set (Wan trains at 16) [default: 16].
    #[arg(long)]
    target_fps: Option<f64>,
}

impl ClipArgs {
    /// Any flag given turns the run into a clip run (`config.video`), over the preset's values.
    fn apply(self, c: &mut PrecomputeConfig) {
        let given = self.target_frames.is_some()
            || self.frame_extraction.is_some()
            || self.frame_stride.is_some()
            || self.frame_sample.is_some()
            || self.max_frames.is_some()
            || self.source_fps.is_some()
            || self.target_fps.is_some();
        if !given {
            return;
        }
        let video = c.video.get_or_insert_with(FrameOptions::default);
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field {
                video.$field = v;
                c.origin.preset_keys.remove(stringify!($field));
            } )* };
        }
        set!(target_frames, max_frames, target_fps);
        for (value, field, name) in [
            (self.frame_stride, &mut video.stride, "frame_stride"),
            (self.frame_sample, &mut video.sample, "frame_sample"),
        ] {
            if let Some(v) = value {
                *field = v;
                c.origin.preset_keys.remove(name);
            }
        }
        if let Some(v) = self.frame_extraction {
            video.extraction = v;
            c.origin.preset_keys.remove("frame_extraction");
        }
        if self.source_fps.is_some() {
            video.source_fps = self.source_fps;
            c.origin.preset_keys.remove("source_fps");
        }
    }
}

impl PrecomputeArgs {
    fn into_config(self) -> Result<(PrecomputeConfig, bool)> {
        let mut c = match &self.pipeline {
            Some(path) => PrecomputeConfig::from_preset(path)?,
            None => PrecomputeConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field {
                c.$field = v;
                c.set_by_flag(stringify!($field));
            } )* };
        }
        set!(
            input,
            out,
            model,
            size,
            resize,
            batch_size,
            latent_mode,
            dtype,
            seed,
            shard_rows,
            threads,
            alpha,
            min_size,
            max_pixels,
            max_failures,
            bucket_res,
            bucket_step,
            max_aspect,
            crop,
            limit,
            reducing_gap,
            device,
            latent_compression,
            partitions,
            partition_offset
        );
        if self.partition.is_some() {
            c.partition = self.partition;
            c.set_by_flag("partition");
        }
        if self.buckets.is_some() {
            c.buckets = self.buckets;
            c.set_by_flag("buckets");
        }
        for (value, field, name) in [
            (
                self.min_bucket_reso,
                &mut c.min_bucket_reso,
                "min_bucket_reso",
            ),
            (
                self.max_bucket_reso,
                &mut c.max_bucket_reso,
                "max_bucket_reso",
            ),
        ] {
            if value.is_some() {
                *field = value;
                c.origin.preset_keys.remove(name);
            }
        }
        if self.captions.is_some() {
            c.captions = self.captions;
            c.set_by_flag("captions");
        }
        for (value, field, name) in [
            (self.image_column, &mut c.image_column, "image_column"),
            (self.key_column, &mut c.key_column, "key_column"),
            (self.caption_column, &mut c.caption_column, "caption_column"),
        ] {
            if value.is_some() {
                *field = value;
                c.origin.preset_keys.remove(name);
            }
        }
        for (on, field) in [
            (self.no_upscale, "no_upscale"),
            (self.flip, "flip"),
            (self.dedupe, "dedupe"),
        ] {
            if on {
                c.set_by_flag(field);
            }
        }
        self.frames.apply(&mut c);
        c.no_upscale |= self.no_upscale;
        c.flip |= self.flip;
        c.dedupe |= self.dedupe;
        c.overwrite = self.overwrite;
        Ok((c, self.print_config))
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Precompute(args) => {
            let (config, print_only) = args.into_config()?;
            if print_only {
                print_out(&config.to_toml());
                return Ok(());
            }
            set::precompute(&config)?.print();
            Ok(())
        }
        Command::Plan(args) => {
            let (config, _) = args.into_config()?;
            let plan = set::make_plan(&config)?;
            print_out(&format!(
                "plan: {} partitions over {} units (about {} each) in {}\n",
                plan.partitions,
                plan.units,
                plan.units.div_ceil(plan.partitions.max(1)),
                config.out.display()
            ));
            Ok(())
        }
        Command::Status {
            shards,
            json,
            max_array_size,
        } => {
            let status = set::status(&shards, max_array_size)?;
            if json {
                print_out(&(serde_json::to_string(&status)? + "\n"));
            } else {
                print_out(&status.text(&shards));
            }
            Ok(())
        }
        Command::Finalize { shards } => {
            let done = set::finalize(&shards)?;
            eprintln!(
                "finalized {}: {} partitions, {} rows in {} shards{}",
                shards.display(),
                done.partitions,
                done.rows,
                done.shards,
                if done.cross_partition_duplicates > 0 {
                    format!(
                        ", {} cross-partition duplicates dropped (--dedupe)",
                        done.cross_partition_duplicates
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::Report { mut args, frames } => {
            let mut clips = PrecomputeConfig::default();
            frames.apply(&mut clips);
            args.video = clips.video;
            report::run(&args)?.print(&args.out);
            Ok(())
        }
        Command::Verify { shards } => {
            let verdict = verify::verify(&shards)?;
            let _ = std::io::stderr().write_all(verdict.problem_lines().as_bytes());
            print_out(&verdict.line(&shards));
            anyhow::ensure!(verdict.ok(), "{} failed verification", shards.display());
            Ok(())
        }
        Command::Inspect { shards } => {
            print_out(&verify::inspect(&shards)?);
            Ok(())
        }
        Command::BenchEncoder(a) => {
            let card = ModelCard::resolve(&a.model)?;
            let device = Device::parse(&a.device)?;
            let threads = match (a.threads, &device) {
                (0, Device::Cpu) => std::thread::available_parallelism().map_or(1, |n| n.get()),
                (0, Device::Cuda(_)) => 1,
                (n, _) => n,
            };
            let t = throughput::encoder_throughput(
                &card,
                &device,
                threads,
                a.size,
                a.batch_size,
                a.images,
            )?;
            println!("{}", serde_json::to_string(&t)?);
            Ok(())
        }
        Command::Doctor => vae_pipeline::doctor::run(),
        Command::ProbeClip { clip, frames } => {
            vae_pipeline::video::probe_clip(&clip, frames.as_deref())
        }
        Command::Convert(args) => {
            convert::run(&args)?.print();
            Ok(())
        }
        Command::Export(args) => {
            if let Some(summary) = export::run(&args)? {
                summary.print();
            }
            Ok(())
        }
    }
}

/// Writes to stdout; a closed pipe (`| head -1`) is the reader's choice, not an error.
fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
