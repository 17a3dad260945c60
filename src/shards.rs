//! Shard sets as their readers in this tool see them (`report --shards`, `convert`). Takes a
//! `precompute --out` folder, hands on how its latents were made (metadata and identity) and
//! its rows (key, source hash, geometry, caption, stored latents as `f32`) in shard order, a
//! batch at a time. The format itself is `format`'s.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, FixedSizeBinaryArray, FixedSizeListArray, Float64Array, Int32Array, ListArray,
    RecordBatch, StringArray,
};
use parquet::arrow::ProjectionMask;

use crate::format::{self, ShardMetadata, WindowMeta};
use crate::identity::RunIdentity;
use crate::store::ShardStore;

/// What every shard of the set records about how its latents were made.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInfo {
    pub metadata: ShardMetadata,
    /// The run identity the shards record: size, framing and decode settings, so the sources
    /// are re-read exactly as they were for encoding.
    pub identity: RunIdentity,
}

/// A shard set: its Parquet files in path order and what they share.
pub struct ShardSet {
    pub store: Arc<dyn ShardStore>,
    pub files: Vec<String>,
    pub info: ShardInfo,
    pub rows: usize,
    /// `_SUCCESS` is present: the run that wrote the set finished.
    pub complete: bool,
}

/// One stored row.
pub struct StoredRow {
    pub key: String,
    pub source_sha256: [u8; 32],
    pub orig_width: i32,
    pub orig_height: i32,
    pub crop_top: i32,
    pub crop_left: i32,
    /// The window the encoder saw (the row's bucket).
    pub width: i32,
    pub height: i32,
    /// `[C, h, w]` (images) or `[C, T, h, w]` (clips) of `latent`.
    pub shape: Vec<usize>,
    /// A clip row's window of frames (`format::CLIP_COLUMNS`).
    pub window: Option<WindowMeta>,
    /// The stored (normalized) latent, widened to f32.
    pub latent: Vec<f32>,
    /// `latent_flip`, when the set has it.
    pub latent_flip: Option<Vec<f32>>,
    pub caption: Option<String>,
}

