//! The set layer: runs `precompute` over a whole shard set or, with `--partitions N`, this
//! worker's partitions of one written by many workers (Slurm job arrays, Kubernetes Indexed Jobs,
//! Ray, torchrun). It checks the plan and runs the pipeline once per scope; the pipeline runs
//! one scope and knows nothing of partitions. Here:
//! - which partitions this worker runs (`--partition`, or the scheduler's environment);
//! - `plan` (the fixed plan, `_plan.json`, whose format lives in `partition_files` with the
//!   done markers);
//! - `status` (done, running, missing, what to resubmit) and `finalize` (cross-partition
//!   `--dedupe`, `_errors.jsonl`, `_manifest.jsonl`, then `_SUCCESS`).
//!
//! Partition p holds units `[p·U/N, (p+1)·U/N)` of the unit list, which is in the source's
//! sorted order: contiguous, deterministic, and free of absolute paths.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use arrow_array::{Array, FixedSizeBinaryArray, StringArray};
use parquet::arrow::ProjectionMask;
use serde::Serialize;

use crate::config::PrecomputeConfig;
use crate::failure::{Failure, FailureKind};
use crate::format::{self, done_marker, Scope, ERRORS, LOCK, PARTITIONS, PLAN};
use crate::partition_files::{DoneMarker, DroppedRow, PartitionPlan};
use crate::store::ShardStore;
use crate::summary::RunSummary;
use crate::write::ManifestEntry;

/// Runs `precompute`: the plan checks everything before the first image and writes nothing;
/// then the output folder is locked, opened and written. With `--partitions`, this process is a
/// worker of a many-worker run (`work`).
pub fn precompute(config: &PrecomputeConfig) -> Result<RunSummary> {
    if config.partitions > 0 {
        return work(config);
    }
    let plan = crate::plan::plan(config, Scope::Whole)?;
    let stop = crate::pipeline::stop_flag()?;
    crate::pipeline::precompute_scope(plan, Scope::Whole, &stop)
}

/// Slurm's default `MaxArraySize`: array indices run below it.
pub const MAX_ARRAY_SIZE: usize = 1001;

/// `vae-pipeline plan`: the pre-flight of partition 0's worker, which creates the run's plan (or
/// checks an existing one against these flags); nothing is encoded.
pub fn make_plan(config: &PrecomputeConfig) -> Result<PartitionPlan> {
    if config.partitions == 0 {
        bail!("plan needs --partitions N: the number of partitions to split the run into");
    }
    if config.overwrite || config.limit > 0 {
        bail!("plan takes neither --overwrite nor --limit (a many-worker run refuses both)");
    }
    let plan = crate::plan::plan(config, Scope::Partition(0))?;
    PartitionPlan::read(plan.out.as_ref())?.context("the plan was not written")
}

/// Partition indices: `3`, `3,7,12`, `0-3`, or a mix.
pub fn parse_indices(spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let number = |t: &str| {
            t.trim()
                .parse::<usize>()
                .with_context(|| format!("--partition {spec}: {t:?} is not a partition number"))
        };
        match part.split_once('-') {
            Some((a, b)) => out.extend(number(a)?..=number(b)?),
            None => out.push(number(part)?),
        }
    }
    if out.is_empty() {
        bail!("--partition {spec:?} names no partition");
    }
    Ok(out)
}

/// Indices as `sbatch --array` writes them: `0-3,5,7-9`.
pub fn compact(indices: &[usize]) -> String {
    let mut text = String::new();
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        if !text.is_empty() {
            text.push(',');
        }
        match j - i {
            0 => write!(text, "{}", indices[i]),
            1 => write!(text, "{},{}", indices[i], indices[j]),
            _ => write!(text, "{}-{}", indices[i], indices[j]),
        }
        .expect("writing to a String");
        i = j + 1;
    }
    text
}

