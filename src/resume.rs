//! Resume: takes an output folder, hands on what it already holds (`Committed`: every committed
//! row's key, source hash and metadata digest, read from the shards themselves) and, after a
//! complete run, prunes the rows that are no longer current. The shards are the only record: a
//! row is committed exactly when the shard holding it was renamed into place, so there is no
//! second manifest to fall out of step.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use arrow_array::{
    Array, BooleanArray, FixedSizeBinaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow_schema::DataType;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use serde::{Deserialize, Serialize};

use crate::format::{self, Scope, CONFIG, ERRORS, MANIFEST, PARTITIONS, PLAN, RUNS, SUCCESS};
use crate::identity::RunIdentity;
use crate::rows::{metadata_digest, MetadataDigest};
use crate::sidecar::Scalar;
use crate::store::{Commit, ShardStore};

/// One committed row: where it is and what it was made from.
#[derive(Debug, Clone, Copy)]
struct CommittedRow {
    shard: usize,
    row: usize,
    sha256: [u8; 32],
    digest: MetadataDigest,
}

/// Rows an earlier run committed, by key.
#[derive(Default)]
pub struct Committed {
    shards: Vec<String>,
    rows: HashMap<String, Vec<CommittedRow>>,
    /// A partition's rows `finalize` dropped as copies of a row in a lower partition, by key:
    /// the source hash each had.
    dropped: HashMap<String, [u8; 32]>,
}

/// What a source is now, for pruning: its bytes' hash and metadata digest, or unreadable (its
/// committed row is kept as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    Row([u8; 32], MetadataDigest),
    Unreadable,
}

impl Committed {
    /// A current row for `key` exists: same source bytes, same caption and metadata.
    pub fn holds(&self, key: &str, sha256: &[u8; 32], digest: &MetadataDigest) -> bool {
        self.rows.get(key).is_some_and(|rows| {
            rows.iter()
                .any(|r| &r.sha256 == sha256 && &r.digest == digest)
        })
    }

    /// Records a row `finalize` dropped from this partition (`--dedupe` across partitions).
    pub fn add_dropped(&mut self, key: String, sha256: [u8; 32]) {
        self.dropped.insert(key, sha256);
    }

    /// `finalize` dropped this key's row while its source had these bytes: it stays dropped
    /// (its kept copy is another partition's), not encoded again.
    pub fn was_dropped(&self, key: &str, sha256: &[u8; 32]) -> bool {
        self.dropped.get(key) == Some(sha256)
    }

    /// Some committed row has this key: its current state matters for pruning.
    pub fn has_key(&self, key: &str) -> bool {
        self.rows.contains_key(key)
    }

    /// The committed keys inside `key` (a clip's windows, `<key>/<window>`).
    pub fn keys_under(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}/");
        self.rows
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.rows.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Reads key, source hash, caption and metadata columns of every shard of `scope` (never a
    /// tensor).
    pub fn read(out: &dyn ShardStore, scope: Scope) -> Result<Self> {
        let mut committed = Committed::default();
        for shard in format::shard_files(out)?
            .into_iter()
            .filter(|s| scope.owns(s))
        {
            let index = committed.shards.len();
            read_rows(out, &shard, |row, key, sha256, digest| {
                committed.rows.entry(key).or_default().push(CommittedRow {
                    shard: index,
                    row,
                    sha256,
                    digest,
                });
            })?;
            committed.shards.push(shard);
        }
        Ok(committed)
    }
}

/// `_config.toml`: the identity of the runs that wrote the folder.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub format_version: u32,
    pub identity_hash: String,
    pub identity: RunIdentity,
}

impl ConfigFile {
    pub fn read(out: &dyn ShardStore) -> Result<Option<Self>> {
        let Some(bytes) = out.read(CONFIG)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        if text.lines().any(|l| l.starts_with("config_hash = ")) {
            bail!(
                "{} was written by an older vae-pipeline (shard format 1). Pass --overwrite to \
                 rewrite the set in format {}, or use another --out",
                out.describe(),
                format::FORMAT_VERSION
            );
        }
        toml::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a vae-pipeline {CONFIG}", out.name(CONFIG)))
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# Written by vae-pipeline: the identity of the runs in this folder (what decides the\n\
             # latents). A rerun with the same identity resumes; see FORMAT.md.\n{}",
            toml::to_string(self).expect("config file serializes")
        )
    }
}

/// What `--out` holds before a run, read without writing anything.
pub enum OutputState {
    /// Missing or empty: a fresh run.
    Fresh,
    /// Written with this identity: the run resumes.
    Resume,
    /// Written with another identity, and `--overwrite` was given.
    Replace,
}

