//! Write: takes `EncodedBatch`es and `Failure`s, hands on Parquet shards under `OUT/<W>x<H>/`,
//! `_errors.jsonl`, `_manifest.jsonl` and, last, `_SUCCESS`. A shard becomes visible only whole:
//! it is written under a temporary name, fsynced and renamed.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{
    ArrayRef, FixedSizeBinaryArray, FixedSizeListArray, Float16Array, Float32Array, Int32Array,
    RecordBatch, StringArray, UInt16Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::Serialize;

use crate::config::StorageDType;
use crate::encode::EncodedBatch;
use crate::failure::{Failure, FailureKind};

/// Names of the side files in an output folder.
pub const SUCCESS: &str = "_SUCCESS";
pub const ERRORS: &str = "_errors.jsonl";
pub const MANIFEST: &str = "_manifest.jsonl";
pub const CONFIG: &str = "_config.toml";

/// Row groups are cut at this many bytes so memory stays bounded for large latents.
const ROW_GROUP_BYTES: usize = 64 << 20;

/// What an output folder holds before a run.
#[derive(Debug, PartialEq, Eq)]
pub enum OutputState {
    /// Nothing there yet (or an empty folder).
    Fresh,
    /// A finished run with this very config: nothing to do.
    Complete,
    /// An unfinished run with this config: its partial files were removed.
    Restarted,
}

/// Checks `out` before any work and makes it ready: refuses folders that hold something else or
/// shards of another config; records the config so a later run can tell.
pub fn prepare_output(out: &Path, config_hash: &str, config_toml: &str) -> Result<OutputState> {
    let mut state = OutputState::Fresh;
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a folder", out.display());
        }
        let has_entries = std::fs::read_dir(out)
            .with_context(|| format!("cannot read --out {}", out.display()))?
            .next()
            .is_some();
        if has_entries {
            let recorded = std::fs::read_to_string(out.join(CONFIG)).map_err(|_| {
                anyhow::anyhow!(
                    "--out {} is not empty and holds no {CONFIG}: it was not written by vae-pipeline. \
                     Choose an empty or new folder",
                    out.display()
                )
            })?;
            let theirs = recorded_hash(&recorded);
            if theirs != Some(config_hash) {
                bail!(
                    "--out {} holds shards made with a different config (config_hash {} there, {config_hash} now; \
                     see {}). Use another --out, or delete that folder to rebuild it",
                    out.display(),
                    theirs.unwrap_or("missing"),
                    out.join(CONFIG).display()
                );
            }
            if out.join(SUCCESS).exists() {
                return Ok(OutputState::Complete);
            }
            remove_outputs(out)?;
            state = OutputState::Restarted;
        }
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create --out {}", out.display()))?;
    write_atomic(
        &out.join(CONFIG),
        format!("config_hash = \"{config_hash}\"\n{config_toml}").as_bytes(),
    )
    .with_context(|| format!("--out {} is not writable", out.display()))?;
    Ok(state)
}

fn recorded_hash(config: &str) -> Option<&str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("config_hash = \"")?.strip_suffix('"'))
}

/// Removes what an unfinished run left: shard folders and side files, not foreign files.
fn remove_outputs(out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(out)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && is_shape_dir(&name) {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        } else if [ERRORS, MANIFEST].contains(&name.as_str()) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn is_shape_dir(name: &str) -> bool {
    name.split_once('x')
        .is_some_and(|(w, h)| w.parse::<u32>().is_ok() && h.parse::<u32>().is_ok())
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    commit(&tmp, path)
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().expect("file path").to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Renames a finished temporary file into place and makes the rename durable.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

/// One committed shard, as `_manifest.jsonl` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestEntry {
    pub path: String,
    pub rows: usize,
    pub width: u32,
    pub height: u32,
    pub latent_shape: [usize; 3],
}

struct OpenShard {
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    rows: usize,
    entry: ManifestEntry,
}

/// Counts a finished run hands to its summary.
#[derive(Debug, Default, Clone)]
pub struct WriteTotals {
    pub rows: usize,
    pub shards: usize,
    pub failures: BTreeMap<FailureKind, usize>,
}

impl WriteTotals {
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }
}

/// Streams rows into rotating Parquet shards, one folder per input shape.
pub struct ShardWriter {
    out: PathBuf,
    shard_rows: usize,
    dtype: StorageDType,
    metadata: Vec<KeyValue>,
    open: HashMap<(u32, u32), OpenShard>,
    next_part: HashMap<(u32, u32), usize>,
    schemas: HashMap<(u32, u32), SchemaRef>,
    errors: BufWriter<File>,
    manifest: Vec<ManifestEntry>,
    totals: WriteTotals,
}