/// The partitions this worker runs: `--partition`, else the scheduler's environment, in this
/// order: a Slurm array task (`SLURM_ARRAY_TASK_ID`, plus `--partition-offset`), a Kubernetes
/// Indexed Job's pod (`JOB_COMPLETION_INDEX`, plus the offset), one of several `srun` tasks
/// (`SLURM_PROCID` of `SLURM_NTASKS`) or torchrun ranks (`RANK` of `WORLD_SIZE`), which take
/// every partition p with p mod tasks = their rank. `SLURM_ARRAY_TASK_COUNT` is never used: a
/// retry array `--array=3,7` has two tasks, not two partitions.
pub fn assigned(
    config: &PrecomputeConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<usize>> {
    let n = config.partitions;
    let number = |name: &str| -> Result<Option<usize>> {
        env(name)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("${name} = {v:?} is not a number"))
            })
            .transpose()
    };
    let offset = config.partition_offset;
    let mine = if let Some(spec) = &config.partition {
        parse_indices(spec)?
    } else if let Some(i) = number("SLURM_ARRAY_TASK_ID")? {
        vec![i + offset]
    } else if let Some(i) = number("JOB_COMPLETION_INDEX")? {
        vec![i + offset]
    } else if let (Some(rank), Some(tasks)) = match number("SLURM_PROCID")? {
        Some(rank) => (Some(rank), number("SLURM_NTASKS")?),
        None => (number("RANK")?, number("WORLD_SIZE")?),
    } {
        (0..n).filter(|p| p % tasks.max(1) == rank).collect()
    } else {
        bail!(
            "--partitions {n} needs to know which partition to run: pass --partition I, or start \
             the worker as a Slurm array task (SLURM_ARRAY_TASK_ID), a Kubernetes Indexed Job \
             (JOB_COMPLETION_INDEX), srun tasks (SLURM_PROCID) or torchrun (RANK)"
        );
    };
    if let Some(&bad) = mine.iter().find(|&&p| p >= n) {
        bail!(
            "partition {bad} does not exist: --partitions {n} numbers them 0 to {} (an array \
             longer than MaxArraySize is split with --partition-offset)",
            n - 1
        );
    }
    Ok(mine)
}

/// Runs this worker's partitions, one after another. Each is checked against the plan first and
/// resumes per row, a done one too: changed inputs are encoded again (and the set is no longer
/// final until `finalize` runs again); a done one whose inputs are unchanged is left as it is.
/// A partition that fails (or whose lock another worker holds) does not stop the others, but
/// the worker then exits non-zero naming it.
pub fn work(config: &PrecomputeConfig) -> Result<RunSummary> {
    if config.overwrite {
        bail!(
            "--overwrite cannot be used with --partitions: a worker never deletes other \
             partitions; write the run to a new --out"
        );
    }
    if config.limit > 0 {
        bail!(
            "--limit cannot be used with --partitions: a partition's inputs are fixed by the plan"
        );
    }
    let mine = assigned(config, &|name| std::env::var(name).ok())?;
    let stop = crate::pipeline::stop_flag()?;
    let mut total = RunSummary::default();
    let mut failed = Vec::new();
    let mut last_error = None;
    for &p in &mine {
        if stop.load(Ordering::Relaxed) {
            failed.push(p);
            continue;
        }
        let run = crate::plan::plan(config, Scope::Partition(p))
            .and_then(|plan| crate::pipeline::precompute_scope(plan, Scope::Partition(p), &stop));
        match run {
            Ok(summary) => {
                eprintln!("partition {p} done: {} rows", summary.rows);
                total.add(&summary);
            }
            Err(e) => {
                if mine.len() > 1 {
                    eprintln!("error: partition {p}: {e:#}");
                }
                failed.push(p);
                last_error = Some(e);
            }
        }
    }
    match (failed.len(), last_error) {
        (0, _) => Ok(total),
        (1, Some(e)) if mine.len() == 1 => Err(e.context(format!("partition {}", failed[0]))),
        _ => bail!(
            "partition(s) {} did not finish; rerun the worker to resume them",
            compact(&failed)
        ),
    }
}

