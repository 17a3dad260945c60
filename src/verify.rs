//! Verify and inspect: take a shard set (an output folder of `precompute`), hand on a verdict on
//! whether it is complete and sane, or a description of what it holds. Reads only what the files
//! say: a trainer's view of the set, not the run's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, FixedSizeListArray, Float16Array, Float32Array, StringArray, UInt16Array,
};
use arrow_schema::{DataType, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::write::{self, CONFIG, ERRORS, MANIFEST, SUCCESS};

/// What `verify` found. `problems` empty means the set is complete and sane.
#[derive(Debug, Default)]
pub struct Verdict {
    pub shards: usize,
    pub rows: usize,
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Every problem on its own line, then the one-line verdict.
    pub fn print(&self, out: &Path) {
        for p in &self.problems {
            eprintln!("problem: {p}");
        }
        if self.ok() {
            println!(
                "ok: {} rows in {} shards in {}",
                self.rows,
                self.shards,
                out.display()
            );
        } else {
            println!(
                "FAILED: {} problem(s) in {} ({} rows in {} shards read)",
                self.problems.len(),
                out.display(),
                self.rows,
                self.shards
            );
        }
    }
}

/// Reads every shard of `out` and checks: `_SUCCESS` present; one config hash everywhere; one
/// schema per shape folder and the same columns across folders; the latent a fixed_shape_tensor;
/// keys unique across the set; every latent finite; row counts equal to `_manifest.jsonl`.
pub fn verify(out: &Path) -> Result<Verdict> {
    if !out.is_dir() {
        bail!("{} is not a folder", out.display());
    }
    let mut v = Verdict::default();
    if !out.join(SUCCESS).exists() {
        v.problems.push(format!(
            "{SUCCESS} is missing: the run did not finish (rerun the same command to resume)"
        ));
    }
    let config_hash = std::fs::read_to_string(out.join(CONFIG))
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                Some(
                    l.strip_prefix("config_hash = \"")?
                        .strip_suffix('"')?
                        .to_string(),
                )
            })
        });
    if config_hash.is_none() {
        v.problems
            .push(format!("{CONFIG} is missing or has no config_hash"));
    }
    let manifest = read_manifest(out, &mut v.problems);
    let mut keys: HashSet<String> = HashSet::new();
    let mut folder_schema: HashMap<PathBuf, Schema> = HashMap::new();
    let mut columns: Option<Vec<String>> = None;
    let mut seen = HashSet::new();
    for shard in write::shard_files(out)? {
        let rel = crate::discover::key_of(out, &shard);
        seen.insert(rel.clone());
        v.shards += 1;
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(&shard)?)
            .with_context(|| format!("cannot read {}", shard.display()))?;
        let schema = builder.schema().as_ref().clone();
        let meta: HashMap<String, String> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(hash) = &config_hash {
            if meta.get("vae_pipeline.config_hash") != Some(hash) {
                v.problems.push(format!(
                    "{rel}: config_hash {:?} differs from {CONFIG}'s {hash}",
                    meta.get("vae_pipeline.config_hash")
                ));
            }
        }
        let folder = shard.parent().expect("shard in a folder").to_path_buf();
        match folder_schema.get(&folder) {
            Some(first) if *first != schema => v.problems.push(format!(
                "{rel}: schema differs from the folder's other shards"
            )),
            Some(_) => {}
            None => {
                folder_schema.insert(folder, schema.clone());
            }
        }
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        match &columns {
            Some(c) if *c != names => v
                .problems
                .push(format!("{rel}: columns {names:?} differ from {c:?}")),
            Some(_) => {}
            None => columns = Some(names),
        }
        let tensors: Vec<String> = ["latent", "latent_std", "latent_flip", "latent_flip_std"]
            .into_iter()
            .filter(|c| schema.field_with_name(c).is_ok())
            .map(String::from)
            .collect();
        match schema.field_with_name("latent") {
            Ok(f)
                if f.metadata().get("ARROW:extension:name").map(String::as_str)
                    == Some("arrow.fixed_shape_tensor") => {}
            _ => v.problems.push(format!(
                "{rel}: `latent` is not an arrow.fixed_shape_tensor column"
            )),
        }
        let mut rows = 0;
        for batch in builder.build()? {
            let batch = batch.with_context(|| format!("cannot read {}", shard.display()))?;
            rows += batch.num_rows();
            let Some(key_col) = batch
                .column_by_name("key")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            else {
                v.problems.push(format!("{rel}: no utf8 `key` column"));
                break;
            };
            for key in key_col.iter().flatten() {
                if !keys.insert(key.to_string()) {
                    v.problems.push(format!(
                        "{rel}: key {key:?} appears more than once in the set"
                    ));
                }
            }
            for column in &tensors {
                let list = batch
                    .column_by_name(column)
                    .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>());
                match list.map(|l| non_finite(l.values().as_ref())) {
                    Some(Some(0)) => {}
                    Some(Some(n)) => v
                        .problems
                        .push(format!("{rel}: {n} NaN/Inf values in `{column}`")),
                    _ => v.problems.push(format!(
                        "{rel}: `{column}` is not a float16/float32/bf16 tensor column"
                    )),
                }
            }
        }
        v.rows += rows;
        match manifest.as_ref().and_then(|m| m.get(&rel)) {
            Some(&n) if n as usize == rows => {}
            Some(n) => v
                .problems
                .push(format!("{rel}: {rows} rows, but {MANIFEST} says {n}")),
            None if manifest.is_some() => v
                .problems
                .push(format!("{rel} is not listed in {MANIFEST}")),
            None => {}
        }
    }
    if let Some(m) = &manifest {
        for path in m.keys().filter(|p| !seen.contains(*p)) {
            v.problems
                .push(format!("{MANIFEST} lists {path}, which is missing"));
        }
    }
    if v.shards == 0 {
        v.problems
            .push("no shards (<W>x<H>/part-*.parquet) found".into());
    }
    Ok(v)
}