impl ShardWriter {
    /// `metadata` goes into every shard's Parquet key-value metadata.
    pub fn new(
        out: &Path,
        shard_rows: usize,
        dtype: StorageDType,
        metadata: Vec<(String, String)>,
    ) -> Result<Self> {
        let errors_path = out.join(ERRORS);
        let errors = File::create(&errors_path)
            .with_context(|| format!("cannot create {}", errors_path.display()))?;
        Ok(ShardWriter {
            out: out.to_path_buf(),
            shard_rows,
            dtype,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect(),
            open: HashMap::new(),
            next_part: HashMap::new(),
            schemas: HashMap::new(),
            errors: BufWriter::new(errors),
            manifest: Vec::new(),
            totals: WriteTotals::default(),
        })
    }

    /// Records an input that could not be used.
    pub fn record_failure(&mut self, failure: &Failure) -> Result<()> {
        serde_json::to_writer(&mut self.errors, failure)?;
        self.errors.write_all(b"\n")?;
        *self.totals.failures.entry(failure.kind).or_default() += 1;
        Ok(())
    }

    /// Shards committed so far plus those `finish` will commit.
    pub fn shards_when_finished(&self) -> usize {
        self.totals.shards + self.open.len()
    }

    pub fn totals(&self) -> &WriteTotals {
        &self.totals
    }

    /// Appends a batch's rows, rotating shards every `shard_rows` rows.
    pub fn write(&mut self, batch: EncodedBatch) -> Result<()> {
        for failure in &batch.failures {
            self.record_failure(failure)?;
        }
        if batch.rows.is_empty() {
            return Ok(());
        }
        let shape = (batch.width, batch.height);
        let latent_shape = batch.latent_shape;
        let record = self.record_batch(batch)?;
        let mut offset = 0;
        while offset < record.num_rows() {
            if !self.open.contains_key(&shape) {
                let shard = self.open_shard(shape, latent_shape, record.schema())?;
                self.open.insert(shape, shard);
            }
            let shard = self.open.get_mut(&shape).expect("opened above");
            let take = (self.shard_rows - shard.rows).min(record.num_rows() - offset);
            shard.writer.write(&record.slice(offset, take))?;
            shard.rows += take;
            offset += take;
            if shard.rows == self.shard_rows {
                let shard = self.open.remove(&shape).expect("present");
                self.close_shard(shard)?;
            }
        }
        self.totals.rows += record.num_rows();
        Ok(())
    }