/// Where a run stands.
#[derive(Debug, Serialize)]
pub struct Status {
    pub partitions: usize,
    pub units: usize,
    pub done: Vec<usize>,
    pub running: Vec<usize>,
    pub missing: Vec<usize>,
    pub rows: i64,
    /// Commands that run the missing partitions with `pipelines/slurm/precompute.sbatch`.
    pub resubmit: Vec<String>,
    /// `_SUCCESS` is written: `finalize` ran.
    pub finalized: bool,
}

/// Reads the plan, the done markers and the partitions' locks.
pub fn status(root: &Path, max_array_size: usize) -> Result<Status> {
    let out = crate::store::open(root)?;
    let out = out.as_ref();
    let plan = PartitionPlan::read(out)?.with_context(|| {
        format!(
            "{} holds no many-worker plan ({PLAN}): create it with `vae-pipeline plan … \
             --partitions N`, or start the workers with --partitions N",
            root.display()
        )
    })?;
    let markers = done_markers(out, &out.list()?)?;
    let running: HashSet<usize> = (0..plan.partitions)
        .filter(|p| !markers.contains_key(p))
        .filter(|&p| out.is_locked(&Scope::Partition(p).lock()).unwrap_or(false))
        .collect();
    let mut status = Status {
        partitions: plan.partitions,
        units: plan.units,
        done: markers.keys().copied().collect(),
        running: running.iter().copied().collect(),
        missing: (0..plan.partitions)
            .filter(|p| !markers.contains_key(p) && !running.contains(p))
            .collect(),
        rows: markers.values().map(|m| m.rows).sum(),
        resubmit: Vec::new(),
        finalized: out.read(format::SUCCESS)?.is_some(),
    };
    status.running.sort();
    status.resubmit = resubmit_lines(&status.missing, max_array_size);
    Ok(status)
}

/// `sbatch` lines for `missing`, one per window of `max_array_size` indices (OFFSET shifts a
/// window's array indices to its partitions; every line sets it).
pub fn resubmit_lines(missing: &[usize], max_array_size: usize) -> Vec<String> {
    let window = max_array_size.max(1);
    let mut by_window: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &p in missing {
        by_window.entry(p / window).or_default().push(p % window);
    }
    by_window
        .into_iter()
        .map(|(w, indices)| {
            // OFFSET=0 too: sbatch hands on the caller's environment, where an OFFSET exported
            // for another window would shift these indices.
            format!(
                "OFFSET={} sbatch --array={} pipelines/slurm/precompute.sbatch",
                w * window,
                compact(&indices)
            )
        })
        .collect()
}

impl Status {
    pub fn text(&self, root: &Path) -> String {
        let mut text = format!(
            "{}: {} partitions over {} units: {} done ({} rows), {} running, {} missing{}\n",
            root.display(),
            self.partitions,
            self.units,
            self.done.len(),
            self.rows,
            self.running.len(),
            self.missing.len(),
            if self.finalized { "; finalized" } else { "" }
        );
        if !self.running.is_empty() {
            let _ = writeln!(text, "running: {}", compact(&self.running));
        }
        if !self.missing.is_empty() {
            let _ = writeln!(text, "missing: {}", compact(&self.missing));
            for line in &self.resubmit {
                let _ = writeln!(text, "resubmit: {line}");
            }
        } else if self.running.is_empty() && !self.finalized {
            let _ = writeln!(
                text,
                "every partition is done: run `vae-pipeline finalize {}`",
                root.display()
            );
        }
        text
    }
}

