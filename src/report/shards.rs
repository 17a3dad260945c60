//! `--shards`: reads a shard set written by `precompute`. Takes the shard folder, hands on how
//! its latents were made (model, normalization, resize) and its rows (key, source hash, crop,
//! stored latent as `f32`) in shard order, so the report can decode exactly what was stored.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, FixedSizeBinaryArray, FixedSizeListArray, Float16Array, Float32Array, Int32Array,
    RecordBatch, StringArray, UInt16Array,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use walkdir::WalkDir;

use crate::config::PrecomputeConfig;

/// What every shard of the set records about how its latents were made.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInfo {
    pub model: String,
    pub encoder_sha256: String,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// The `precompute` config the shards record: size, resize and decode settings, so the
    /// sources are re-read exactly as they were for encoding.
    pub config: PrecomputeConfig,
    pub latent_mode: String,
    pub dtype: String,
}

/// A shard set: its Parquet files in path order and what they share.
pub struct ShardSet {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub info: ShardInfo,
    pub rows: usize,
    /// `_SUCCESS` is present: the run that wrote the set finished.
    pub complete: bool,
}

/// One stored row, with what is needed to re-read and check its source image.
pub struct StoredRow {
    pub key: String,
    pub source_sha256: [u8; 32],
    pub crop_top: i32,
    pub crop_left: i32,
    /// `[C, h, w]` of `latent`.
    pub shape: [usize; 3],
    /// The stored (normalized) latent, widened to f32.
    pub latent: Vec<f32>,
}

impl ShardSet {
    /// Finds every `*.parquet` under `dir` and checks that they agree on model and normalization.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("--shards {} is not a folder", dir.display());
        }
        let mut files: Vec<PathBuf> = WalkDir::new(dir)
            .sort_by_file_name()
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy();
                e.file_type().is_file() && name.ends_with(".parquet") && !name.starts_with('.')
            })
            .map(|e| e.into_path())
            .collect();
        files.sort();
        let Some(first) = files.first() else {
            bail!(
                "--shards {} holds no .parquet shards; pass the --out folder of a `precompute` run",
                dir.display()
            );
        };
        let info = read_info(first)?;
        let mut rows = 0;
        for file in &files {
            let (theirs, n) = read_info_rows(file)?;
            if theirs != info {
                bail!(
                    "--shards {}: {} was made with {theirs:?} but {} with {info:?}; report on one \
                     shard set at a time",
                    dir.display(),
                    file.display(),
                    first.display()
                );
            }
            rows += n;
        }
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            complete: dir.join(crate::write::SUCCESS).exists(),
            files,
            info,
            rows,
        })
    }

    /// Calls `each` with up to `chunk` rows at a time, in shard order, for the first `limit` rows.
    pub fn for_each_chunk(
        &self,
        chunk: usize,
        limit: usize,
        mut each: impl FnMut(Vec<StoredRow>) -> Result<()>,
    ) -> Result<()> {
        let mut left = limit;
        for file in &self.files {
            let reader = ParquetRecordBatchReaderBuilder::try_new(open(file)?)?
                .with_batch_size(chunk.min(left).max(1))
                .build()?;
            for batch in reader {
                if left == 0 {
                    return Ok(());
                }
                let batch = batch.with_context(|| format!("reading {}", file.display()))?;
                let mut rows = self
                    .rows_of(&batch)
                    .with_context(|| format!("reading {}", file.display()))?;
                rows.truncate(left);
                left -= rows.len();
                each(rows)?;
            }
        }
        Ok(())
    }

    fn rows_of(&self, batch: &RecordBatch) -> Result<Vec<StoredRow>> {
        let keys: &StringArray = column(batch, "key")?;
        let hashes: &FixedSizeBinaryArray = column(batch, "source_sha256")?;
        let tops: &Int32Array = column(batch, "crop_top")?;
        let lefts: &Int32Array = column(batch, "crop_left")?;
        let latents: &FixedSizeListArray = column(batch, "latent")?;
        let shape = tensor_shape(batch)?;
        let mut rows = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let values = latents.value(i);
            let latent = widen(values.as_ref(), &self.info.dtype)?;
            if latent.len() != shape.iter().product::<usize>() {
                bail!(
                    "latent of {} has {} values, not {shape:?}",
                    keys.value(i),
                    latent.len()
                );
            }
            rows.push(StoredRow {
                key: keys.value(i).to_string(),
                source_sha256: hashes
                    .value(i)
                    .try_into()
                    .context("source_sha256 is not 32 bytes")?,
                crop_top: tops.value(i),
                crop_left: lefts.value(i),
                shape,
                latent,
            });
        }
        Ok(rows)
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("cannot open shard {}", path.display()))
}

