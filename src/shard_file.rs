//! One shard being written, with its row groups encoded in parallel.
//!
//! Parquet encoding of the tensor columns (a repetition level per element, then compression) runs
//! at about 30–100 MB/s per core: on a GPU it was the run's bottleneck with one writer thread
//! (benches/gpu/device_check.sh). So each full row group is encoded on the write pool, one column
//! per task, while the next fills; finished groups are appended in order, which keeps the file
//! byte for byte what `ArrowWriter` writes.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef};
use crossbeam_channel::{bounded, Receiver};
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowRowGroupWriterFactory,
};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::store::PendingFile;

type Encoded = parquet::errors::Result<Vec<ArrowColumnChunk>>;

/// A shard open for writing: rows are buffered into row groups of `group_rows`, each encoded on
/// `pool` (at most one group per pool thread in flight, so memory stays bounded).
pub struct ShardFile {
    file: SerializedFileWriter<Box<dyn PendingFile>>,
    columns: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// Parquet leaf columns per Arrow field, to hand each field its column writers.
    leaves: Vec<usize>,
    group_rows: usize,
    buffered: Vec<RecordBatch>,
    buffered_rows: usize,
    next_group: usize,
    in_flight: VecDeque<Receiver<Encoded>>,
    pool: Arc<ThreadPool>,
    /// Rows written so far (buffered included).
    pub rows: usize,
}

impl ShardFile {
    pub fn new(
        pending: Box<dyn PendingFile>,
        schema: SchemaRef,
        props: WriterProperties,
        group_rows: usize,
        pool: Arc<ThreadPool>,
    ) -> Result<Self> {
        // ArrowWriter sets up what the footer needs (the embedded Arrow schema, the Parquet
        // schema); its lower-level halves then take the row groups.
        let (file, columns) =
            ArrowWriter::try_new(pending, schema.clone(), Some(props))?.into_serialized_writer()?;
        let leaves = schema
            .fields()
            .iter()
            .map(|f| leaf_count(f.data_type()))
            .collect();
        Ok(ShardFile {
            file,
            columns,
            schema,
            leaves,
            group_rows: group_rows.max(1),
            buffered: Vec::new(),
            buffered_rows: 0,
            next_group: 0,
            in_flight: VecDeque::new(),
            pool,
            rows: 0,
        })
    }

    /// What is being written, for error messages.
    pub fn describe(&self) -> String {
        self.file.inner().describe()
    }

    /// Adds `batch`'s rows; full row groups go to the pool.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (self.group_rows - self.buffered_rows).min(batch.num_rows() - offset);
            self.buffered.push(batch.slice(offset, take));
            self.buffered_rows += take;
            offset += take;
            if self.buffered_rows == self.group_rows {
                self.submit()?;
            }
        }
        self.rows += batch.num_rows();
        Ok(())
    }

    /// Encodes what is buffered and writes every group and the footer; the file is then ready
    /// to commit.
    pub fn finish(mut self) -> Result<Box<dyn PendingFile>> {
        if self.buffered_rows > 0 {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.append_oldest()?;
        }
        // Writes the footer.
        Ok(self.file.into_inner()?)
    }

    /// Drops the shard: nothing of it is left behind.
    pub fn abort(self) {
        // Encodes in flight finish on the pool and their results are dropped.
        if let Ok(pending) = self.file.into_inner() {
            pending.abort();
        }
    }

    fn submit(&mut self) -> Result<()> {
        let batches = std::mem::take(&mut self.buffered);
        self.buffered_rows = 0;
        let mut writers = self
            .columns
            .create_column_writers(self.next_group)?
            .into_iter();
        self.next_group += 1;
        let per_field: Vec<Vec<ArrowColumnWriter>> = self
            .leaves
            .iter()
            .map(|n| writers.by_ref().take(*n).collect())
            .collect();
        let schema = self.schema.clone();
        let (tx, rx) = bounded(1);
        self.pool.spawn(move || {
            let _ = tx.send(encode_group(&schema, &batches, per_field));
        });
        self.in_flight.push_back(rx);
        while self.in_flight.len() > self.pool.current_num_threads() {
            self.append_oldest()?;
        }
        Ok(())
    }

    fn append_oldest(&mut self) -> Result<()> {
        let rx = self.in_flight.pop_front().expect("a group in flight");
        let chunks = rx
            .recv()
            .context("the write pool dropped a row group")?
            .with_context(|| format!("cannot encode a row group of {}", self.describe()))?;
        let mut group = self.file.next_row_group()?;
        for chunk in chunks {
            chunk.append_to_row_group(&mut group)?;
        }
        group.close()?;
        Ok(())
    }
}