/// The done markers among `names` (a listing of the set), by partition.
fn done_markers(out: &dyn ShardStore, names: &[String]) -> Result<BTreeMap<usize, DoneMarker>> {
    let mut markers = BTreeMap::new();
    for name in names {
        let Some(file) = name.strip_prefix(&format!("{PARTITIONS}/")) else {
            continue;
        };
        let Some(number) = file.strip_prefix('p').and_then(|f| f.strip_suffix(".json")) else {
            continue;
        };
        if let Ok(p) = number.parse::<usize>() {
            let bytes = out.read(name)?.unwrap_or_default();
            let marker: DoneMarker = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a done marker", out.name(name)))?;
            markers.insert(p, marker);
        }
    }
    Ok(markers)
}

/// What `finalize` did.
#[derive(Debug, Serialize)]
pub struct Finalized {
    pub partitions: usize,
    pub rows: i64,
    pub shards: usize,
    pub failures: BTreeMap<String, usize>,
    /// Inputs left out as copies of another (`--dedupe`), within a partition or across
    /// partitions: `failures.duplicate`.
    pub duplicates: usize,
    /// Of those, the rows `finalize` dropped as copies of a row in a lower partition.
    pub cross_partition_duplicates: usize,
    pub identity_hash: String,
}

/// Completes a run whose partitions are all done: cross-partition duplicates under `--dedupe`
/// are dropped (the copy in the lowest partition is kept, as one process keeps the first in
/// listing order), the partitions' errors become `_errors.jsonl`, then `_manifest.jsonl` and
/// `_SUCCESS` are written. Refuses while a partition is missing or being written, and when the
/// run has no rows.
///
/// Every side file is a function of what finalize never changes: the partitions' error files and
/// the rows of their shards together with the rows earlier finalizes dropped, which each
/// partition's done marker lists (`dropped`, written before the shards are rewritten). So
/// running it again, or after it was killed at any point, writes the same bytes.
pub fn finalize(root: &Path) -> Result<Finalized> {
    let store = crate::store::open(root)?;
    let out = store.as_ref();
    let _lock = out.lock(LOCK)?;
    let plan = PartitionPlan::read(out)?.with_context(|| {
        format!(
            "{} holds no many-worker plan ({PLAN}): nothing to finalize",
            root.display()
        )
    })?;
    let names = out.list()?;
    let mut markers = done_markers(out, &names)?;
    let missing: Vec<usize> = (0..plan.partitions)
        .filter(|p| !markers.contains_key(p))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} of {} partitions are not done ({}): run them (`vae-pipeline status {}` prints what \
             to resubmit), then finalize again",
            missing.len(),
            plan.partitions,
            compact(&missing),
            root.display()
        );
    }
    // Only a lock in the listing can be held (a lease is deleted on release): one request per
    // listed lock, not per partition.
    let locks: HashSet<&String> = names.iter().filter(|n| n.ends_with(".lock")).collect();
    let running: Vec<usize> = (0..plan.partitions)
        .map(|p| (p, Scope::Partition(p).lock()))
        .filter(|(_, lock)| locks.contains(lock) && out.is_locked(lock).unwrap_or(false))
        .map(|(p, _)| p)
        .collect();
    if !running.is_empty() {
        bail!(
            "partition(s) {} are being written by a worker now (a rerun of a done partition): \
             wait for it to end, then finalize",
            compact(&running)
        );
    }
    if let Some(root) = out.local_root() {
        // Every partition is done: what temporaries remain are killed writers' side files.
        crate::store::LocalStore::new(root).remove_temporaries(Scope::Whole)?;
    }
    let config = crate::resume::ConfigFile::read(out)?
        .with_context(|| format!("{} has no {}", root.display(), format::CONFIG))?;
    check_shards(out, &markers)?;
    let mut errors = Vec::new();
    for p in 0..plan.partitions {
        errors.extend(out.read(&Scope::Partition(p).errors())?.unwrap_or_default());
    }
    let cross = if config.identity.dedupe {
        drop_duplicates(out, &mut markers, config.identity.video.is_some())?
    } else {
        0
    };
    for marker in markers.values() {
        for row in &marker.dropped {
            let line = Failure::new(
                row.key.clone(),
                FailureKind::Duplicate,
                format!("same bytes as {}, encoded once (--dedupe)", row.kept),
            );
            serde_json::to_writer(&mut errors, &line)?;
            errors.push(b'\n');
        }
    }
    out.write(ERRORS, &errors)?;
    let manifest = manifest_of(out, &markers)?;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for marker in markers.values() {
        for (kind, n) in &marker.failures {
            *failures.entry(kind.clone()).or_default() += n;
        }
    }
    if cross > 0 {
        *failures
            .entry(FailureKind::Duplicate.as_str().to_string())
            .or_default() += cross;
    }
    let done = Finalized {
        partitions: plan.partitions,
        rows: manifest.iter().map(|e| e.rows).sum(),
        shards: manifest.len(),
        duplicates: failures
            .get(FailureKind::Duplicate.as_str())
            .copied()
            .unwrap_or(0),
        cross_partition_duplicates: cross,
        failures,
        identity_hash: plan.identity_hash.clone(),
    };
    if done.rows == 0 {
        bail!(
            "no rows: none of the {} units' inputs could be encoded, so no {} is written (see {})",
            plan.units,
            format::SUCCESS,
            out.name(ERRORS)
        );
    }
    crate::write::seal(out, &manifest, &serde_json::to_value(&done)?)?;
    Ok(done)
}