    fn open_shard(
        &mut self,
        shape: (u32, u32),
        latent_shape: [usize; 3],
        schema: SchemaRef,
    ) -> Result<OpenShard> {
        let dir_name = format!("{}x{}", shape.0, shape.1);
        let dir = self.out.join(&dir_name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let part = self.next_part.entry(shape).or_default();
        let name = format!("part-{part:05}.parquet");
        *part += 1;
        let path = dir.join(&name);
        let tmp = tmp_name(&path);
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let tensor_columns = if schema.field_with_name("latent_std").is_ok() {
            2
        } else {
            1
        };
        let row_bytes =
            latent_shape.iter().product::<usize>() * self.dtype.bytes() * tensor_columns;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .set_max_row_group_row_count(Some(
                self.shard_rows.min((ROW_GROUP_BYTES / row_bytes).max(1)),
            ))
            .set_key_value_metadata(Some(self.metadata.clone()));
        for column in ["latent", "latent_std"] {
            let path = ColumnPath::from(vec![column.to_string(), "list".into(), "item".into()]);
            props = props
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
        let writer = ArrowWriter::try_new(file, schema, Some(props.build()))?;
        Ok(OpenShard {
            writer,
            tmp,
            path,
            rows: 0,
            entry: ManifestEntry {
                path: format!("{dir_name}/{name}"),
                rows: 0,
                width: shape.0,
                height: shape.1,
                latent_shape,
            },
        })
    }

    fn close_shard(&mut self, mut shard: OpenShard) -> Result<()> {
        let file = shard
            .writer
            .into_inner()
            .with_context(|| format!("finishing {}", shard.tmp.display()))?;
        file.sync_all()?;
        drop(file);
        commit(&shard.tmp, &shard.path)?;
        shard.entry.rows = shard.rows;
        self.manifest.push(shard.entry);
        self.totals.shards += 1;
        Ok(())
    }

    /// Closes every open shard and writes the side files, `_SUCCESS` last.
    pub fn finish(mut self, summary: &serde_json::Value) -> Result<WriteTotals> {
        let mut open: Vec<_> = self.open.drain().collect();
        open.sort_by_key(|(shape, _)| *shape);
        for (_, shard) in open {
            self.close_shard(shard)?;
        }
        self.errors.flush()?;
        self.errors.get_ref().sync_all()?;
        self.manifest.sort_by(|a, b| a.path.cmp(&b.path));
        let mut lines = Vec::new();
        for entry in &self.manifest {
            serde_json::to_writer(&mut lines, entry)?;
            lines.push(b'\n');
        }
        write_atomic(&self.out.join(MANIFEST), &lines)?;
        write_atomic(
            &self.out.join(SUCCESS),
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )?;
        Ok(self.totals)
    }

    fn schema(&mut self, batch: &EncodedBatch) -> SchemaRef {
        let shape = (batch.width, batch.height);
        let dtype = self.dtype;
        self.schemas
            .entry(shape)
            .or_insert_with(|| {
                let mut fields = vec![
                    Field::new("key", DataType::Utf8, false),
                    Field::new("source_sha256", DataType::FixedSizeBinary(32), false),
                ];
                for name in [
                    "orig_width",
                    "orig_height",
                    "crop_top",
                    "crop_left",
                    "width",
                    "height",
                ] {
                    fields.push(Field::new(name, DataType::Int32, false));
                }
                fields.push(tensor_field("latent", dtype, batch.latent_shape));
                if batch.stds.is_some() {
                    fields.push(tensor_field("latent_std", dtype, batch.latent_shape));
                }
                fields.push(Field::new("caption", DataType::Utf8, true));
                Arc::new(Schema::new(fields))
            })
            .clone()
    }

    /// Moves the batch's latents into Arrow arrays (no copy for f32).
    fn record_batch(&mut self, batch: EncodedBatch) -> Result<RecordBatch> {
        let schema = self.schema(&batch);
        let rows = &batch.rows;
        let int = |f: fn(&crate::batch::RowMeta) -> i32| -> ArrayRef {
            Arc::new(Int32Array::from_iter_values(rows.iter().map(f)))
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.key.as_str()),
            )),
            Arc::new(FixedSizeBinaryArray::try_from_iter(
                rows.iter().map(|r| r.source_sha256),
            )?),
            int(|r| r.orig_width),
            int(|r| r.orig_height),
            int(|r| r.crop_top),
            int(|r| r.crop_left),
            int(|r| r.width),
            int(|r| r.height),
            tensor_array(batch.latents, self.dtype, batch.latent_shape),
        ];
        if let Some(stds) = batch.stds {
            columns.push(tensor_array(stds, self.dtype, batch.latent_shape));
        }
        columns.push(Arc::new(StringArray::from(
            rows.iter().map(|r| r.caption.clone()).collect::<Vec<_>>(),
        )));
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

/// The Arrow element type a storage dtype is written as (bf16 travels as its uint16 bits).
fn element_type(dtype: StorageDType) -> DataType {
    match dtype {
        StorageDType::F16 => DataType::Float16,
        StorageDType::Bf16 => DataType::UInt16,
        StorageDType::F32 => DataType::Float32,
    }
}

/// A `arrow.fixed_shape_tensor` field. Its list child must be nullable or pyarrow reads a plain
/// fixed-size list; the metadata is written by hand because arrow-rs' own writes JSON nulls that
/// pyarrow rejects (see FACTS.md).
fn tensor_field(name: &str, dtype: StorageDType, shape: [usize; 3]) -> Field {
    let item = Field::new("item", element_type(dtype), true);
    let len = shape.iter().product::<usize>() as i32;
    Field::new(name, DataType::FixedSizeList(Arc::new(item), len), false).with_metadata(
        [
            (
                "ARROW:extension:name".to_string(),
                "arrow.fixed_shape_tensor".to_string(),
            ),
            (
                "ARROW:extension:metadata".to_string(),
                format!("{{\"shape\":[{},{},{}]}}", shape[0], shape[1], shape[2]),
            ),
        ]
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>(),
    )
}

fn tensor_array(values: Vec<f32>, dtype: StorageDType, shape: [usize; 3]) -> ArrayRef {
    let item = Arc::new(Field::new("item", element_type(dtype), true));
    let child: ArrayRef = match dtype {
        StorageDType::F16 => Arc::new(Float16Array::from_iter_values(
            values.iter().map(|&v| half::f16::from_f32(v)),
        )),
        StorageDType::Bf16 => Arc::new(UInt16Array::from_iter_values(
            values.iter().map(|&v| half::bf16::from_f32(v).to_bits()),
        )),
        StorageDType::F32 => Arc::new(Float32Array::from(values)),
    };
    let len = shape.iter().product::<usize>() as i32;
    Arc::new(FixedSizeListArray::new(item, len, child, None))
}