/// Checks `--out` for this run without touching it:
/// - missing or empty (or holding only a lock or a many-worker plan): fresh;
/// - same identity: resume;
/// - another identity: refused with the settings that differ, or replaced with `overwrite`
///   (never for a partition: a worker does not delete the other partitions);
/// - anything else: refused.
pub fn inspect_output(
    out: &dyn ShardStore,
    identity: &RunIdentity,
    overwrite: bool,
    scope: Scope,
) -> Result<OutputState> {
    let has_entries = out
        .list()
        .with_context(|| format!("cannot read --out {}", out.describe()))?
        .iter()
        .any(|name| !is_lock(name) && name != PLAN);
    if !has_entries {
        return Ok(OutputState::Fresh);
    }
    let recorded = match ConfigFile::read(out) {
        Ok(Some(recorded)) => recorded,
        Ok(None) => bail!(
            "--out {} is not empty and holds no {CONFIG}: it was not written by vae-pipeline. \
             Choose an empty or new folder",
            out.describe()
        ),
        Err(_) if overwrite => return Ok(OutputState::Replace),
        Err(e) => return Err(e),
    };
    if recorded.identity_hash == identity.hash() {
        return Ok(OutputState::Resume);
    }
    if overwrite {
        return Ok(OutputState::Replace);
    }
    let differences = identity.differences(&recorded.identity);
    let remedy = match scope {
        Scope::Whole => "Use another --out, or pass --overwrite to replace them",
        Scope::Partition(_) => {
            "Every worker of a many-worker run uses the settings its shards were made with: \
             rerun with those, or write these settings to a new --out"
        }
    };
    bail!(
        "--out {} holds shards made with different settings:\n  {}\n{remedy}",
        out.describe(),
        if differences.is_empty() {
            format!(
                "identity_hash {} there, {} now",
                recorded.identity_hash,
                identity.hash()
            )
        } else {
            differences.join("\n  ")
        }
    )
}

/// Makes `--out` ready to write, under its lock: a fresh or replaced folder records the identity;
/// a resumed one loses a killed run's temporary files (and, for a whole run, `_SUCCESS`: a
/// partition's worker removes it once the partition changes), and hands on its committed rows.
pub fn open_output(
    out: &dyn ShardStore,
    identity: &RunIdentity,
    state: OutputState,
    scope: Scope,
) -> Result<Committed> {
    let mut committed = Committed::default();
    if let Some(root) = out.local_root() {
        crate::store::LocalStore::new(root).remove_temporaries(scope)?;
    }
    match state {
        OutputState::Resume => {
            if scope == Scope::Whole {
                out.remove(SUCCESS)?;
            }
            committed = Committed::read(out, scope)?;
        }
        OutputState::Replace => remove_outputs(out)?,
        OutputState::Fresh => {}
    }
    let config = ConfigFile {
        format_version: format::FORMAT_VERSION,
        identity_hash: identity.hash(),
        identity: identity.clone(),
    };
    out.write(CONFIG, config.to_toml().as_bytes())
        .with_context(|| format!("--out {} is not writable", out.describe()))?;
    Ok(committed)
}

/// A writer's lock (the set's or a partition's): never removed, never content.
fn is_lock(name: &str) -> bool {
    name == format::LOCK || (name.starts_with(PARTITIONS) && name.ends_with(".lock"))
}

/// Removes what vae-pipeline wrote (shards, side files), never foreign files or the locks.
fn remove_outputs(out: &dyn ShardStore) -> Result<()> {
    for name in out.list()? {
        let ours = match name.split_once('/') {
            Some((dir, _)) => format::parse_shape_dir(dir).is_some(),
            None => [ERRORS, MANIFEST, SUCCESS, CONFIG, RUNS, PLAN].contains(&name.as_str()),
        };
        let ours = ours || (name.starts_with(PARTITIONS) && !is_lock(&name));
        if ours {
            out.remove(&name)?;
        }
    }
    Ok(())
}

/// Calls `each(row index, key, source hash, metadata digest)` for every row of `shard`, reading
/// only the key, hash, caption and metadata columns.
fn read_rows(
    out: &dyn ShardStore,
    shard: &str,
    mut each: impl FnMut(usize, String, [u8; 32], MetadataDigest),
) -> Result<()> {
    let context = || {
        format!(
            "cannot read committed shard {} (remove it, or pass --overwrite)",
            out.name(shard)
        )
    };
    let builder = format::open(out, shard).with_context(context)?;
    let schema = builder.schema().clone();
    let extra = format::extra_columns(&schema);
    let mut wanted = vec![format::KEY, format::SOURCE_SHA256, format::CAPTION];
    wanted.extend(extra.iter().map(|(n, _)| n.as_str()));
    let mask = ProjectionMask::columns(builder.parquet_schema(), wanted);
    let mut row = 0;
    for batch in builder
        .with_projection(mask)
        .build()
        .with_context(context)?
    {
        let batch = batch.with_context(context)?;
        let (keys, shas) = key_columns(&batch).with_context(context)?;
        let captions = batch
            .column_by_name(format::CAPTION)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let extra_arrays: Vec<(&str, &dyn Array)> = extra
            .iter()
            .filter_map(|(n, _)| Some((n.as_str(), batch.column_by_name(n)?.as_ref())))
            .collect();
        for i in 0..batch.num_rows() {
            let caption = captions.filter(|c| c.is_valid(i)).map(|c| c.value(i));
            let values: Vec<(&str, Option<Scalar>)> = extra_arrays
                .iter()
                .map(|(n, a)| (*n, scalar_at(*a, i)))
                .collect();
            let digest = metadata_digest(caption, values.iter().map(|(n, v)| (*n, v.as_ref())));
            each(
                row,
                keys.value(i).to_string(),
                shas.value(i).try_into().expect("32-byte hash"),
                digest,
            );
            row += 1;
        }
    }
    Ok(())
}

