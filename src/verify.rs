//! Verify and inspect: take a shard set (an output folder of `precompute`), hand on a verdict on
//! whether it is complete and sane, or a description of what it holds. Reads only what the files
//! say: a trainer's view of the set, not the run's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Result};
use arrow_array::{Array, FixedSizeListArray, StringArray};
use arrow_schema::DataType;

use crate::format::{self, CONFIG, ERRORS, MANIFEST, PLAN, SUCCESS};
use crate::store::ShardStore;

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

    /// Every problem on its own line (for stderr).
    pub fn problem_lines(&self) -> String {
        self.problems
            .iter()
            .map(|p| format!("problem: {p}\n"))
            .collect()
    }

    /// The one-line verdict (for stdout).
    pub fn line(&self, out: &Path) -> String {
        if self.ok() {
            format!(
                "ok: {} rows in {} shards in {}\n",
                self.rows,
                self.shards,
                out.display()
            )
        } else {
            format!(
                "FAILED: {} problem(s) in {} ({} rows in {} shards read)\n",
                self.problems.len(),
                out.display(),
                self.rows,
                self.shards
            )
        }
    }
}

/// Reads every shard of `out` and checks: `_SUCCESS` present; one identity everywhere; one
/// schema per shape folder and the same columns across folders; the latent a fixed_shape_tensor;
/// keys unique across the set; every latent finite; row counts equal to `_manifest.jsonl`; no
/// foreign files among the shards. A shard that cannot be read is a problem, and the rest are
/// still checked.
pub fn verify(root: &Path) -> Result<Verdict> {
    if !root.to_string_lossy().contains("://") && !root.is_dir() {
        bail!("{} is not a folder", root.display());
    }
    let store = crate::store::open(root)?;
    let out = store.as_ref();
    let mut v = Verdict::default();
    if out.read(SUCCESS)?.is_none() {
        v.problems.push(if out.read(PLAN)?.is_some() {
            unfinalized(root).unwrap_or_else(|e| {
                format!("{SUCCESS} is missing: this many-worker run is not finalized ({e:#})")
            })
        } else {
            format!(
                "{SUCCESS} is missing: the run did not finish (rerun the same command to resume)"
            )
        });
    }
    let identity_hash = match crate::resume::ConfigFile::read(out) {
        Ok(Some(c)) => Some(c.identity_hash),
        Ok(None) => {
            v.problems.push(format!("{CONFIG} is missing"));
            None
        }
        Err(e) => {
            v.problems.push(format!("{e:#}"));
            None
        }
    };
    let manifest = read_manifest(out, &mut v.problems);
    let listing = format::list(out)?;
    for foreign in &listing.foreign {
        v.problems.push(format!(
            "{foreign}: not a shard file (`part-*.parquet`) in a shard folder; readers of the set would \
             read it too: move it out"
        ));
    }
    let mut keys: HashSet<String> = HashSet::new();
    let mut folder_schema: HashMap<String, Vec<String>> = HashMap::new();
    let mut columns: Option<Vec<String>> = None;
    let mut seen = HashSet::new();
    for shard in &listing.shards {
        let rel = shard.clone();
        seen.insert(rel.clone());
        v.shards += 1;
        let rows = match check_shard(
            out,
            &rel,
            identity_hash.as_deref(),
            &mut folder_schema,
            &mut columns,
            &mut keys,
            &mut v.problems,
        ) {
            Ok(rows) => rows,
            Err(e) => {
                v.problems.push(format!("{rel}: {e:#}"));
                continue;
            }
        };
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

/// What a many-worker run without `_SUCCESS` still needs: its partitions that are not done, by
/// number, then `finalize`.
fn unfinalized(root: &Path) -> Result<String> {
    let status = crate::set::status(root, crate::set::MAX_ARRAY_SIZE)?;
    let mut text = format!("{SUCCESS} is missing: this many-worker run is not finalized");
    let not_done: Vec<usize> = status
        .missing
        .iter()
        .chain(&status.running)
        .copied()
        .collect();
    if !status.running.is_empty() {
        text += &format!(
            "; partition(s) {} are being written now",
            crate::set::compact(&status.running)
        );
    }
    if !status.missing.is_empty() {
        text += &format!(
            "; partition(s) {} are not done: run them (`vae-pipeline status {}` prints the sbatch \
             lines)",
            crate::set::compact(&status.missing),
            root.display()
        );
    }
    text += &format!(
        "{} `vae-pipeline finalize {}`",
        if not_done.is_empty() {
            "; every partition is done: run"
        } else {
            ", then run"
        },
        root.display()
    );
    Ok(text)
}

/// Checks one shard; returns its rows. An error means it could not be read at all.
fn check_shard(
    out: &dyn ShardStore,
    rel: &str,
    identity_hash: Option<&str>,
    folder_schema: &mut HashMap<String, Vec<String>>,
    columns: &mut Option<Vec<String>>,
    keys: &mut HashSet<String>,
    problems: &mut Vec<String>,
) -> Result<usize> {
    let builder = format::open(out, rel)?;
    let footer = format::footer_of(&builder, &out.name(rel))?;
    let schema = footer.schema.as_ref().clone();
    if let Some(hash) = identity_hash {
        if footer.metadata.identity_hash != hash {
            problems.push(format!(
                "{rel}: identity_hash {} differs from {CONFIG}'s {hash}",
                footer.metadata.identity_hash
            ));
        }
    }
    let folder = rel.split('/').next().unwrap_or_default().to_string();
    // Columns and types decide whether a reader can concatenate the shards; the metadata is
    // checked through the identity above.
    let signature = format::column_signature(&schema);
    match folder_schema.get(&folder) {
        Some(first) if *first != signature => problems.push(format!(
            "{rel}: schema differs from the folder's other shards"
        )),
        Some(_) => {}
        None => {
            folder_schema.insert(folder, signature);
        }
    }
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    match columns {
        Some(c) if *c != names => {
            problems.push(format!("{rel}: columns {names:?} differ from {c:?}"))
        }
        Some(_) => {}
        None => *columns = Some(names),
    }
    let tensors: Vec<&str> = format::TENSOR_COLUMNS
        .into_iter()
        .filter(|c| schema.field_with_name(c).is_ok())
        .collect();
    match schema.field_with_name("latent") {
        Ok(f) if format::is_tensor_field(f) => {}
        _ => problems.push(format!(
            "{rel}: `latent` is not an arrow.fixed_shape_tensor column"
        )),
    }
    let mut rows = 0;
    let group = format::group_rows(format::row_tensor_bytes(&schema), usize::MAX);
    for batch in builder.with_batch_size(group).build()? {
        let batch = batch?;
        rows += batch.num_rows();
        let Some(key_col) = batch
            .column_by_name(format::KEY)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        else {
            problems.push(format!("{rel}: no utf8 `key` column"));
            break;
        };
        for key in key_col.iter().flatten() {
            if let Some(why) = crate::source::key_problem(key) {
                problems.push(format!(
                    "{rel}: key {key:?} breaks FORMAT.md's key rule: {why}"
                ));
            }
            if !keys.insert(key.to_string()) {
                problems.push(format!(
                    "{rel}: key {key:?} appears more than once in the set"
                ));
            }
        }
        for column in &tensors {
            let list = batch
                .column_by_name(column)
                .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>());
            match list.map(|l| format::non_finite(l.values().as_ref())) {
                Some(Some(0)) => {}
                Some(Some(n)) => problems.push(format!("{rel}: {n} NaN/Inf values in `{column}`")),
                _ => problems.push(format!(
                    "{rel}: `{column}` is not a float16/float32/bf16 tensor column"
                )),
            }
        }
    }
    Ok(rows)
}

fn read_manifest(
    out: &dyn ShardStore,
    problems: &mut Vec<String>,
) -> Option<BTreeMap<String, i64>> {
    let Ok(Some(text)) = out
        .read(MANIFEST)
        .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
    else {
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

/// What a shard set holds, as text: rows and shards per shape folder, the latent's type and
/// shape, the model and normalization, failures by kind, and the recorded identity.
pub fn inspect(root: &Path) -> Result<String> {
    use std::fmt::Write;
    let store = crate::store::open(root)?;
    let out = store.as_ref();
    let shards = format::shard_files(out)?;
    if shards.is_empty() {
        bail!(
            "{} holds no shards (<W>x<H>/part-*.parquet)",
            root.display()
        );
    }
    let mut per_folder: BTreeMap<String, (usize, usize, String)> = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for shard in &shards {
        let footer = format::footer(out, shard)?;
        let latent = footer
            .schema
            .field_with_name("latent")
            .map(|f| {
                let shape = format::tensor_shape(f)
                    .map(|s| format!("{s:?}"))
                    .unwrap_or_default();
                match f.data_type() {
                    DataType::FixedSizeList(item, _) => format!("{} {shape}", item.data_type()),
                    other => format!("{other}"),
                }
            })
            .unwrap_or_else(|_| "no latent column".into());
        let m = &footer.metadata;
        for (k, v) in [
            ("format_version", m.format_version.to_string()),
            ("version", m.tool_version.clone()),
            ("model", m.model.clone()),
            ("encoder_sha256", m.encoder_sha256.clone()),
            ("normalization", m.normalization.clone()),
            ("latent_mode", m.latent_mode.clone()),
            ("dtype", m.dtype.as_str().to_string()),
            ("resize", m.resize.clone()),
            ("identity_hash", m.identity_hash.clone()),
        ] {
            meta.insert(k, v);
        }
        let folder = shard.split('/').next().unwrap_or_default().to_string();
        let entry = per_folder.entry(folder).or_insert((0, 0, latent));
        entry.0 += 1;
        entry.1 += footer.rows;
    }
    let mut text = String::new();
    writeln!(text, "{}", root.display())?;
    for (folder, (n, rows, latent)) in &per_folder {
        writeln!(
            text,
            "  {folder}: {rows} rows in {n} shard(s); latent {latent}"
        )?;
    }
    for (k, v) in &meta {
        writeln!(text, "  {k}: {v}")?;
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(errors) = out
        .read(ERRORS)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    {
        for line in errors.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                *kinds
                    .entry(v["kind"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
            }
        }
    }
    let errors: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    writeln!(
        text,
        "  errors: {}",
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        }
    )?;
    writeln!(
        text,
        "  complete: {}",
        if out.read(SUCCESS)?.is_some() {
            "yes (_SUCCESS)"
        } else {
            "no (_SUCCESS missing)"
        }
    )?;
    if let Some(config) = out
        .read(CONFIG)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    {
        writeln!(text, "  identity ({CONFIG}):")?;
        for line in config.lines().filter(|l| !l.starts_with('#')) {
            writeln!(text, "    {line}")?;
        }
    }
    Ok(text)
}
