//! Resume: takes an output folder, hands on what it already holds (`Committed`: every committed
//! row's key and source hash, read from the shards themselves) and, after a run, prunes the rows
//! that are no longer current. The shards are the only record: a row is committed exactly when
//! the shard holding it was renamed into place, so there is no second manifest to fall out of step.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{Array, BooleanArray, FixedSizeBinaryArray, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};

use crate::write::{self, CONFIG, ERRORS, MANIFEST, SUCCESS};

/// Rows an earlier run committed, by key.
#[derive(Debug, Default)]
pub struct Committed {
    shards: Vec<PathBuf>,
    rows: HashMap<String, Vec<(usize, [u8; 32])>>,
}

impl Committed {
    /// A current row for `key` exists: the source has not changed since it was encoded.
    pub fn holds(&self, key: &str, sha256: &[u8; 32]) -> bool {
        self.rows
            .get(key)
            .is_some_and(|rows| rows.iter().any(|(_, s)| s == sha256))
    }

    /// Some committed row has this key: its current hash matters for pruning.
    pub fn has_key(&self, key: &str) -> bool {
        self.rows.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.rows.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn read(out: &Path) -> Result<Self> {
        let mut committed = Committed::default();
        for shard in write::shard_files(out)? {
            let index = committed.shards.len();
            for (key, sha) in read_keys(&shard)? {
                committed.rows.entry(key).or_default().push((index, sha));
            }
            committed.shards.push(shard);
        }
        Ok(committed)
    }
}

/// Checks `out` before any work and makes it ready to (re)write:
/// - empty or new: records the config;
/// - same config: removes temporary files of a killed run and `_SUCCESS`, and hands on the
///   committed rows so the run skips them;
/// - another config: refused, or emptied of our files with `overwrite`;
/// - anything else: refused.
pub fn prepare_output(
    out: &Path,
    config_hash: &str,
    config_toml: &str,
    overwrite: bool,
) -> Result<Committed> {
    let mut committed = Committed::default();
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a folder", out.display());
        }
        let has_entries = std::fs::read_dir(out)
            .with_context(|| format!("cannot read --out {}", out.display()))?
            .next()
            .is_some();
        if has_entries {
            let recorded = std::fs::read_to_string(out.join(CONFIG)).map_err(|_| {
                anyhow::anyhow!(
                    "--out {} is not empty and holds no {CONFIG}: it was not written by vae-pipeline. \
                     Choose an empty or new folder",
                    out.display()
                )
            })?;
            let theirs = recorded_hash(&recorded);
            if theirs == Some(config_hash) {
                remove_temporaries(out)?;
                remove_file_if_present(&out.join(SUCCESS))?;
                committed = Committed::read(out)?;
            } else if overwrite {
                remove_outputs(out)?;
            } else {
                bail!(
                    "--out {} holds shards made with a different config (config_hash {} there, {config_hash} now; \
                     see {}). Use another --out, or pass --overwrite to replace them",
                    out.display(),
                    theirs.unwrap_or("missing"),
                    out.join(CONFIG).display()
                );
            }
        }
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create --out {}", out.display()))?;
    write::write_atomic(
        &out.join(CONFIG),
        format!("config_hash = \"{config_hash}\"\n{config_toml}").as_bytes(),
    )
    .with_context(|| format!("--out {} is not writable", out.display()))?;
    Ok(committed)
}

fn recorded_hash(config: &str) -> Option<&str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("config_hash = \"")?.strip_suffix('"'))
}

fn remove_file_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Temporary files (`.NAME.tmp`) a killed run left, in the output folder and its shard folders.
fn remove_temporaries(out: &Path) -> Result<()> {
    let mut dirs = vec![out.to_path_buf()];
    dirs.extend(write::shape_dirs(out)?);
    for dir in dirs {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                remove_file_if_present(&entry.path())?;
            }
        }
    }
    Ok(())
}