/// A metadata column's value as the row maker would have produced it.
fn scalar_at(array: &dyn Array, i: usize) -> Option<Scalar> {
    if array.is_null(i) {
        return None;
    }
    let any = array.as_any();
    match array.data_type() {
        DataType::Boolean => any
            .downcast_ref::<BooleanArray>()
            .map(|a| Scalar::Bool(a.value(i))),
        DataType::Int64 => any
            .downcast_ref::<Int64Array>()
            .map(|a| Scalar::Int(a.value(i))),
        DataType::Float64 => any
            .downcast_ref::<Float64Array>()
            .map(|a| Scalar::Float(a.value(i))),
        _ => any
            .downcast_ref::<StringArray>()
            .map(|a| Scalar::Text(a.value(i).to_string())),
    }
}

fn key_columns(batch: &RecordBatch) -> Result<(&StringArray, &FixedSizeBinaryArray)> {
    let keys = batch
        .column_by_name(format::KEY)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>());
    let shas = batch
        .column_by_name(format::SOURCE_SHA256)
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>());
    match (keys, shas) {
        (Some(k), Some(s)) => Ok((k, s)),
        _ => bail!("missing key or source_sha256 column"),
    }
}

/// After a complete run: keeps, for every key, one committed row that is current (`current`:
/// same source hash and metadata digest; for an unreadable source, its last committed row); drops
/// rows of changed, vanished or now-unusable sources and duplicates a killed run may have left.
/// Each affected shard is rewritten a row group at a time and renamed into place, after
/// `before_change` ran (once, and only when a row is dropped). Returns how many rows were
/// dropped.
pub fn prune(
    out: &dyn ShardStore,
    committed: &Committed,
    current: &HashMap<String, Current>,
    mut before_change: impl FnMut() -> Result<()>,
) -> Result<usize> {
    let mut rows_in = vec![0usize; committed.shards.len()];
    let mut keep: Vec<HashSet<usize>> = vec![HashSet::new(); committed.shards.len()];
    for (key, rows) in &committed.rows {
        for r in rows {
            rows_in[r.shard] += 1;
        }
        let kept = match current.get(key) {
            Some(Current::Row(sha, digest)) => rows
                .iter()
                .find(|r| &r.sha256 == sha && &r.digest == digest),
            Some(Current::Unreadable) => rows.last(),
            None => None,
        };
        if let Some(r) = kept {
            keep[r.shard].insert(r.row);
        }
    }
    let mut dropped = 0;
    for ((shard, keep), rows) in committed.shards.iter().zip(&keep).zip(rows_in) {
        if keep.len() < rows {
            if dropped == 0 {
                before_change()?;
            }
            dropped += rows - keep.len();
            rewrite_keeping(out, shard, keep)?;
        }
    }
    Ok(dropped)
}

/// Rewrites `shard` with only the rows at the indices in `keep` (same schema, metadata and
/// properties). Reads, filters and writes a quarter of a row group at a time, so memory stays
/// well under one row group however large the shard is.
pub fn rewrite_keeping(out: &dyn ShardStore, shard: &str, keep: &HashSet<usize>) -> Result<()> {
    if keep.is_empty() {
        return out.remove(shard);
    }
    let builder = format::open(out, shard)?;
    let footer = format::footer_of(&builder, &out.name(shard))?;
    // A quarter of a row group in flight at each step (read, filtered, buffered for writing).
    let group =
        (format::group_rows(format::row_tensor_bytes(&footer.schema), usize::MAX) / 4).max(1);
    let props = format::writer_properties(&footer.metadata, group)?;
    let file = out.create(shard, Commit::Replace)?;
    let rewrite = || -> Result<Box<dyn crate::store::PendingFile>> {
        let mut writer = ArrowWriter::try_new(file, footer.schema.clone(), Some(props))?;
        let mut row = 0;
        for batch in builder.with_batch_size(group).build()? {
            let batch = batch?;
            let mask: BooleanArray = (row..row + batch.num_rows())
                .map(|i| Some(keep.contains(&i)))
                .collect();
            row += batch.num_rows();
            writer.write(&arrow_select::filter::filter_record_batch(&batch, &mask)?)?;
        }
        Ok(writer.into_inner()?)
    };
    rewrite()
        .and_then(|file| file.commit())
        .with_context(|| format!("cannot rewrite {}", out.name(shard)))
}
