//! Plan: the pre-flight of a `precompute` run. Takes a `PrecomputeConfig`, hands on a checked
//! `RunPlan`: the source, the model and its open encoder sessions, the run identity, the shard
//! metadata, the row maker and the state of `--out`. Every check that can fail runs here, and
//! nothing is written: a refused run leaves the output folder as it was.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::config::{LatentMode, PrecomputeConfig};
use crate::encode::Encoder;
use crate::format::{Scope, PLAN};
use crate::format::{ShardMetadata, TensorColumns, FORMAT_VERSION};
use crate::frames::FrameOptions;
use crate::identity::{ModelIdentity, RunIdentity};
use crate::model::{EncoderOutput, ModelCard};
use crate::partition_files::PartitionPlan;
use crate::resize::Framing;
use crate::resume::{self, OutputState};
use crate::rows::RowMaker;
use crate::runtime::Device;
use crate::sidecar::SidecarSchema;
use crate::source::{ParquetColumns, Source};
use crate::store::ShardStore;

/// A batch's input tensor may take at most this many bytes; more is a configuration mistake
/// (an allocation failure mid-run otherwise).
const MAX_BATCH_BYTES: u64 = 4 << 30;

/// Everything a run needs, checked.
pub struct RunPlan {
    pub config: PrecomputeConfig,
    /// `--input` as given.
    pub input: PathBuf,
    pub source: Box<dyn Source + Send>,
    pub card: ModelCard,
    pub encoders: Vec<Encoder>,
    pub decode_threads: usize,
    pub encode_threads: usize,
    pub identity: RunIdentity,
    pub metadata: ShardMetadata,
    pub rows: RowMaker,
    pub tensors: TensorColumns,
    /// Listed inputs (samples and failures), at most `--limit`.
    pub inputs: usize,
    /// Where the shards go (`--out`: a folder or an `s3://` prefix, reachable: checked here).
    pub out: Arc<dyn ShardStore>,
    pub output: OutputState,
}

/// How the thread budget is split between the decode pool and each ONNX Runtime session. On
/// the CPU both get every thread (the encoder is the bottleneck for any real VAE; ONNX Runtime
/// does not spin while waiting, so the pool takes the cores whenever the encoder waits for a
/// batch, and docs/performance.md "Measured on CPUs" shows the measurements behind this). On GPUs the sessions need
/// one thread each for the few CPU-side nodes and decoding gets the cores.
pub fn thread_split(budget: usize, device: &Device) -> (usize, usize) {
    match device {
        Device::Cpu => (budget.max(1), budget.max(1)),
        Device::Cuda(_) => (budget.max(1), 1),
    }
}

/// Checks everything before any work; writes nothing, except that a partition's worker creates
/// the many-worker plan when it is the first (`partition_files::PartitionPlan::ensure`).
pub fn plan(config: &PrecomputeConfig, scope: Scope) -> Result<RunPlan> {
    config.validate()?;
    let columns = ParquetColumns {
        image: config.image_column.clone(),
        key: config.key_column.clone(),
        caption: config.caption_column.clone(),
    };
    let mut source = crate::source::open(&config.input, &columns)?;
    let input = config.input.clone();
    let card = ModelCard::resolve(&config.model).with_context(|| config.knob("model"))?;
    card.check_size(config.size)?;
    let framing = Framing::new(config).with_context(|| config.knob("buckets"))?;
    check_batch_memory(config, &framing)?;
    let captions = match &config.captions {
        Some(path) => crate::captions::load(path).with_context(|| config.knob("captions"))?,
        None => Default::default(),
    };
    if let Some(video) = &config.video {
        check_clip_run(config, video, &card)?;
    }
    let device = Device::parse(&config.device)?;
    let (decode_threads, encode_threads) = thread_split(config.thread_budget(), &device);
    let open = |gpu| match config.video {
        Some(_) => Encoder::open_clips(&card, gpu, encode_threads, config.latent_mode, config.seed),
        None => Encoder::open_on(&card, gpu, encode_threads, config.latent_mode, config.seed),
    };
    let encoders = device
        .placements()
        .into_iter()
        .map(open)
        .collect::<Result<Vec<_>>>()?;
    let encoder_sha256 = match config.video {
        Some(_) => card.clip_encoder_sha256()?,
        None => card.encoder_sha256()?,
    };
    let identity = RunIdentity::new(
        config,
        ModelIdentity::of(&card, encoder_sha256.clone()),
        framing.clone(),
    );
    let out = crate::store::open(&config.out).with_context(|| config.knob("out"))?;
    // A partition's worker checks the run's plan first: its refusal names what differs from
    // the settings every worker of the run shares.
    let units = match scope {
        Scope::Whole => Vec::new(),
        Scope::Partition(_) => source.units(),
    };
    if scope != Scope::Whole {
        if let Some(fixed) = PartitionPlan::read(out.as_ref())? {
            fixed.check(out.as_ref(), config.partitions, &units, &identity)?;
        }
    }
    let output = resume::inspect_output(out.as_ref(), &identity, config.overwrite, scope)?;
    // Metadata columns are the same in every shard, so the schema is inferred before any work;
    // the same pass counts the inputs. A partition takes the schema of the whole run's plan.
    let (sidecars, inputs) = match scope {
        Scope::Whole => {
            if out.read(PLAN)?.is_some() {
                bail!(
                    "--out {} is a many-worker run ({PLAN}): run its workers with --partitions, then \
                     `vae-pipeline finalize`",
                    out.describe()
                );
            }
            whole_metadata(config, source.as_ref())?
        }
        Scope::Partition(p) => {
            let fixed = PartitionPlan::ensure(
                out.as_ref(),
                config.partitions,
                &identity,
                source.as_ref(),
                &config.input,
                units,
            )?;
            source.restrict(fixed.range(p));
            (fixed.sidecars, source.metadata_pass().count())
        }
    };
    let metadata = ShardMetadata {
        format_version: FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        model: card.name.clone(),
        encoder_sha256,
        scaling_factor: card.scaling_factor,
        shift_factor: card.shift_factor,
        normalization: card.normalization(),
        latent_mode: config.latent_mode.as_str().into(),
        dtype: config.dtype,
        resize: config.resize_text(),
        identity_hash: identity.hash(),
        identity: identity.to_toml(),
    };
    let tensors = TensorColumns {
        std: card.output == EncoderOutput::Moments && config.latent_mode == LatentMode::Dist,
        flip: config.flip,
    };
    Ok(RunPlan {
        config: config.clone(),
        input,
        source,
        card,
        encoders,
        decode_threads,
        encode_threads,
        identity,
        metadata,
        rows: RowMaker {
            framing,
            decode: config.decode_options(),
            captions,
            sidecars,
            video: config.video.clone(),
        },
        tensors,
        inputs,
        out,
        output,
    })
}

