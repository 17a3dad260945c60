//! `verify` and `inspect` on real shard sets, intact and damaged in the ways a user's copy of a
//! cache gets damaged (half-finished, a shard copied twice, a NaN written by another tool).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

fn verify(out: &Path) -> (bool, String, String) {
    let r = vae_pipeline(&["verify", s(out)]);
    (
        r.status.success(),
        String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr(&r),
    )
}

/// A finished f32 set of 5 Kodak images at 64², 2 rows per shard, in `dir/name`.
fn shard_set(dir: &Path, name: &str) -> std::path::PathBuf {
    let input = dir.join("input");
    if !input.exists() {
        kodak_subset(dir, 5);
    }
    let out = dir.join(name);
    let card = card_file(dir, "taef2");
    let r = precompute_f32(&input, &out, &card, "64", &["--shard-rows", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    out
}

#[test]
fn an_intact_set_verifies_and_inspects() {
    let dir = scratch("verify-ok");
    let out = shard_set(&dir, "out");
    let (ok, stdout, err) = verify(&out);
    assert!(
        ok && stdout.starts_with("ok: 5 rows in 3 shards"),
        "{stdout}{err}"
    );
    let r = vae_pipeline(&["inspect", s(&out)]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(
        text.contains("64x64: 5 rows in 3 shard(s); latent Float32 [32, 8, 8]"),
        "{text}"
    );
    assert!(
        text.contains("model: taef2")
            && text.contains("errors: none")
            && text.contains("complete: yes"),
        "{text}"
    );
}

#[test]
fn damaged_sets_fail_with_the_reason() {
    let dir = scratch("verify-damaged");

    let unfinished = shard_set(&dir, "unfinished");
    std::fs::remove_file(unfinished.join("_SUCCESS")).unwrap();
    let (ok, stdout, err) = verify(&unfinished);
    assert!(
        !ok && stdout.starts_with("FAILED: 1 problem") && err.contains("_SUCCESS is missing"),
        "{stdout}{err}"
    );

    let doubled = shard_set(&dir, "doubled");
    std::fs::copy(
        doubled.join("64x64/part-00000.parquet"),
        doubled.join("64x64/part-00007.parquet"),
    )
    .unwrap();
    let (ok, _, err) = verify(&doubled);
    assert!(
        !ok && err.contains("appears more than once")
            && err.contains("not listed in _manifest.jsonl"),
        "{err}"
    );

    let nan = shard_set(&dir, "nan");
    poison_first_value(&nan.join("64x64/part-00001.parquet"));
    let (ok, _, err) = verify(&nan);
    assert!(
        !ok && err.contains("64x64/part-00001.parquet: 1 NaN/Inf values in `latent`"),
        "{err}"
    );
}

/// Rewrites a shard with its first latent value set to NaN, keeping schema and metadata.
fn poison_first_value(path: &Path) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let schema = builder.schema().clone();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(Result::unwrap).collect();
    let props = WriterProperties::builder()
        .set_key_value_metadata(kv)
        .build();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), schema.clone(), Some(props)).unwrap();
    for (i, batch) in batches.into_iter().enumerate() {
        let idx = batch.schema().index_of("latent").unwrap();
        let list = batch
            .column(idx)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap();
        let mut values = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .unwrap()
            .values()
            .to_vec();
        if i == 0 {
            values[0] = f32::NAN;
        }
        let arrow_schema::DataType::FixedSizeList(field, size) = list.data_type().clone() else {
            panic!("latent is a fixed-size list")
        };
        let poisoned: ArrayRef = Arc::new(FixedSizeListArray::new(
            field,
            size,
            Arc::new(Float32Array::from(values)),
            None,
        ));
        let mut columns = batch.columns().to_vec();
        columns[idx] = poisoned;
        writer
            .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
            .unwrap();
    }
    writer.close().unwrap();
}
