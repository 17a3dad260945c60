//! The `report` command line and everything about it that can be checked before any work: the
//! folders, the cards (each with a decoder), the size, and for `--shards` that the shard set
//! and the card belong together.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::reconstruct::decoder_path;
use crate::config::{PrecomputeConfig, ResizePolicy};
use crate::frames::FrameOptions;
use crate::model::ModelCard;
use crate::resize::Framing;
use crate::rows::RowMaker;
use crate::shards::ShardSet;
use crate::source::{ParquetColumns, Source};

/// Flags of `vae-pipeline report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// What `precompute --input` reads: a folder (walked recursively in name order), an image,
    /// tar or Parquet file, a glob or brace range, locally or under s3://. With --shards: the
    /// input the shards were made from (their keys name its image files).
    #[arg(long)]
    pub input: PathBuf,
    /// Decode the stored latents of this shard set (a `precompute --out` folder) instead of
    /// encoding the images: checks that the stored latents round-trip.
    #[arg(long)]
    pub shards: Option<PathBuf>,
    /// Model card with a `decoder`: a name in models/ or a card TOML path. Repeat to compare
    /// models on the same images [default: taef2; with --shards: the shards' model].
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Side of the square each image is resized and cropped to; a multiple of every card's
    /// spatial_factor [default: 256; with --shards: the shards' size].
    #[arg(long)]
    pub size: Option<u32>,
    /// How images become size×size [default: center-crop; with --shards: the shards' policy].
    #[arg(long, value_enum)]
    pub resize: Option<ResizePolicy>,
    /// Output folder for metrics.parquet, summary.json, report.html and errors.jsonl (those
    /// files are replaced; nothing else in it is touched).
    #[arg(long)]
    pub out: PathBuf,
    /// Report on the first N inputs only (name order; with --shards, shard order); 0 = all, as
    /// for `precompute`.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// LPIPS as an ONNX export: two float32 [N, 3, H, W] inputs in [-1, 1] (original, then
    /// reconstruction) and one output of N distances (see docs/report.md). Without it there is no
    /// LPIPS column.
    #[arg(long, value_name = "MODEL.onnx")]
    pub lpips: Option<PathBuf>,
    /// Images per encoder and decoder call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Threads for decoding, metrics and each ONNX Runtime session; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Clip windows, from the same clip flags as `precompute` (`--target-frames` …, set in
    /// main.rs): set, the report encodes and decodes clips with each card's temporal VAE and
    /// scores every frame.
    #[arg(skip)]
    pub video: Option<FrameOptions>,
}

/// Where the latents come from.
pub enum Origin {
    /// Encode the images here.
    Images,
    /// Decode what a shard set stores.
    Shards(Box<ShardSet>),
}

/// A checked report run.
pub struct Plan {
    /// `--input` as given, for messages.
    pub input: PathBuf,
    /// What `--input` names, opened and checked.
    pub source: Box<dyn Source + Send>,
    pub origin: Origin,
    pub cards: Vec<ModelCard>,
    /// How source images become windows (size, resize, decode settings): the shards' own with
    /// --shards.
    pub rows: RowMaker,
    pub limit: usize,
    pub threads: usize,
}

