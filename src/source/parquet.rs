//! Parquet files with the image bytes in a column (a Hugging Face `Image` struct
//! `{bytes, path}`, or a binary column), read a row group at a time in batches, so memory is
//! bounded by a batch, not by the file. Scalar columns become metadata fields, typed as JSON
//! sidecars are.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::ChunkReader;
use serde_json::{Map, Value};

use super::{escape_bytes, source_bytes, Location, Sample, SampleRef, SourceBytes};
use crate::failure::{Failure, FailureKind};
use crate::pool;

/// Rows per read batch: a few dozen images in memory at a time.
const BATCH_ROWS: usize = 32;
/// Column names taken as the image when no `Image` struct is present.
const IMAGE_NAMES: &[&str] = &["image", "jpg", "jpeg", "png", "webp"];

/// `--image-column`, `--key-column`, `--caption-column`: None = detect.
#[derive(Debug, Clone, Default)]
pub struct ParquetColumns {
    pub image: Option<String>,
    pub key: Option<String>,
    pub caption: Option<String>,
}

/// Where one file's image, key, caption and metadata are.
struct Chosen {
    image: usize,
    /// The `bytes` field of an `Image` struct.
    image_bytes: Option<usize>,
    key: Option<usize>,
    caption: Option<usize>,
    metadata: Vec<usize>,
}

/// Checks that `file` (called `name`) is a Parquet file with the columns `columns` asks for (or
/// detects), before any work.
pub fn check<T: ChunkReader>(file: &T, name: &str, columns: &ParquetColumns) -> Result<()> {
    let meta = ArrowReaderMetadata::load(file, Default::default())
        .with_context(|| format!("{name} is not a readable Parquet file"))?;
    choose(meta.schema(), columns).with_context(|| format!("in {name}"))?;
    Ok(())
}

fn choose(schema: &Schema, columns: &ParquetColumns) -> Result<Chosen> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let find = |name: &str, flag: &str| {
        schema.index_of(name).with_context(|| {
            format!(
                "{flag} {name}: no such column (columns: {})",
                names.join(", ")
            )
        })
    };
    let image_bytes = |i: usize| match schema.field(i).data_type() {
        DataType::Struct(fields) => fields
            .iter()
            .position(|f| f.name() == "bytes" && is_binary(f.data_type()))
            .map(Some),
        t if is_binary(t) => Some(None),
        _ => None,
    };
    let image = match &columns.image {
        Some(name) => {
            let i = find(name, "--image-column")?;
            if image_bytes(i).is_none() {
                bail!("--image-column {name} is neither binary nor a struct with a binary `bytes` field");
            }
            i
        }
        None => (0..names.len())
            .find(|&i| {
                matches!(schema.field(i).data_type(), DataType::Struct(_))
                    && image_bytes(i).is_some()
            })
            .or_else(|| {
                (0..names.len()).find(|&i| {
                    IMAGE_NAMES.contains(&names[i].to_ascii_lowercase().as_str())
                        && image_bytes(i).is_some()
                })
            })
            .with_context(|| {
                format!(
                    "no image column (an `Image` struct of bytes and path, or a binary column \
                     named image, jpg, png or webp); pass --image-column (columns: {})",
                    names.join(", ")
                )
            })?,
    };
    let key = match &columns.key {
        Some(name) => {
            let i = find(name, "--key-column")?;
            if !is_key(schema.field(i).data_type()) {
                bail!("--key-column {name} must be a string or integer column");
            }
            Some(i)
        }
        None => schema
            .index_of("key")
            .ok()
            .filter(|&i| is_key(schema.field(i).data_type())),
    };
    let caption = match &columns.caption {
        Some(name) => {
            let i = find(name, "--caption-column")?;
            if !is_string(schema.field(i).data_type()) {
                bail!("--caption-column {name} must be a string column");
            }
            Some(i)
        }
        None => ["caption", "text"]
            .iter()
            .find_map(|n| schema.index_of(n).ok())
            .filter(|&i| is_string(schema.field(i).data_type())),
    };
    let metadata = (0..names.len())
        .filter(|&i| Some(i) != key && Some(i) != caption && i != image)
        .filter(|&i| !names[i].starts_with("__") && is_scalar(schema.field(i).data_type()))
        .collect();
    Ok(Chosen {
        image,
        image_bytes: image_bytes(image).flatten(),
        key,
        caption,
        metadata,
    })
}