/// Before anything is changed: every shard a done marker names exists, and every partition's
/// shard is named by its marker, or by its `dropped` rows (a finalize killed before it removed
/// a shard it emptied).
fn check_shards(out: &dyn ShardStore, markers: &BTreeMap<usize, DoneMarker>) -> Result<()> {
    let present: HashSet<String> = format::shard_files(out)?.into_iter().collect();
    let named: HashSet<&str> = markers
        .values()
        .flat_map(|m| {
            m.shards
                .iter()
                .map(|e| e.path.as_str())
                .chain(m.dropped.iter().map(|d| d.shard.as_str()))
        })
        .collect();
    for marker in markers.values() {
        if let Some(gone) = marker.shards.iter().find(|e| !present.contains(&e.path)) {
            bail!(
                "{} is listed in partition {}'s done marker but missing: rerun that partition \
                 (delete its marker {} first)",
                out.name(&gone.path),
                marker.partition,
                out.name(&done_marker(marker.partition))
            );
        }
    }
    let mut extra: Vec<&String> = present
        .iter()
        .filter(|s| !named.contains(s.as_str()))
        .collect();
    extra.sort();
    if let Some(extra) = extra.first() {
        bail!(
            "{} belongs to no done marker: a worker wrote it after its partition was marked done; \
             move it out of the set",
            out.name(extra)
        );
    }
    Ok(())
}

/// The manifest: the shards the done markers list, with their rows.
fn manifest_of(
    out: &dyn ShardStore,
    markers: &BTreeMap<usize, DoneMarker>,
) -> Result<Vec<ManifestEntry>> {
    let mut manifest: Vec<ManifestEntry> = markers
        .values()
        .flat_map(|m| m.shards.iter().cloned())
        .collect();
    manifest.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(twice) = manifest.windows(2).find(|w| w[0].path == w[1].path) {
        bail!(
            "{} is listed by two done markers: rerun its partition",
            out.name(&twice[0].path)
        );
    }
    Ok(manifest)
}

/// One row of a partition's shards, present or dropped by an earlier finalize.
struct SeenRow {
    partition: usize,
    shard: String,
    /// Its index in the shard, or None when an earlier finalize dropped it.
    row: Option<usize>,
    key: String,
}