impl ReportArgs {
    /// Checks every flag, folder and card; fails with what to fix before any image is read.
    pub fn plan(&self) -> Result<Plan> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let source = crate::source::open(&self.input, &ParquetColumns::default())?;
        if self.out.exists() && !self.out.is_dir() {
            bail!("--out {} exists and is not a folder", self.out.display());
        }
        if self.out.join(crate::format::CONFIG).exists() {
            bail!(
                "--out {} holds a shard set; write the report to another folder",
                self.out.display()
            );
        }
        let (origin, cards, rows) = match &self.shards {
            Some(dir) => self.plan_shards(dir)?,
            None => self.plan_images()?,
        };
        if let Some(card) = cards.iter().find(|c| c.batch_norm.is_some()) {
            bail!(
                "model card {}: the report cannot yet undo FLUX.2's patchify and batch-norm \
                 normalization (`[batch_norm]`)",
                card.card_path.display()
            );
        }
        let threads = if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        Ok(Plan {
            input: self.input.clone(),
            source,
            origin,
            cards,
            rows,
            limit: match self.limit {
                None | Some(0) => usize::MAX,
                Some(n) => n,
            },
            threads,
        })
    }

    fn plan_images(&self) -> Result<(Origin, Vec<ModelCard>, RowMaker)> {
        let names = if self.models.is_empty() {
            vec!["taef2".to_string()]
        } else {
            self.models.clone()
        };
        let cards = names
            .iter()
            .map(|m| ModelCard::resolve(m))
            .collect::<Result<Vec<_>>>()?;
        let mut seen = BTreeSet::new();
        for card in &cards {
            if !seen.insert(card.name.as_str()) {
                bail!(
                    "--model: two cards are named {:?}; each model is one column of the report",
                    card.name
                );
            }
        }
        let defaults = PrecomputeConfig::default();
        let config = PrecomputeConfig {
            size: self.size.unwrap_or(defaults.size),
            resize: self.resize.unwrap_or(defaults.resize),
            // Clips frame as a clip run does (musubi buckets them whatever its config says).
            video: self.video.clone(),
            ..defaults
        };
        if config.size == 0 {
            bail!("--size must be a positive number of pixels");
        }
        for card in &cards {
            card.check_size(config.size)?;
            // Clips decode with the card's [temporal] graphs, checked when they open.
            if self.video.is_none() {
                decoder_path(card)?;
            }
        }
        if let Some(video) = &self.video {
            video
                .check()
                .context("clip frame options (--target-frames …)")?;
            if let Some(card) = cards.iter().find(|c| c.temporal.is_none()) {
                bail!(
                    "--model {}: its card has no [temporal] VAE, so it reconstructs images, not \
                     clips; use a video VAE's card (wan2.1, wan2.2 or qwen-image, or `vae-pipeline \
                     export` of a Wan-family checkpoint), or drop the clip flags to report on images",
                    card.name
                );
            }
            crate::video::available()?;
        }
        let mut rows = RowMaker::plain(Framing::new(&config)?, config.decode_options());
        rows.video = self.video.clone();
        Ok((Origin::Images, cards, rows))
    }

    fn plan_shards(&self, dir: &std::path::Path) -> Result<(Origin, Vec<ModelCard>, RowMaker)> {
        let set = ShardSet::open(dir)?;
        if set.info.identity.video.is_some() {
            bail!(
                "report --shards on clip sets is not supported yet: {} holds clip windows; use \
                 --input with the clips and the same clip flags (--target-frames …) to encode and \
                 decode them here",
                dir.display()
            );
        }
        if self.video.is_some() {
            bail!(
                "the clip flags (--target-frames …) take clips from --input; --shards {} holds \
                 images: leave the clip flags out",
                dir.display()
            );
        }
        let info = &set.info.metadata;
        let framing = &set.info.identity.framing;
        let spec = match self.models.as_slice() {
            [] => info.model.clone(),
            [one] => one.clone(),
            _ => bail!(
                "--shards decodes the latents of one model ({}): pass one --model or none",
                info.model
            ),
        };
        let card = ModelCard::resolve(&spec)?;
        if card.name != info.model {
            bail!(
                "--shards {} holds latents of model {:?}, but card {} is {:?}: pass --model {}",
                dir.display(),
                info.model,
                card.card_path.display(),
                card.name,
                info.model
            );
        }
        decoder_path(&card)?;
        let sha = card.encoder_sha256()?;
        if sha != info.encoder_sha256 {
            bail!(
                "--shards {} was encoded by an encoder with sha256 {}, but card {} names {} \
                 (sha256 {sha}): the round trip would mix two models",
                dir.display(),
                info.encoder_sha256,
                card.card_path.display(),
                card.encoder.display()
            );
        }
        if let Some(size) = self.size.filter(|&s| s != framing.size) {
            bail!(
                "--size {size} differs from the shards' size {}: with --shards the size comes \
                 from the shards; leave --size out",
                framing.size
            );
        }
        if let Some(resize) = self.resize.filter(|&r| r != framing.policy) {
            bail!(
                "--resize {} differs from the shards' {}: leave --resize out with --shards",
                resize.as_str(),
                framing.policy.as_str()
            );
        }
        if !set.complete {
            eprintln!(
                "warning: {} has no {}: the run that wrote it did not finish; reporting on the \
                 shards it committed",
                dir.display(),
                crate::format::SUCCESS
            );
        }
        if (card.scaling_factor, card.shift_factor) != (info.scaling_factor, info.shift_factor) {
            eprintln!(
                "warning: the shards were normalized with scaling_factor {} and shift_factor {}, \
                 the card now says {} and {}: decoding undoes what the shards store",
                info.scaling_factor, info.shift_factor, card.scaling_factor, card.shift_factor
            );
        }
        let rows = RowMaker::plain(framing.clone(), set.info.identity.decode);
        Ok((Origin::Shards(Box::new(set)), vec![card], rows))
    }
}
