//! Write: takes `EncodedBatch`es and `Failure`s, hands on Parquet shards under `OUT/<W>x<H>/`
//! (committed through a `ShardStore`, so each appears whole or not at all), `_errors.jsonl`, and
//! (`seal`) `_manifest.jsonl` then `_SUCCESS`. The shard layout itself is `format`'s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, FixedSizeBinaryArray, FixedSizeListArray, Float16Array, Float64Array, Int32Array,
    ListArray, RecordBatch, StringArray, UInt16Array,
};
use arrow_schema::{DataType, Field, SchemaRef};
use half::{bf16, f16, slice::HalfFloatSliceExt, vec::HalfFloatVecExt};
use rayon::prelude::*;
use rayon::ThreadPool;
use serde::{Deserialize, Serialize};

use crate::encode::EncodedBatch;
use crate::failure::{Failure, FailureKind};
use crate::format::LatentCompression;
use crate::format::{
    self, InputShape, Scope, ShardMetadata, StorageDType, TensorColumns, WindowMeta, MANIFEST,
    SUCCESS,
};
use crate::shard_file::ShardFile;
use crate::store::{Commit, ShardStore};

/// One committed shard, as `_manifest.jsonl` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative to the output folder.
    pub path: String,
    pub rows: i64,
}

/// Every shard in `out` that `owns` picks, with its row count, read from the Parquet footers.
pub fn manifest(out: &dyn ShardStore, owns: impl Fn(&str) -> bool) -> Result<Vec<ManifestEntry>> {
    format::shard_files(out)?
        .into_iter()
        .filter(|shard| owns(shard))
        .map(|shard| {
            let rows = format::footer(out, &shard)?.rows as i64;
            Ok(ManifestEntry { path: shard, rows })
        })
        .collect()
}

/// Marks a run complete: `_manifest.jsonl` lists `entries`, then `_SUCCESS` is written last
/// with the run summary.
pub fn seal(
    out: &dyn ShardStore,
    entries: &[ManifestEntry],
    summary: &serde_json::Value,
) -> Result<()> {
    let mut lines = Vec::new();
    for entry in entries {
        serde_json::to_writer(&mut lines, entry)?;
        lines.push(b'\n');
    }
    out.write(MANIFEST, &lines)?;
    out.write(SUCCESS, serde_json::to_string_pretty(summary)?.as_bytes())
}

/// Counts a finished run hands to its summary.
#[derive(Debug, Default, Clone)]
pub struct WriteTotals {
    pub rows: usize,
    pub shards: usize,
    pub failures: BTreeMap<FailureKind, usize>,
}