/// Encodes one row group, a task per field; chunks come back in column order.
fn encode_group(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    per_field: Vec<Vec<ArrowColumnWriter>>,
) -> Encoded {
    let per_field: Vec<Vec<ArrowColumnChunk>> = per_field
        .into_par_iter()
        .enumerate()
        .map(|(i, mut writers)| {
            let field = schema.field(i);
            for batch in batches {
                let leaves = compute_leaves(field, batch.column(i))?;
                for (writer, leaf) in writers.iter_mut().zip(&leaves) {
                    writer.write(leaf)?;
                }
            }
            writers.into_iter().map(|w| w.close()).collect()
        })
        .collect::<parquet::errors::Result<_>>()?;
    Ok(per_field.into_iter().flatten().collect())
}

/// Parquet leaf columns an Arrow type becomes.
fn leaf_count(data_type: &DataType) -> usize {
    match data_type {
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => leaf_count(f.data_type()),
        DataType::Struct(fields) => fields.iter().map(|f| leaf_count(f.data_type())).sum(),
        DataType::Dictionary(_, value) => leaf_count(value),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
    use arrow_array::{ArrayRef, Int32Array, StringArray};
    use arrow_schema::{Field, Schema};
    use parquet::basic::{Compression, ZstdLevel};

    use super::*;

    /// Bytes kept in memory, handed out on commit.
    struct Memory(Vec<u8>, Arc<Mutex<Vec<u8>>>);

    impl Write for Memory {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl PendingFile for Memory {
        fn commit(self: Box<Self>) -> Result<()> {
            *self.1.lock().unwrap() = self.0;
            Ok(())
        }
        fn abort(self: Box<Self>) {}
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    fn batch(schema: &SchemaRef, start: i32, rows: i32) -> RecordBatch {
        let mut latents = FixedSizeListBuilder::new(Float32Builder::new(), 4)
            .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
        for r in start..start + rows {
            for j in 0..4 {
                latents.values().append_value((r * 4 + j) as f32 * 0.37);
            }
            latents.append(true);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                (start..start + rows).map(|r| format!("key{r}")),
            )),
            Arc::new(Int32Array::from_iter_values(start..start + rows)),
            Arc::new(latents.finish()),
        ];
        RecordBatch::try_new(schema.clone(), columns).unwrap()
    }

    /// Groups encoded on a pool, out of order, give exactly the bytes `ArrowWriter` writes.
    #[test]
    fn parallel_groups_match_arrow_writer() {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("n", DataType::Int32, false),
            Field::new("latent", DataType::FixedSizeList(item, 4), false),
        ]));
        let props = || {
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap()))
                .set_max_row_group_row_count(Some(7))
                .build()
        };
        let batches: Vec<RecordBatch> = [(0, 5), (5, 9), (14, 1), (15, 20)]
            .iter()
            .map(|&(s, n)| batch(&schema, s, n))
            .collect();

        let mut expected = Vec::new();
        let mut writer =
            ArrowWriter::try_new(&mut expected, schema.clone(), Some(props())).unwrap();
        for b in &batches {
            writer.write(b).unwrap();
        }
        writer.close().unwrap();

        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap(),
        );
        let out = Arc::new(Mutex::new(Vec::new()));
        let pending = Box::new(Memory(Vec::new(), out.clone()));
        let mut shard = ShardFile::new(pending, schema.clone(), props(), 7, pool).unwrap();
        for b in &batches {
            shard.write(b).unwrap();
        }
        assert_eq!(shard.rows, 35);
        shard.finish().unwrap().commit().unwrap();
        let got = out.lock().unwrap().clone();
        assert_eq!(got.len(), expected.len());
        assert!(
            got == expected,
            "the parallel writer's file differs from ArrowWriter's"
        );
    }
}