/// Streams the rows of the Parquet file `open` opens (keys `UNIT/KEY`, or `UNIT/ROW` without a
/// key column) into `send`; false once `send` refused one. Without `images`, the image column is
/// not read and each sample carries only its metadata (the pre-flight's pass).
pub fn stream<T: ChunkReader + 'static>(
    unit: &str,
    open: &dyn Fn() -> std::io::Result<T>,
    columns: &ParquetColumns,
    images: bool,
    send: &mut dyn FnMut(Result<SampleRef, Failure>) -> bool,
) -> bool {
    let fail = |kind, message: String| Err(Failure::new(unit, kind, message));
    let file = match open() {
        Ok(file) => file,
        Err(e) => return send(fail(FailureKind::Io, format!("cannot open: {e}"))),
    };
    let meta = match ArrowReaderMetadata::load(&file, Default::default()) {
        Ok(meta) => meta,
        Err(e) => {
            return send(fail(
                FailureKind::Corrupt,
                format!("not a readable Parquet file: {e}"),
            ))
        }
    };
    let mut chosen = match choose(meta.schema(), columns) {
        Ok(chosen) => chosen,
        Err(e) => return send(fail(FailureKind::Refused, format!("{e:#}"))),
    };
    let all = 0..meta.schema().fields().len();
    let projection = if images {
        ProjectionMask::all()
    } else {
        // Every top-level column but the image; the indices after it move down by one.
        let image = chosen.image;
        let shift = |i: usize| if i > image { i - 1 } else { i };
        chosen.key = chosen.key.map(shift);
        chosen.caption = chosen.caption.map(shift);
        chosen.metadata.iter_mut().for_each(|m| *m = shift(*m));
        let roots = all.filter(|&i| i != image);
        ProjectionMask::roots(meta.metadata().file_metadata().schema_descr(), roots)
    };
    let mut seen = HashSet::new();
    let mut first_row = 0usize;
    for group in 0..meta.metadata().num_row_groups() {
        let rows = meta.metadata().row_group(group).num_rows() as usize;
        let reader = open().map_err(|e| e.to_string()).and_then(|f| {
            ParquetRecordBatchReaderBuilder::new_with_metadata(f, meta.clone())
                .with_projection(projection.clone())
                .with_row_groups(vec![group])
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| e.to_string())
        });
        let mut row = first_row;
        let mut failed = reader.as_ref().err().cloned();
        if let Ok(reader) = reader {
            for batch in reader {
                match batch {
                    Ok(batch) => {
                        for r in 0..batch.num_rows() {
                            let item = sample(unit, &batch, r, row, &chosen, images, &mut seen);
                            if !send(item) {
                                return false;
                            }
                            row += 1;
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            let message = format!(
                "row group {group} (rows {row}..{}) unreadable; its other rows are skipped: {e}",
                first_row + rows
            );
            let key = format!("{unit}/row-group-{group}");
            if !send(Err(Failure::new(key, FailureKind::Corrupt, message))) {
                return false;
            }
        }
        first_row += rows;
    }
    true
}

/// Row `r` of `batch` (row `row` of the file) as a sample.
fn sample(
    unit: &str,
    batch: &RecordBatch,
    r: usize,
    row: usize,
    chosen: &Chosen,
    images: bool,
    seen: &mut HashSet<String>,
) -> Result<SampleRef, Failure> {
    let key = match chosen.key {
        None => format!("{unit}/{row:09}"),
        Some(k) => match key_text(batch.column(k), r) {
            Some(text) => format!("{unit}/{}", escape_bytes(text.as_bytes())),
            None => {
                let message = format!("row {row} has a null key");
                return Err(Failure::new(
                    format!("{unit}/{row:09}"),
                    FailureKind::Refused,
                    message,
                ));
            }
        },
    };
    if !seen.insert(key.clone()) {
        let message = format!("duplicate key (row {row}): an earlier row has it and was kept");
        return Err(Failure::new(key, FailureKind::Refused, message));
    }
    let bytes = if images {
        let image = batch.column(chosen.image);
        let cell = match chosen.image_bytes {
            Some(field) if image.is_valid(r) => binary(image.as_struct().column(field), r),
            Some(_) => None,
            None => binary(image, r),
        };
        let Some(cell) = cell else {
            let message = format!("row {row}: the image cell is null (no embedded bytes)");
            return Err(Failure::new(key, FailureKind::Empty, message));
        };
        let mut bytes = pool::BYTES.take(cell.len());
        bytes.extend_from_slice(cell);
        source_bytes(&key, bytes)?
    } else {
        SourceBytes::none()
    };
    let caption = chosen
        .caption
        .and_then(|c| string(batch.column(c), r))
        .map(|s| s.trim().to_string());
    let mut metadata = Map::new();
    for &m in &chosen.metadata {
        if let Some(value) = scalar(batch.column(m), r) {
            metadata.insert(batch.schema().field(m).name().clone(), value);
        }
    }
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let sample = Sample {
        key: key.clone(),
        bytes,
        caption,
        metadata,
    };
    Ok(SampleRef {
        key,
        at: Location::Read(Box::new(sample)),
    })
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_key(t: &DataType) -> bool {
    is_string(t) || t.is_integer()
}

fn is_scalar(t: &DataType) -> bool {
    is_string(t) || t.is_integer() || t.is_floating() || *t == DataType::Boolean
}

fn binary(array: &ArrayRef, r: usize) -> Option<&[u8]> {
    if array.is_null(r) {
        return None;
    }
    match array.data_type() {
        DataType::Binary => Some(array.as_binary::<i32>().value(r)),
        DataType::LargeBinary => Some(array.as_binary::<i64>().value(r)),
        DataType::BinaryView => Some(array.as_binary_view().value(r)),
        _ => None,
    }
}

fn string(array: &ArrayRef, r: usize) -> Option<&str> {
    if array.is_null(r) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(r)),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(r)),
        DataType::Utf8View => Some(array.as_string_view().value(r)),
        _ => None,
    }
}

fn key_text(array: &ArrayRef, r: usize) -> Option<String> {
    match scalar(array, r)? {
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// A scalar cell as the JSON value a sidecar would hold; None for null and non-finite floats.
fn scalar(array: &ArrayRef, r: usize) -> Option<Value> {
    if array.is_null(r) {
        return None;
    }
    macro_rules! int {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(r))
        };
    }
    let value = match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(r)),
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float16 => float(array.as_primitive::<Float16Type>().value(r).to_f64())?,
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(r) as f64)?,
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(r))?,
        _ => Value::String(string(array, r)?.to_string()),
    };
    Some(value)
}

fn float(v: f64) -> Option<Value> {
    serde_json::Number::from_f64(v).map(Value::Number)
}