/// Keeps, for each source hash, the row of the lowest partition (each partition already holds
/// one per hash); the others are dropped. Rows earlier finalizes dropped count as they were, so
/// the outcome is the same however often this runs. Each partition that loses rows has its done
/// marker rewritten first (its `dropped` rows and its shards' new row counts), then its shards.
/// Returns how many rows are dropped in all. In a clip set a row's hash is its clip's and its
/// window's (`format::content_id`).
fn drop_duplicates(
    out: &dyn ShardStore,
    markers: &mut BTreeMap<usize, DoneMarker>,
    clips: bool,
) -> Result<usize> {
    let mut by_hash: BTreeMap<[u8; 32], Vec<SeenRow>> = BTreeMap::new();
    let mut rows_in: BTreeMap<String, usize> = BTreeMap::new();
    for shard in format::shard_files(out)? {
        let Some(partition) = partition_of(&shard) else {
            continue;
        };
        let builder = format::open(out, &shard)?;
        let mask = ProjectionMask::columns(
            builder.parquet_schema(),
            [format::KEY, format::SOURCE_SHA256],
        );
        let mut row = 0;
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let keys = batch
                .column_by_name(format::KEY)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .context("no key column")?;
            let hashes = batch
                .column_by_name(format::SOURCE_SHA256)
                .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
                .context("no source_sha256 column")?;
            for i in 0..batch.num_rows() {
                let hash: [u8; 32] = hashes.value(i).try_into().expect("32-byte hash");
                let hash = format::content_id(&hash, keys.value(i), clips);
                by_hash.entry(hash).or_default().push(SeenRow {
                    partition,
                    shard: shard.clone(),
                    row: Some(row),
                    key: keys.value(i).to_string(),
                });
                row += 1;
            }
        }
        rows_in.insert(shard, row);
    }
    for marker in markers.values() {
        for d in &marker.dropped {
            let hash = d
                .sha256()
                .with_context(|| out.name(&done_marker(marker.partition)))?;
            let hash = format::content_id(&hash, &d.key, clips);
            let rows = by_hash.entry(hash).or_default();
            if !rows.iter().any(|r| r.shard == d.shard && r.key == d.key) {
                rows.push(SeenRow {
                    partition: marker.partition,
                    shard: d.shard.clone(),
                    row: None,
                    key: d.key.clone(),
                });
            }
        }
    }
    let mut dropped: BTreeMap<usize, Vec<DroppedRow>> = BTreeMap::new();
    let mut keep: BTreeMap<&str, HashSet<usize>> = BTreeMap::new();
    for (hash, rows) in &by_hash {
        let kept = rows
            .iter()
            .min_by(|a, b| (a.partition, &a.key).cmp(&(b.partition, &b.key)))
            .expect("a hash has a row");
        if kept.row.is_none() {
            // Its worker would keep it dropped while its source is unchanged: the partition is
            // no longer done, so that its rerun encodes it.
            out.remove(&done_marker(kept.partition))?;
            bail!(
                "{} (partition {}) was dropped by an earlier finalize as a copy of another row, \
                 which has changed or gone since: partition {} is no longer done; rerun it \
                 (`--partition {}`) so the row is encoded, then finalize",
                kept.key,
                kept.partition,
                kept.partition,
                kept.partition
            );
        }
        for r in rows {
            if std::ptr::eq(r, kept) {
                keep.entry(&r.shard)
                    .or_default()
                    .insert(r.row.expect("kept"));
                continue;
            }
            dropped.entry(r.partition).or_default().push(DroppedRow {
                shard: r.shard.clone(),
                key: r.key.clone(),
                source_sha256: crate::hex::hex(hash),
                kept: kept.key.clone(),
            });
        }
    }
    let mut count = 0;
    for (p, marker) in markers.iter_mut() {
        let mut rows = dropped.remove(p).unwrap_or_default();
        rows.sort_by(|a, b| (&a.shard, &a.key).cmp(&(&b.shard, &b.key)));
        count += rows.len();
        if rows.is_empty() && marker.dropped.is_empty() {
            continue;
        }
        let shards: Vec<ManifestEntry> = rows_in
            .iter()
            .filter(|(shard, _)| partition_of(shard) == Some(*p))
            .filter_map(|(shard, _)| {
                let kept = keep.get(shard.as_str()).map_or(0, HashSet::len);
                (kept > 0).then(|| ManifestEntry {
                    path: shard.clone(),
                    rows: kept as i64,
                })
            })
            .collect();
        let same_shards = shards.len() == marker.shards.len()
            && shards
                .iter()
                .zip(&marker.shards)
                .all(|(a, b)| a.path == b.path && a.rows == b.rows);
        if rows != marker.dropped || !same_shards {
            marker.rows = shards.iter().map(|e| e.rows).sum();
            marker.shards = shards;
            marker.dropped = rows;
            out.write(&done_marker(*p), &serde_json::to_vec_pretty(&*marker)?)?;
        }
    }
    for (shard, rows) in &rows_in {
        let kept = keep.remove(shard.as_str()).unwrap_or_default();
        if kept.len() < *rows {
            crate::resume::rewrite_keeping(out, shard, &kept)?;
        }
    }
    Ok(count)
}

