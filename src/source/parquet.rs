//! Parquet files with the image bytes in a column (a Hugging Face `Image` struct
//! `{bytes, path}`, or a binary column), read a row group at a time in batches, so memory is
//! bounded by a batch, not by the file. Scalar columns become metadata fields, typed as JSON
//! sidecars are. Dictionary-encoded columns (pandas' `category`) are read as their values.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Schema};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use parquet::file::reader::ChunkReader;
use serde_json::{Map, Value};

use super::{
    escape_bytes, key_problem, read_file, source_bytes, Location, MetadataRead, Sample, SampleRef,
    SourceBytes,
};
use crate::failure::{Failure, FailureKind};
use crate::object::Bucket;
use crate::pool;

/// Rows per read batch: a few dozen images in memory at a time.
const BATCH_ROWS: usize = 32;
/// Column names taken as the image when no `Image` struct is present.
const IMAGE_NAMES: &[&str] = &["image", "jpg", "jpeg", "png", "webp", "video", "mp4"];

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
    /// The `path` field of an `Image` struct: read when the bytes are null.
    image_path: Option<usize>,
    key: Option<usize>,
    caption: Option<usize>,
    /// The metadata columns and their names.
    metadata: Vec<(usize, String)>,
    /// Columns that are none of the above and not scalar (lists, structs, dates): not stored.
    ignored: Vec<String>,
}

/// Checks that `file` (called `name`) is a Parquet file with the columns `columns` asks for (or
/// detects), before any work; returns the columns that will not be stored (`name: type`).
pub fn check<T: ChunkReader>(
    file: &T,
    name: &str,
    columns: &ParquetColumns,
) -> Result<Vec<String>> {
    let meta = ArrowReaderMetadata::load(file, Default::default())
        .with_context(|| format!("{name} is not a readable Parquet file"))?;
    let chosen = choose(meta.schema(), columns).with_context(|| format!("in {name}"))?;
    Ok(chosen.ignored)
}