fn read_manifest(out: &Path, problems: &mut Vec<String>) -> Option<BTreeMap<String, i64>> {
    let Ok(text) = std::fs::read_to_string(out.join(MANIFEST)) else {
        problems.push(format!("{MANIFEST} is missing"));
        return None;
    };
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                rows.insert(
                    v["path"].as_str().unwrap_or_default().to_string(),
                    v["rows"].as_i64().unwrap_or(-1),
                );
            }
            Err(e) => problems.push(format!("{MANIFEST}: bad line {line:?}: {e}")),
        }
    }
    Some(rows)
}

/// Count of NaN/Inf among tensor values, or None for an element type latents are not stored as.
fn non_finite(values: &dyn Array) -> Option<usize> {
    let any = values.as_any();
    if let Some(a) = any.downcast_ref::<Float16Array>() {
        return Some(a.values().iter().filter(|v| !v.is_finite()).count());
    }
    if let Some(a) = any.downcast_ref::<Float32Array>() {
        return Some(a.values().iter().filter(|v| !v.is_finite()).count());
    }
    any.downcast_ref::<UInt16Array>().map(|a| {
        a.values()
            .iter()
            .filter(|&&b| !half::bf16::from_bits(b).is_finite())
            .count()
    })
}

/// Prints what a shard set holds: rows and shards per shape folder, the latent's type and shape,
/// the model and normalization, failures by kind, and the recorded config.
pub fn inspect(out: &Path) -> Result<()> {
    let shards = write::shard_files(out)?;
    if shards.is_empty() {
        bail!("{} holds no shards (<W>x<H>/part-*.parquet)", out.display());
    }
    let mut per_folder: BTreeMap<String, (usize, i64, String)> = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for shard in &shards {
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(shard)?)
            .with_context(|| format!("cannot read {}", shard.display()))?;
        let rows = builder.metadata().file_metadata().num_rows();
        let latent = builder
            .schema()
            .field_with_name("latent")
            .map(|f| {
                let shape = f
                    .metadata()
                    .get("ARROW:extension:metadata")
                    .cloned()
                    .unwrap_or_default();
                match f.data_type() {
                    DataType::FixedSizeList(item, _) => format!("{} {shape}", item.data_type()),
                    other => format!("{other}"),
                }
            })
            .unwrap_or_else(|_| "no latent column".into());
        if let Some(kv) = builder.metadata().file_metadata().key_value_metadata() {
            for k in kv
                .iter()
                .filter(|k| k.key.starts_with("vae_pipeline.") && k.key != "vae_pipeline.config")
            {
                meta.insert(k.key.clone(), k.value.clone().unwrap_or_default());
            }
        }
        let folder = shard
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let entry = per_folder.entry(folder).or_insert((0, 0, latent));
        entry.0 += 1;
        entry.1 += rows;
    }
    println!("{}", out.display());
    for (folder, (n, rows, latent)) in &per_folder {
        println!("  {folder}: {rows} rows in {n} shard(s); latent {latent}");
    }
    for (k, v) in &meta {
        println!("  {}: {v}", k.trim_start_matches("vae_pipeline."));
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(out.join(ERRORS)) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                *kinds
                    .entry(v["kind"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
            }
        }
    }
    let errors: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  errors: {}",
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        }
    );
    println!(
        "  complete: {}",
        if out.join(SUCCESS).exists() {
            "yes (_SUCCESS)"
        } else {
            "no (_SUCCESS missing)"
        }
    );
    if let Ok(config) = std::fs::read_to_string(out.join(CONFIG)) {
        println!("  config:");
        for line in config.lines() {
            println!("    {line}");
        }
    }
    Ok(())
}