/// The metadata schema and input count of a whole run (at most `--limit` inputs).
fn whole_metadata(
    config: &PrecomputeConfig,
    source: &dyn Source,
) -> Result<(SidecarSchema, usize)> {
    let limit = if config.limit > 0 {
        config.limit
    } else {
        usize::MAX
    };
    let mut inputs = 0;
    let (sidecars, unreadable) =
        SidecarSchema::infer(source.metadata_pass().take(limit).inspect(|_| inputs += 1));
    if inputs == 0 {
        bail!(
            "--input {} holds no images or clips (jpg, png, webp, gif, bmp or tiff files, mp4, mov, \
             mkv, webm or avi clips, searched recursively, or samples in tar or Parquet files): \
             nothing to do",
            config.input.display()
        );
    }
    if unreadable > 0 {
        eprintln!("warning: {unreadable} .json sidecar(s) are not JSON objects and were ignored");
    }
    Ok((sidecars, inputs))
}

/// Refuses a batch size whose input tensor alone would not fit in memory.
/// A clip run needs frame options that make sense, a card with a temporal VAE and FFmpeg: all
/// checked before any work, each with what to do.
fn check_clip_run(config: &PrecomputeConfig, video: &FrameOptions, card: &ModelCard) -> Result<()> {
    video
        .check()
        .context("clip frame options (--target-frames …, preset [video])")?;
    if card.temporal.is_none() {
        bail!(
            "{} {}: its card has no [temporal] VAE, so it encodes images, not clips; use a video \
             VAE's card (wan2.1, wan2.2 or qwen-image, or `vae-pipeline export` of a Wan-family \
             checkpoint), or drop the clip flags to encode images",
            config.knob("model"),
            card.name
        );
    }
    crate::video::available()
}

fn check_batch_memory(config: &PrecomputeConfig, framing: &Framing) -> Result<()> {
    let window = framing
        .buckets
        .iter()
        .map(|(w, h)| u64::from(*w) * u64::from(*h))
        .max()
        .unwrap_or(0)
        .max(u64::from(config.size) * u64::from(config.size));
    let frames = config
        .video
        .as_ref()
        .and_then(|v| v.target_frames.iter().max())
        .map_or(1, |&t| t as u64);
    let per_image = 3 * 4 * window * frames * if config.flip { 2 } else { 1 };
    let bytes = per_image.saturating_mul(config.batch_size as u64);
    if bytes > MAX_BATCH_BYTES {
        bail!(
            "{} {} needs {:.1} GiB for one batch's input tensor at this size; the limit is {} GiB: \
             use a batch size of at most {}",
            config.knob("batch_size"),
            config.batch_size,
            bytes as f64 / (1u64 << 30) as f64,
            MAX_BATCH_BYTES >> 30,
            (MAX_BATCH_BYTES / per_image).max(1)
        );
    }
    Ok(())
}