/// Removes what vae-pipeline wrote (shard folders, side files), never foreign files.
fn remove_outputs(out: &Path) -> Result<()> {
    for dir in write::shape_dirs(out)? {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    for name in [ERRORS, MANIFEST, SUCCESS, CONFIG] {
        remove_file_if_present(&out.join(name))?;
    }
    remove_temporaries(out)
}

/// Reads only the `key` and `source_sha256` columns of a shard.
fn read_keys(shard: &Path) -> Result<Vec<(String, [u8; 32])>> {
    let context = || {
        format!(
            "cannot read committed shard {} (remove it, or pass --overwrite)",
            shard.display()
        )
    };
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(File::open(shard).with_context(context)?)
            .with_context(context)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["key", "source_sha256"]);
    let mut rows = Vec::new();
    for batch in builder
        .with_projection(mask)
        .build()
        .with_context(context)?
    {
        let batch = batch.with_context(context)?;
        let (keys, shas) = key_columns(&batch).with_context(context)?;
        for i in 0..batch.num_rows() {
            rows.push((
                keys.value(i).to_string(),
                shas.value(i).try_into().expect("32-byte hash"),
            ));
        }
    }
    Ok(rows)
}

fn key_columns(batch: &RecordBatch) -> Result<(&StringArray, &FixedSizeBinaryArray)> {
    let keys = batch
        .column_by_name("key")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>());
    let shas = batch
        .column_by_name("source_sha256")
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>());
    match (keys, shas) {
        (Some(k), Some(s)) => Ok((k, s)),
        _ => bail!("missing key or source_sha256 column"),
    }
}

/// After a run: keeps, for every key, the one committed row whose hash is the source's current
/// hash (`current`); drops rows of changed, vanished or now-unreadable sources and duplicates a
/// killed run may have left. Each affected shard is rewritten whole and renamed into place.
/// Returns how many rows were dropped.
pub fn prune(committed: &Committed, current: &HashMap<String, [u8; 32]>) -> Result<usize> {
    let mut rows_in = vec![0usize; committed.shards.len()];
    let mut keep: Vec<HashSet<(String, [u8; 32])>> = vec![HashSet::new(); committed.shards.len()];
    for (key, rows) in &committed.rows {
        let mut kept = false;
        for (shard, sha) in rows {
            rows_in[*shard] += 1;
            if !kept && current.get(key) == Some(sha) {
                kept = true;
                keep[*shard].insert((key.clone(), *sha));
            }
        }
    }
    let mut dropped = 0;
    for ((shard, keep), rows) in committed.shards.iter().zip(&keep).zip(rows_in) {
        if keep.len() < rows {
            dropped += rows - keep.len();
            rewrite_keeping(shard, keep)?;
        }
    }
    Ok(dropped)
}

/// Rewrites `shard` with only the rows in `keep` (same schema, metadata and properties).
fn rewrite_keeping(shard: &Path, keep: &HashSet<(String, [u8; 32])>) -> Result<()> {
    if keep.is_empty() {
        std::fs::remove_file(shard)
            .with_context(|| format!("cannot remove {}", shard.display()))?;
        return Ok(());
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(shard)?)?;
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let schema = builder.schema().clone();
    let group_rows = builder
        .metadata()
        .row_groups()
        .first()
        .map(|g| g.num_rows() as usize)
        .filter(|&n| n > 0);
    let tmp = write::tmp_name(shard);
    let props = write::shard_properties(metadata, group_rows)?;
    let mut writer = ArrowWriter::try_new(File::create(&tmp)?, schema, Some(props))?;
    for batch in builder.build()? {
        let batch = batch?;
        let (keys, shas) = key_columns(&batch)?;
        let mask: BooleanArray = (0..batch.num_rows())
            .map(|i| {
                Some(keep.contains(&(
                    keys.value(i).to_string(),
                    shas.value(i).try_into().expect("32 bytes"),
                )))
            })
            .collect();
        writer.write(&arrow_select::filter::filter_record_batch(&batch, &mask)?)?;
    }
    let file = writer.into_inner()?;
    file.sync_all()?;
    write::commit(&tmp, shard)
}