/// Warns once about the columns of the checked Parquet files that are not stored.
pub fn warn_ignored(ignored: impl IntoIterator<Item = String>) {
    let ignored: std::collections::BTreeSet<String> = ignored.into_iter().collect();
    if !ignored.is_empty() {
        eprintln!(
            "warning: Parquet column(s) {} are not stored: only string, integer, float and \
             boolean columns become metadata columns (cast the others to one of these types)",
            ignored.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
}

/// A column's type as its values are read: a dictionary's value type.
fn value_type(t: &DataType) -> &DataType {
    match t {
        DataType::Dictionary(_, values) => values,
        t => t,
    }
}

/// The batch's columns with dictionary columns unpacked into plain columns of their values.
fn unpack(batch: &RecordBatch) -> Result<Vec<ArrayRef>, ArrowError> {
    batch
        .columns()
        .iter()
        .map(|column| match column.data_type() {
            DataType::Dictionary(_, _) => {
                let dictionary = column.as_any_dictionary();
                arrow_select::take::take(dictionary.values().as_ref(), dictionary.keys(), None)
            }
            _ => Ok(column.clone()),
        })
        .collect()
}

fn choose(schema: &Schema, columns: &ParquetColumns) -> Result<Chosen> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let type_of = |i: usize| value_type(schema.field(i).data_type());
    let find = |name: &str, flag: &str| {
        schema.index_of(name).with_context(|| {
            format!(
                "{flag} {name}: no such column (columns: {})",
                names.join(", ")
            )
        })
    };
    let image_bytes = |i: usize| match type_of(i) {
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
            .find(|&i| matches!(type_of(i), DataType::Struct(_)) && image_bytes(i).is_some())
            .or_else(|| {
                (0..names.len()).find(|&i| {
                    IMAGE_NAMES.contains(&names[i].to_ascii_lowercase().as_str())
                        && image_bytes(i).is_some()
                })
            })
            .with_context(|| {
                format!(
                    "no image column (an `Image` struct of bytes and path, or a binary column \
                     named image, jpg, png, webp, video or mp4); pass --image-column (columns: {})",
                    names.join(", ")
                )
            })?,
    };
    let key = match &columns.key {
        Some(name) => {
            let i = find(name, "--key-column")?;
            if !is_key(type_of(i)) {
                bail!("--key-column {name} must be a string or integer column");
            }
            Some(i)
        }
        None => schema.index_of("key").ok().filter(|&i| is_key(type_of(i))),
    };
    let caption = match &columns.caption {
        Some(name) => {
            let i = find(name, "--caption-column")?;
            if !is_string(type_of(i)) {
                bail!("--caption-column {name} must be a string column");
            }
            Some(i)
        }
        None => ["caption", "text"]
            .iter()
            .find_map(|n| schema.index_of(n).ok())
            .filter(|&i| is_string(type_of(i))),
    };
    let (metadata, ignored): (Vec<usize>, Vec<usize>) = (0..names.len())
        .filter(|&i| Some(i) != key && Some(i) != caption && i != image)
        .filter(|&i| !names[i].starts_with("__"))
        .partition(|&i| is_scalar(type_of(i)));
    let image_path = match type_of(image) {
        DataType::Struct(fields) => fields
            .iter()
            .position(|f| f.name() == "path" && is_string(f.data_type())),
        _ => None,
    };
    Ok(Chosen {
        image,
        image_bytes: image_bytes(image).flatten(),
        image_path,
        key,
        caption,
        metadata: metadata
            .into_iter()
            .map(|i| (i, names[i].to_string()))
            .collect(),
        ignored: ignored
            .into_iter()
            .map(|i| format!("{} ({})", names[i], schema.field(i).data_type()))
            .collect(),
    })
}

/// Streams the rows of the Parquet file `open` opens (keys `UNIT/KEY`, or `UNIT/ROW` without a
/// key column) into `send`; false once `send` refused one. Without `images`, the image column is
/// not read and each sample carries only its metadata (the pre-flight's pass). An `Image` cell
/// without bytes is read from its path, looked for `beside` the file.
pub fn stream<T: ChunkReader + 'static>(
    unit: &str,
    open: &dyn Fn() -> std::io::Result<T>,
    beside: Beside<'_>,
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
        chosen.metadata.iter_mut().for_each(|(m, _)| *m = shift(*m));
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
                match batch.and_then(|batch| Ok((batch.num_rows(), unpack(&batch)?))) {
                    Ok((count, batch)) => {
                        let read = Read {
                            unit,
                            beside,
                            batch: &batch,
                            chosen: &chosen,
                            images,
                        };
                        for r in 0..count {
                            let item = read.sample(r, row, &mut seen);
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

/// Where an `Image` cell's path is looked for when the cell has no bytes.
#[derive(Clone, Copy)]
pub enum Beside<'a> {
    /// Relative to a local Parquet file's folder, then as written.
    Folder(&'a Path),
    /// Relative to the folder of a Parquet object's key, in its bucket.
    Objects(&'a Bucket, &'a str),
}

/// One read batch of a file, with what `sample` needs to make its rows.
struct Read<'a> {
    unit: &'a str,
    beside: Beside<'a>,
    /// The batch's columns, dictionaries unpacked.
    batch: &'a [ArrayRef],
    chosen: &'a Chosen,
    images: bool,
}

impl Read<'_> {
    /// Row `r` of the batch (row `row` of the file) as a sample.
    fn sample(
        &self,
        r: usize,
        row: usize,
        seen: &mut HashSet<String>,
    ) -> Result<SampleRef, Failure> {
        let (unit, chosen, batch) = (self.unit, self.chosen, self.batch);
        let key = match chosen.key {
            None => format!("{unit}/{row:09}"),
            Some(k) => {
                let Some(text) = key_text(&batch[k], r) else {
                    let message = format!("row {row} has a null key");
                    return Err(Failure::new(
                        format!("{unit}/{row:09}"),
                        FailureKind::Refused,
                        message,
                    ));
                };
                let key = format!("{unit}/{}", escape_bytes(text.as_bytes()));
                if let Some(why) = key_problem(&key) {
                    let message = format!(
                        "row {row}: the key value {text:?} cannot be a key ({why}); keys have no \
                         empty, `.` or `..` component and do not start with `/`"
                    );
                    return Err(Failure::new(
                        format!("{unit}/{row:09}"),
                        FailureKind::Refused,
                        message,
                    ));
                }
                key
            }
        };
        if !seen.insert(key.clone()) {
            let message = format!("duplicate key (row {row}): an earlier row has it and was kept");
            return Err(Failure::new(key, FailureKind::Refused, message));
        }
        let bytes = if self.images {
            self.image(&key, r, row)?
        } else {
            SourceBytes::none()
        };
        let caption = chosen
            .caption
            .and_then(|c| string(&batch[c], r))
            .map(|s| s.trim().to_string());
        let mut metadata = Map::new();
        for (m, name) in &chosen.metadata {
            if let Some(value) = scalar(&batch[*m], r) {
                metadata.insert(name.clone(), value);
            }
        }
        let sample = Sample {
            key: key.clone(),
            bytes,
            caption,
            metadata: if metadata.is_empty() {
                MetadataRead::Absent
            } else {
                MetadataRead::Object(metadata)
            },
        };
        Ok(SampleRef {
            key,
            at: Location::Read(Box::new(sample)),
        })
    }

    /// The image bytes of row `r`: the cell's, or the file its `Image` path names.
    fn image(&self, key: &str, r: usize, row: usize) -> Result<SourceBytes, Failure> {
        let image = &self.batch[self.chosen.image];
        let cell = match self.chosen.image_bytes {
            Some(field) if image.is_valid(r) => binary(image.as_struct().column(field), r),
            Some(_) => None,
            None => binary(image, r),
        };
        if let Some(cell) = cell {
            let mut bytes = pool::BYTES.take(cell.len());
            bytes.extend_from_slice(cell);
            return source_bytes(key, bytes);
        }
        let path = self
            .chosen
            .image_path
            .filter(|_| image.is_valid(r))
            .and_then(|field| string(image.as_struct().column(field), r));
        let Some(path) = path else {
            let message = format!("row {row}: the image cell is null (no embedded bytes)");
            return Err(Failure::new(key, FailureKind::Empty, message));
        };
        let folder = match self.beside {
            Beside::Folder(folder) => folder,
            Beside::Objects(bucket, folder) => return object_image(key, row, path, bucket, folder),
        };
        let beside = folder.join(path);
        match [beside.clone(), PathBuf::from(path)]
            .into_iter()
            .find(|p| p.is_file())
        {
            Some(file) => read_file(key, &file),
            None => {
                let message = format!(
                    "row {row}: the image cell has no bytes, and its path {path:?} names no \
                     file (neither {} nor {path} exists)",
                    beside.display()
                );
                Err(Failure::new(key, FailureKind::Io, message))
            }
        }
    }
}

/// The object an `Image` path names beside a Parquet object (`folder` is its key's folder).
fn object_image(
    key: &str,
    row: usize,
    path: &str,
    bucket: &Bucket,
    folder: &str,
) -> Result<SourceBytes, Failure> {
    let fail = |message: String| Err(Failure::new(key, FailureKind::Io, message));
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return fail(format!(
            "row {row}: the image cell has no bytes, and its path {path:?} is not a plain \
             relative path, so it names no object beside the Parquet file"
        ));
    }
    let name = match folder {
        "" => path.to_string(),
        folder => format!("{folder}/{path}"),
    };
    match bucket.get(&name) {
        Ok(Some(body)) => {
            let mut bytes = pool::BYTES.take(body.len());
            bytes.extend_from_slice(&body);
            source_bytes(key, bytes)
        }
        Ok(None) => fail(format!(
            "row {row}: the image cell has no bytes, and its path {path:?} names no object \
             ({}/{name} does not exist)",
            bucket.url
        )),
        Err(e) => fail(format!(
            "row {row}: cannot fetch {}/{name}: {e:#}",
            bucket.url
        )),
    }
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
