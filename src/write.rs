//! Write: takes `EncodedBatch`es and `Failure`s, hands on Parquet shards under `OUT/<W>x<H>/`,
//! `_errors.jsonl`, and (`seal`) `_manifest.jsonl` then `_SUCCESS`. A shard becomes visible only whole:
//! it is written under a temporary name, fsynced and renamed.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeBinaryArray, FixedSizeListArray, Float16Array, Float32Array,
    Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, UInt16Array,
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

/// The Int32 columns recording each row's geometry, in schema order.
const GEOMETRY_COLUMNS: [&str; 6] = [
    "orig_width",
    "orig_height",
    "crop_top",
    "crop_left",
    "width",
    "height",
];
/// The tensor columns, in schema order; all but `latent` are present only when asked for.
const TENSOR_COLUMNS: [&str; 4] = ["latent", "latent_std", "latent_flip", "latent_flip_std"];

/// Whether the shard format owns a column of this name (sidecar fields must not take it).
pub fn is_shard_column(name: &str) -> bool {
    ["key", "source_sha256", "caption"].contains(&name)
        || GEOMETRY_COLUMNS.contains(&name)
        || TENSOR_COLUMNS.contains(&name)
}

/// The shard folders (`<W>x<H>`) in `out`, sorted.
pub fn shape_dirs(out: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && is_shape_dir(&name) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Every committed shard in `out` (`<W>x<H>/part-NNNNN.parquet`), sorted.
pub fn shard_files(out: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in shape_dirs(out)? {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if part_number(&entry.file_name().to_string_lossy()).is_some() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The part number after the highest in `dir`, so a resumed run never reuses a name.
fn next_free_part(dir: &Path) -> Result<usize> {
    let mut next = 0;
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
    {
        if let Some(n) = part_number(&entry.file_name().to_string_lossy()) {
            next = next.max(n + 1);
        }
    }
    Ok(next)
}

fn part_number(name: &str) -> Option<usize> {
    name.strip_prefix("part-")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

fn is_shape_dir(name: &str) -> bool {
    name.split_once('x')
        .is_some_and(|(w, h)| w.parse::<u32>().is_ok() && h.parse::<u32>().is_ok())
}

/// Writer settings every shard shares: zstd; no dictionary or statistics on tensor columns
/// (dictionaries of floats only cost space); row groups capped so memory stays bounded.
pub fn shard_properties(
    metadata: Vec<KeyValue>,
    max_rows: Option<usize>,
) -> Result<WriterProperties> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(max_rows)
        .set_key_value_metadata(Some(metadata));
    for column in TENSOR_COLUMNS {
        let path = ColumnPath::from(vec![column.to_string(), "list".into(), "item".into()]);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    Ok(props.build())
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    commit(&tmp, path)
}

/// Where `path` is written before it is complete: hidden, and removed by a resuming run.
pub fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().expect("file path").to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Marks a run complete: `_manifest.jsonl` lists every shard in `out` with its row count (read
/// from the Parquet footers), then `_SUCCESS` is written last with the run summary.
pub fn seal(
    out: &Path,
    summary: impl FnOnce(&[ManifestEntry]) -> Result<serde_json::Value>,
) -> Result<Vec<ManifestEntry>> {
    let mut entries = Vec::new();
    let mut lines = Vec::new();
    for shard in shard_files(out)? {
        let reader = parquet::file::reader::SerializedFileReader::new(File::open(&shard)?)
            .with_context(|| format!("cannot read {}", shard.display()))?;
        let rows = parquet::file::reader::FileReader::metadata(&reader)
            .file_metadata()
            .num_rows();
        let entry = ManifestEntry {
            path: crate::discover::key_of(out, &shard),
            rows,
        };
        serde_json::to_writer(&mut lines, &entry)?;
        lines.push(b'\n');
        entries.push(entry);
    }
    write_atomic(&out.join(MANIFEST), &lines)?;
    let summary = summary(&entries)?;
    write_atomic(
        &out.join(SUCCESS),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(entries)
}

/// Renames a finished temporary file into place and makes the rename durable.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
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
    /// Relative to the output folder.
    pub path: String,
    pub rows: i64,
}

struct OpenShard {
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    rows: usize,
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
    /// JSON sidecar columns (nullable), after `caption`.
    extra_columns: Vec<(String, DataType)>,
    errors: BufWriter<File>,
    totals: WriteTotals,
}

impl ShardWriter {
    /// `metadata` goes into every shard's Parquet key-value metadata.
    pub fn new(
        out: &Path,
        shard_rows: usize,
        dtype: StorageDType,
        metadata: Vec<(String, String)>,
        extra_columns: Vec<(String, DataType)>,
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
            extra_columns,
            errors: BufWriter::new(errors),
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
            shard.writer.write(&record.slice(offset, take)).with_context(|| {
                format!("cannot write {} (disk full?); free space and rerun the same command to resume", shard.tmp.display())
            })?;
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
        let dir = self.out.join(format!("{}x{}", shape.0, shape.1));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let part = match self.next_part.get_mut(&shape) {
            Some(part) => part,
            None => {
                let next = next_free_part(&dir)?;
                self.next_part.entry(shape).or_insert(next)
            }
        };
        let name = format!("part-{part:05}.parquet");
        *part += 1;
        let path = dir.join(&name);
        let tmp = tmp_name(&path);
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let tensor_columns = schema
            .fields()
            .iter()
            .filter(|f| f.name().starts_with("latent"))
            .count();
        let row_bytes =
            latent_shape.iter().product::<usize>() * self.dtype.bytes() * tensor_columns;
        let max_rows = self.shard_rows.min((ROW_GROUP_BYTES / row_bytes).max(1));
        let props = shard_properties(self.metadata.clone(), Some(max_rows))?;
        let writer = ArrowWriter::try_new(file, schema, Some(props))?;
        Ok(OpenShard {
            writer,
            tmp,
            path,
            rows: 0,
        })
    }

    /// Finishes, fsyncs and renames a shard; on failure its temporary file is removed.
    fn close_shard(&mut self, shard: OpenShard) -> Result<()> {
        let OpenShard {
            writer, tmp, path, ..
        } = shard;
        let finished = writer
            .into_inner()
            .map_err(anyhow::Error::from)
            .and_then(|f| Ok(f.sync_all()?));
        if let Err(e) = finished {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!(
                "cannot finish {} (disk full?); free space and rerun the same command to resume",
                tmp.display()
            )));
        }
        commit(&tmp, &path)?;
        self.totals.shards += 1;
        Ok(())
    }

    /// Commits every open shard and flushes `_errors.jsonl`.
    pub fn close(mut self) -> Result<WriteTotals> {
        let mut open: Vec<_> = self.open.drain().collect();
        open.sort_by_key(|(shape, _)| *shape);
        let mut open = open.into_iter();
        while let Some((_, shard)) = open.next() {
            if let Err(e) = self.close_shard(shard) {
                for (_, rest) in open {
                    let _ = std::fs::remove_file(&rest.tmp);
                }
                return Err(e);
            }
        }
        self.errors.flush()?;
        self.errors.get_ref().sync_all()?;
        Ok(self.totals)
    }

    /// After a failure: removes the unfinished shards' temporary files, so nothing partial is
    /// left behind (a resuming run would remove them too).
    pub fn abort(self) {
        for shard in self.open.into_values() {
            drop(shard.writer);
            let _ = std::fs::remove_file(&shard.tmp);
        }
    }

    fn schema(&mut self, batch: &EncodedBatch) -> SchemaRef {
        let shape = (batch.width, batch.height);
        let dtype = self.dtype;
        let extra = self.extra_columns.clone();
        self.schemas
            .entry(shape)
            .or_insert_with(|| {
                let mut fields = vec![
                    Field::new("key", DataType::Utf8, false),
                    Field::new("source_sha256", DataType::FixedSizeBinary(32), false),
                ];
                for name in GEOMETRY_COLUMNS {
                    fields.push(Field::new(name, DataType::Int32, false));
                }
                let present = [
                    true,
                    batch.stds.is_some(),
                    batch.flip_latents.is_some(),
                    batch.flip_stds.is_some(),
                ];
                for (name, _) in TENSOR_COLUMNS.iter().zip(present).filter(|t| t.1) {
                    fields.push(tensor_field(name, dtype, batch.latent_shape));
                }
                fields.push(Field::new("caption", DataType::Utf8, true));
                for (name, data_type) in &extra {
                    fields.push(Field::new(name, data_type.clone(), true));
                }
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
        for extra in [batch.stds, batch.flip_latents, batch.flip_stds]
            .into_iter()
            .flatten()
        {
            columns.push(tensor_array(extra, self.dtype, batch.latent_shape));
        }
        columns.push(Arc::new(StringArray::from(
            rows.iter().map(|r| r.caption.clone()).collect::<Vec<_>>(),
        )));
        for (i, (_, data_type)) in self.extra_columns.iter().enumerate() {
            columns.push(sidecar_array(rows, i, data_type));
        }
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

/// Column `i` of the rows' JSON sidecar values; values of another type are null (the schema
/// was inferred to hold them all, so this only happens for fields a sidecar lacks).
fn sidecar_array(rows: &[crate::batch::RowMeta], i: usize, data_type: &DataType) -> ArrayRef {
    use crate::sidecar::Scalar;
    let value = |r: &crate::batch::RowMeta| r.extra.get(i).cloned().flatten();
    match data_type {
        DataType::Boolean => Arc::new(BooleanArray::from(
            rows.iter()
                .map(|r| match value(r) {
                    Some(Scalar::Bool(b)) => Some(b),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )),
        DataType::Int64 => Arc::new(Int64Array::from(
            rows.iter()
                .map(|r| match value(r) {
                    Some(Scalar::Int(v)) => Some(v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )),
        DataType::Float64 => Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| match value(r) {
                    Some(Scalar::Float(v)) => Some(v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )),
        _ => Arc::new(StringArray::from(
            rows.iter()
                .map(|r| match value(r) {
                    Some(Scalar::Text(v)) => Some(v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )),
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