fn read_info(path: &Path) -> Result<ShardInfo> {
    Ok(read_info_rows(path)?.0)
}

/// The shard's `vae_pipeline.*` metadata and its row count.
fn read_info_rows(path: &Path) -> Result<(ShardInfo, usize)> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
    let meta = builder.metadata().file_metadata();
    let kv = meta.key_value_metadata().cloned().unwrap_or_default();
    let get = |key: &str| -> Result<String> {
        kv.iter()
            .find(|e| e.key == format!("vae_pipeline.{key}"))
            .and_then(|e| e.value.clone())
            .with_context(|| {
                format!(
                    "{} has no `vae_pipeline.{key}` metadata: it was not written by `vae-pipeline precompute`",
                    path.display()
                )
            })
    };
    let number = |key: &str| -> Result<f32> {
        let text = get(key)?;
        text.parse().with_context(|| {
            format!(
                "{}: vae_pipeline.{key} = {text:?} is not a number",
                path.display()
            )
        })
    };
    let config_toml = get("config")?;
    let info = ShardInfo {
        model: get("model")?,
        encoder_sha256: get("encoder_sha256")?,
        scaling_factor: number("scaling_factor")?,
        shift_factor: number("shift_factor")?,
        config: toml::from_str(&config_toml).with_context(|| {
            format!(
                "{}: vae_pipeline.config is not a config this vae-pipeline reads",
                path.display()
            )
        })?,
        latent_mode: get("latent_mode")?,
        dtype: get("dtype")?,
    };
    Ok((info, meta.num_rows() as usize))
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .with_context(|| format!("no column `{name}`"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("column `{name}` has an unexpected type"))
}

/// `[C, h, w]` from the `arrow.fixed_shape_tensor` metadata of `latent`.
fn tensor_shape(batch: &RecordBatch) -> Result<[usize; 3]> {
    let schema = batch.schema();
    let field = schema.field_with_name("latent")?;
    let meta = field
        .metadata()
        .get("ARROW:extension:metadata")
        .context("column `latent` has no arrow.fixed_shape_tensor metadata")?;
    let parsed: serde_json::Value = serde_json::from_str(meta)?;
    let dims: Vec<usize> = parsed["shape"]
        .as_array()
        .context("tensor metadata has no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .context("tensor shape is not a list of sizes")?;
    dims.try_into()
        .map_err(|d| anyhow::anyhow!("latent shape {d:?} is not [C, h, w]"))
}

/// Stored values as f32: float16, float32, or bfloat16 bits in uint16 (`dtype = "bf16"`).
fn widen(values: &dyn Array, dtype: &str) -> Result<Vec<f32>> {
    let any = values.as_any();
    if let Some(a) = any.downcast_ref::<Float32Array>() {
        return Ok(a.values().to_vec());
    }
    if let Some(a) = any.downcast_ref::<Float16Array>() {
        return Ok(a.values().iter().map(|v| v.to_f32()).collect());
    }
    if let (Some(a), "bf16") = (any.downcast_ref::<UInt16Array>(), dtype) {
        return Ok(a
            .values()
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect());
    }
    bail!(
        "latent values are {:?} (dtype {dtype}); expected float16, float32 or bf16 bits",
        values.data_type()
    )
}
