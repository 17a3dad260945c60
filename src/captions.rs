//! Captions: takes `--captions FILE` (CSV or Parquet with `key` and `caption` columns), hands on
//! key → caption, which overrides the sidecar `NAME.txt` / `NAME.caption` that decode reads.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Reads every (key, caption) pair; a Parquet file by its magic bytes, CSV (with a header row)
/// otherwise.
pub fn load(path: &Path) -> Result<HashMap<String, String>> {
    let context = || format!("cannot read --captions {}", path.display());
    let mut magic = [0u8; 4];
    let is_parquet =
        std::io::Read::read_exact(&mut File::open(path).with_context(context)?, &mut magic).is_ok()
            && &magic == b"PAR1";
    if is_parquet {
        from_parquet(path).with_context(context)
    } else {
        from_csv(path).with_context(context)
    }
}

fn from_csv(path: &Path) -> Result<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path)?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(k), Some(c)) = (column("key"), column("caption")) else {
        bail!(
            "the CSV header must name `key` and `caption` columns, got {:?}",
            headers.iter().collect::<Vec<_>>()
        );
    };
    let mut captions = HashMap::new();
    for record in reader.records() {
        let record = record?;
        captions.insert(
            record.get(k).unwrap_or_default().to_string(),
            record.get(c).unwrap_or_default().to_string(),
        );
    }
    Ok(captions)
}

fn from_parquet(path: &Path) -> Result<HashMap<String, String>> {
    let mut captions = HashMap::new();
    for batch in ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?.build()? {
        let batch = batch?;
        let column = |name: &str| -> Result<Vec<Option<String>>> {
            let col = batch
                .column_by_name(name)
                .with_context(|| format!("no `{name}` column"))?;
            let strings: Vec<Option<String>> = if let Some(a) = col.as_string_opt::<i32>() {
                a.iter().map(|v| v.map(String::from)).collect()
            } else if let Some(a) = col.as_string_opt::<i64>() {
                a.iter().map(|v| v.map(String::from)).collect()
            } else if let Some(a) = col.as_string_view_opt() {
                a.iter().map(|v| v.map(String::from)).collect()
            } else {
                bail!("`{name}` is {}, not a string column", col.data_type());
            };
            Ok(strings)
        };
        for (key, text) in column("key")?.into_iter().zip(column("caption")?) {
            if let (Some(key), Some(text)) = (key, text) {
                captions.insert(key, text);
            }
        }
    }
    Ok(captions)
}