impl ShardSet {
    /// Lists the set's shards (as `format` defines them) and checks that they agree on how
    /// their latents were made.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.to_string_lossy().contains("://") && !dir.is_dir() {
            bail!("--shards {} is not a folder", dir.display());
        }
        let store = crate::store::open(dir)?;
        let files = format::shard_files(store.as_ref())?;
        let Some(first) = files.first() else {
            bail!(
                "--shards {} holds no shards (<W>x<H>/part-*.parquet); pass the --out folder of a \
                 `precompute` run",
                dir.display()
            );
        };
        let info = read_info(store.as_ref(), first)?;
        let mut rows = 0;
        for file in &files {
            let footer = format::footer(store.as_ref(), file)?;
            if footer.metadata.identity_hash != info.metadata.identity_hash {
                bail!(
                    "--shards {}: {} and {} record different runs (identity {} and {}); report on \
                     one shard set at a time",
                    dir.display(),
                    file,
                    first,
                    footer.metadata.identity_hash,
                    info.metadata.identity_hash
                );
            }
            rows += footer.rows;
        }
        Ok(ShardSet {
            complete: store.read(format::SUCCESS)?.is_some(),
            store,
            files,
            info,
            rows,
        })
    }

    /// Why the set is unfinished and how to finish it; None when `_SUCCESS` says it is complete.
    /// `dir` is the set as the user named it.
    pub fn unfinished(&self, dir: &Path) -> Result<Option<String>> {
        if self.complete {
            return Ok(None);
        }
        let shown = dir.display();
        if crate::partition_files::PartitionPlan::read(self.store.as_ref())?.is_none() {
            return Ok(Some(format!(
                "{shown} has no _SUCCESS: the precompute run that writes it has not finished \
                 ({} rows so far); run it again with the same settings, it resumes",
                self.rows
            )));
        }
        let status = crate::set::status(dir, crate::set::MAX_ARRAY_SIZE)?;
        let compact = crate::set::compact;
        Ok(Some(
            if status.missing.is_empty() && status.running.is_empty() {
                format!(
                    "{shown} has no _SUCCESS: all {} partitions are done but the run was not \
                 finalized; run `vae-pipeline finalize {shown}`",
                    status.partitions
                )
            } else {
                format!(
                    "{shown} has no _SUCCESS: {} of {} partitions are done ({} rows){}{}; finish \
                 them (`vae-pipeline status {shown}` prints the commands), then run \
                 `vae-pipeline finalize {shown}`",
                    status.done.len(),
                    status.partitions,
                    status.rows,
                    if status.missing.is_empty() {
                        String::new()
                    } else {
                        format!(", partitions {} missing", compact(&status.missing))
                    },
                    if status.running.is_empty() {
                        String::new()
                    } else {
                        format!(", partitions {} still running", compact(&status.running))
                    },
                )
            },
        ))
    }

    /// Calls `each` with up to `chunk` rows at a time, in shard order, for the first `limit` rows.
    /// Without `tensors` the latent columns are not read (`latent` is empty, `shape` still set):
    /// a pass over geometry and keys alone.
    pub fn for_each_chunk(
        &self,
        chunk: usize,
        limit: usize,
        tensors: bool,
        mut each: impl FnMut(Vec<StoredRow>) -> Result<()>,
    ) -> Result<()> {
        let mut left = limit;
        for file in &self.files {
            let builder = format::open(self.store.as_ref(), file)?;
            let shape = format::tensor_shape(builder.schema().field_with_name("latent")?)?;
            let builder = if tensors {
                builder
            } else {
                let names: Vec<&str> = builder
                    .schema()
                    .fields()
                    .iter()
                    .filter(|f| !format::is_tensor_field(f))
                    .map(|f| f.name().as_str())
                    .collect();
                let mask = ProjectionMask::columns(builder.parquet_schema(), names);
                builder.with_projection(mask)
            };
            let reader = builder.with_batch_size(chunk.min(left).max(1)).build()?;
            for batch in reader {
                if left == 0 {
                    return Ok(());
                }
                let batch = batch.with_context(|| format!("reading {}", self.store.name(file)))?;
                let mut rows = self
                    .rows_of(&batch, &shape)
                    .with_context(|| format!("reading {}", self.store.name(file)))?;
                rows.truncate(left);
                left -= rows.len();
                each(rows)?;
            }
        }
        Ok(())
    }

    fn rows_of(&self, batch: &RecordBatch, shape: &[usize]) -> Result<Vec<StoredRow>> {
        let keys: &StringArray = column(batch, "key")?;
        let hashes: &FixedSizeBinaryArray = column(batch, "source_sha256")?;
        let orig_widths: &Int32Array = column(batch, "orig_width")?;
        let orig_heights: &Int32Array = column(batch, "orig_height")?;
        let captions: &StringArray = column(batch, "caption")?;
        let flips = batch
            .column_by_name("latent_flip")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>());
        let tops: &Int32Array = column(batch, "crop_top")?;
        let lefts: &Int32Array = column(batch, "crop_left")?;
        let widths: &Int32Array = column(batch, "width")?;
        let heights: &Int32Array = column(batch, "height")?;
        let latents = batch
            .column_by_name("latent")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>());
        let windows = windows_of(batch)?;
        let mut rows = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let latent = match latents {
                Some(l) => format::widen(l.value(i).as_ref(), self.info.metadata.dtype)?,
                None => Vec::new(),
            };
            if latents.is_some() && latent.len() != shape.iter().product::<usize>() {
                bail!(
                    "latent of {} has {} values, not {shape:?}",
                    keys.value(i),
                    latent.len()
                );
            }
            let latent_flip = flips
                .map(|f| format::widen(f.value(i).as_ref(), self.info.metadata.dtype))
                .transpose()?;
            rows.push(StoredRow {
                key: keys.value(i).to_string(),
                orig_width: orig_widths.value(i),
                orig_height: orig_heights.value(i),
                latent_flip,
                caption: captions.is_valid(i).then(|| captions.value(i).to_string()),
                source_sha256: hashes
                    .value(i)
                    .try_into()
                    .context("source_sha256 is not 32 bytes")?,
                crop_top: tops.value(i),
                crop_left: lefts.value(i),
                width: widths.value(i),
                height: heights.value(i),
                shape: shape.to_vec(),
                latent,
                window: windows.as_ref().map(|w| w(i)),
            });
        }
        Ok(rows)
    }
}

/// Row i's window, when the batch has the clip columns.
#[allow(clippy::type_complexity)]
fn windows_of(batch: &RecordBatch) -> Result<Option<Box<dyn Fn(usize) -> WindowMeta + '_>>> {
    if batch.column_by_name(format::FRAME_START).is_none() {
        return Ok(None);
    }
    let starts: &Int32Array = column(batch, format::FRAME_START)?;
    let counts: &Int32Array = column(batch, format::FRAME_COUNT)?;
    let indices: &ListArray = column(batch, format::FRAME_INDICES)?;
    let source_fps: &Float64Array = column(batch, format::SOURCE_FPS)?;
    let fps: &Float64Array = column(batch, format::FPS)?;
    Ok(Some(Box::new(move |i| WindowMeta {
        start: starts.value(i),
        count: counts.value(i),
        indices: indices
            .value(i)
            .as_any()
            .downcast_ref::<Int32Array>()
            .map(|a| a.values().to_vec())
            .unwrap_or_default(),
        source_fps: source_fps.value(i),
        fps: fps.value(i),
    })))
}

fn read_info(store: &dyn ShardStore, shard: &str) -> Result<ShardInfo> {
    let metadata = format::footer(store, shard)?.metadata;
    let identity = RunIdentity::from_toml(&metadata.identity).with_context(|| {
        format!(
            "{}: vae_pipeline.identity is not an identity this vae-pipeline reads",
            store.name(shard)
        )
    })?;
    Ok(ShardInfo { metadata, identity })
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .with_context(|| format!("no column `{name}`"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("column `{name}` has an unexpected type"))
}