impl WriteTotals {
    /// Inputs that could not be used (duplicates under `--dedupe` are not failures).
    pub fn failed(&self) -> usize {
        self.failures
            .iter()
            .filter(|(k, _)| **k != FailureKind::Duplicate)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn duplicates(&self) -> usize {
        self.failures
            .get(&FailureKind::Duplicate)
            .copied()
            .unwrap_or(0)
    }
}

/// Streams rows into rotating Parquet shards, one folder per input shape.
pub struct ShardWriter {
    store: Arc<dyn ShardStore>,
    scope: Scope,
    shard_rows: usize,
    dtype: StorageDType,
    metadata: ShardMetadata,
    tensors: TensorColumns,
    /// Metadata columns (nullable), after `caption`.
    extra_columns: Vec<(String, DataType)>,
    open: HashMap<InputShape, ShardFile>,
    /// Encodes row groups (see `shard_file`).
    pool: Arc<ThreadPool>,
    /// Per shape folder, the part number after the highest committed, so a resumed run never
    /// reuses a name.
    next_part: HashMap<String, usize>,
    schemas: HashMap<InputShape, SchemaRef>,
    /// `_errors.jsonl`, written whole when the writer closes.
    errors: Vec<u8>,
    totals: WriteTotals,
    compression: LatentCompression,
}

impl ShardWriter {
    /// `metadata` goes into every shard; `tensors` and `extra_columns` fix every shard's columns.
    /// Row groups are encoded on `threads` threads.
    pub fn new(
        store: Arc<dyn ShardStore>,
        scope: Scope,
        shard_rows: usize,
        metadata: ShardMetadata,
        tensors: TensorColumns,
        extra_columns: Vec<(String, DataType)>,
        threads: usize,
    ) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("write-{i}"))
            .build()
            .context("cannot start the write thread pool")?;
        let mut next_part: HashMap<String, usize> = HashMap::new();
        for shard in format::shard_files(store.as_ref())? {
            if let Some((dir, name)) = shard.split_once('/') {
                if let Some(n) = scope.part_number(name) {
                    let next = next_part.entry(dir.to_string()).or_default();
                    *next = (*next).max(n + 1);
                }
            }
        }
        Ok(ShardWriter {
            store,
            scope,
            shard_rows,
            dtype: metadata.dtype,
            metadata,
            tensors,
            extra_columns,
            open: HashMap::new(),
            pool: Arc::new(pool),
            next_part,
            schemas: HashMap::new(),
            errors: Vec::new(),
            totals: WriteTotals::default(),
            compression: LatentCompression::default(),
        })
    }

    /// How the tensor columns are encoded and compressed (`--latent-compression`).
    pub fn with_compression(mut self, compression: LatentCompression) -> Self {
        self.compression = compression;
        self
    }

    /// Records an input that could not be used.
    pub fn record_failure(&mut self, failure: &Failure) -> Result<()> {
        serde_json::to_writer(&mut self.errors, failure)?;
        self.errors.push(b'\n');
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
        let shape = batch.input_shape();
        let record = self.record_batch(batch)?;
        let mut offset = 0;
        while offset < record.num_rows() {
            if !self.open.contains_key(&shape) {
                let shard = self.open_shard(shape, record.schema())?;
                self.open.insert(shape, shard);
            }
            let shard = self.open.get_mut(&shape).expect("opened above");
            let take = (self.shard_rows - shard.rows).min(record.num_rows() - offset);
            shard.write(&record.slice(offset, take)).with_context(|| {
                format!(
                    "cannot write {} (disk full?); free space and rerun the same command to resume",
                    shard.describe()
                )
            })?;
            offset += take;
            if shard.rows == self.shard_rows {
                let shard = self.open.remove(&shape).expect("present");
                self.close_shard(shard)?;
            }
        }
        self.totals.rows += record.num_rows();
        Ok(())
    }

    fn open_shard(&mut self, shape: InputShape, schema: SchemaRef) -> Result<ShardFile> {
        let dir_name = format::shape_dir_name(shape);
        let part = self.next_part.entry(dir_name.clone()).or_default();
        let rel = format!("{dir_name}/{}", self.scope.part_name(*part));
        *part += 1;
        let pending = self.store.create(&rel, Commit::CreateOnly)?;
        let group = format::group_rows(format::row_tensor_bytes(&schema), self.shard_rows);
        let props = self
            .compression
            .apply(format::writer_properties(&self.metadata, group)?)?;
        ShardFile::new(pending, schema, props, group, self.pool.clone())
    }

    /// Finishes and commits a shard; on failure nothing of it is left behind.
    fn close_shard(&mut self, shard: ShardFile) -> Result<()> {
        let describe = shard.describe();
        let pending = shard.finish().with_context(|| {
            format!("cannot finish {describe} (disk full?); free space and rerun the same command to resume")
        })?;
        pending.commit().map_err(|e| {
            if e.is::<crate::object::Refused>() {
                e
            } else {
                e.context(format!(
                    "cannot commit {describe} (disk full?); free space and rerun the same command to resume"
                ))
            }
        })?;
        self.totals.shards += 1;
        Ok(())
    }

    /// Commits every open shard and writes the scope's errors (`_errors.jsonl`).
    pub fn close(mut self) -> Result<WriteTotals> {
        let mut open: Vec<_> = self.open.drain().collect();
        open.sort_by_key(|(shape, _)| *shape);
        let mut open = open.into_iter();
        while let Some((_, shard)) = open.next() {
            if let Err(e) = self.close_shard(shard) {
                for (_, rest) in open {
                    rest.abort();
                }
                return Err(e);
            }
        }
        self.store.write(&self.scope.errors(), &self.errors)?;
        Ok(self.totals)
    }

    /// After a failure: drops the unfinished shards, so nothing partial is left behind, and
    /// keeps the failures recorded so far.
    pub fn abort(self) {
        for shard in self.open.into_values() {
            shard.abort();
        }
        let _ = self.store.write(&self.scope.errors(), &self.errors);
    }

    fn schema(&mut self, batch: &EncodedBatch) -> SchemaRef {
        let shape = batch.input_shape();
        let (dtype, tensors) = (self.dtype, self.tensors);
        let (extra, metadata) = (&self.extra_columns, &self.metadata);
        self.schemas
            .entry(shape)
            .or_insert_with(|| format::schema(dtype, &batch.latent_shape, tensors, extra, metadata))
            .clone()
    }

    /// One tensor column in the stored type: f32 moves in without a copy; f16 and bf16 are
    /// converted on the write pool, in chunks with the CPU's conversion instructions, not one
    /// value at a time on the writer's thread.
    fn tensor_column(&self, values: Vec<f32>, shape: &[usize]) -> ArrayRef {
        const CHUNK: usize = 1 << 16;
        let child: ArrayRef = match self.dtype {
            StorageDType::F32 => return format::tensor_array(values, self.dtype, shape),
            StorageDType::F16 => {
                let mut out = vec![f16::ZERO; values.len()];
                self.pool.install(|| {
                    out.par_chunks_mut(CHUNK)
                        .zip(values.par_chunks(CHUNK))
                        .for_each(|(dst, src)| dst.convert_from_f32_slice(src))
                });
                Arc::new(Float16Array::from(out))
            }
            StorageDType::Bf16 => {
                let mut out = vec![bf16::ZERO; values.len()];
                self.pool.install(|| {
                    out.par_chunks_mut(CHUNK)
                        .zip(values.par_chunks(CHUNK))
                        .for_each(|(dst, src)| dst.convert_from_f32_slice(src))
                });
                Arc::new(UInt16Array::from(out.reinterpret_into()))
            }
        };
        let item = Arc::new(Field::new("item", self.dtype.element_type(), true));
        let len = shape.iter().product::<usize>() as i32;
        Arc::new(FixedSizeListArray::new(item, len, child, None))
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
        ];
        if batch.frames.is_some() {
            columns.extend(clip_columns(rows)?);
        }
        columns.push(self.tensor_column(batch.latents, &batch.latent_shape));
        for extra in [batch.stds, batch.flip_latents, batch.flip_stds]
            .into_iter()
            .flatten()
        {
            columns.push(self.tensor_column(extra, &batch.latent_shape));
        }
        columns.push(Arc::new(StringArray::from(
            rows.iter().map(|r| r.caption.clone()).collect::<Vec<_>>(),
        )));
        for (i, (_, data_type)) in self.extra_columns.iter().enumerate() {
            columns.push(crate::sidecar::column_array(
                rows.iter().map(|r| r.extra.get(i).cloned().flatten()),
                data_type,
            ));
        }
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

/// The clip columns (`format::CLIP_COLUMNS`) of a batch of windows.
fn clip_columns(rows: &[crate::batch::RowMeta]) -> Result<[ArrayRef; 5]> {
    let windows = rows
        .iter()
        .map(|r| {
            r.window
                .as_ref()
                .with_context(|| format!("{}: a clip row without its window", r.key))
        })
        .collect::<Result<Vec<_>>>()?;
    let int = |f: fn(&WindowMeta) -> i32| -> ArrayRef {
        Arc::new(Int32Array::from_iter_values(windows.iter().map(|w| f(w))))
    };
    let float = |f: fn(&WindowMeta) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(windows.iter().map(|w| f(w))))
    };
    let indices = ListArray::from_iter_primitive::<Int32Type, _, _>(
        windows
            .iter()
            .map(|w| Some(w.indices.iter().map(|&i| Some(i)).collect::<Vec<_>>())),
    );
    Ok([
        int(|w| w.start),
        int(|w| w.count),
        Arc::new(indices),
        float(|w| w.source_fps),
        float(|w| w.fps),
    ])
}