/// The partition that wrote `shard` (`part-pPPPPP-….parquet`).
fn partition_of(shard: &str) -> Option<usize> {
    let name = shard.rsplit('/').next().unwrap_or(shard);
    name.strip_prefix("part-p")
        .and_then(|n| n.get(..5))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_parse_and_compact_like_sbatch() {
        assert_eq!(parse_indices("3").unwrap(), vec![3]);
        assert_eq!(parse_indices("0-3,7, 9").unwrap(), vec![0, 1, 2, 3, 7, 9]);
        assert!(parse_indices("x").is_err() && parse_indices("").is_err());
        assert_eq!(compact(&[0, 1, 2, 3, 5, 7, 8, 10]), "0-3,5,7,8,10");
        assert_eq!(compact(&[]), "");
    }

    #[test]
    fn resubmit_lines_are_windowed_by_max_array_size() {
        assert_eq!(
            resubmit_lines(&[3, 7, 1000, 1001, 1002, 2500], 1001),
            [
                "OFFSET=0 sbatch --array=3,7,1000 pipelines/slurm/precompute.sbatch",
                "OFFSET=1001 sbatch --array=0,1 pipelines/slurm/precompute.sbatch",
                "OFFSET=2002 sbatch --array=498 pipelines/slurm/precompute.sbatch",
            ]
        );
        assert!(resubmit_lines(&[], 1001).is_empty());
    }

    #[test]
    fn workers_know_their_partitions_from_the_scheduler() {
        let config = |partition: Option<&str>, offset| PrecomputeConfig {
            partitions: 8,
            partition: partition.map(str::to_string),
            partition_offset: offset,
            ..PrecomputeConfig::default()
        };
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm_array = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ]);
        assert_eq!(assigned(&config(None, 0), &slurm_array).unwrap(), vec![3]);
        assert_eq!(assigned(&config(None, 4), &slurm_array).unwrap(), vec![7]);
        assert_eq!(
            assigned(&config(Some("1,2"), 0), &slurm_array).unwrap(),
            vec![1, 2]
        );
        let pod = env(&[("JOB_COMPLETION_INDEX", "5")]);
        assert_eq!(assigned(&config(None, 0), &pod).unwrap(), vec![5]);
        let srun = env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "3")]);
        assert_eq!(assigned(&config(None, 0), &srun).unwrap(), vec![1, 4, 7]);
        let torchrun = env(&[("RANK", "0"), ("WORLD_SIZE", "4")]);
        assert_eq!(assigned(&config(None, 0), &torchrun).unwrap(), vec![0, 4]);
        let nothing = env(&[]);
        assert!(assigned(&config(None, 0), &nothing).is_err());
        let beyond = env(&[("SLURM_ARRAY_TASK_ID", "8")]);
        let err = assigned(&config(None, 0), &beyond).unwrap_err().to_string();
        assert!(err.contains("partition 8 does not exist"), "{err}");
    }
}
