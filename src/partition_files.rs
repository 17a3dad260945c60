//! A many-worker run's files below the set layer: the fixed plan (`_plan.json`: partition
//! count, unit count and hash, the run identity and the run-wide metadata schema), which `plan`
//! creates or checks, and each partition's done marker, which the pipeline reads when it
//! resumes a partition and writes last when the partition is committed. Running partitions,
//! `status` and `finalize` are the set layer's (`set`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use arrow_array::{Array, StringArray};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::{self, done_marker, Scope, PLAN};
use crate::identity::RunIdentity;
use crate::sidecar::SidecarSchema;
use crate::source::Source;
use crate::store::{Commit, ShardStore};
use crate::summary::RunSummary;
use crate::write::ManifestEntry;

/// `_plan.json`: what every worker of the run must agree on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionPlan {
    pub format_version: u32,
    pub partitions: usize,
    pub units: usize,
    /// sha256 of the unit names, one per line, in order.
    pub units_sha256: String,
    pub identity_hash: String,
    /// The identity in full, so that a worker with other settings is told which differ
    /// (absent in plans of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<RunIdentity>,
    /// The metadata columns, inferred over every unit, so every partition's shards have them.
    pub sidecars: SidecarSchema,
    /// Who created the plan and when (not compared).
    pub created: String,
}

/// Partition `p` of `partitions` over `units` units.
pub fn bounds(units: usize, partitions: usize, p: usize) -> Range<usize> {
    let at = |i: usize| (i as u128 * units as u128 / partitions.max(1) as u128) as usize;
    at(p)..at(p + 1)
}

fn units_sha256(units: &[String]) -> String {
    let mut h = Sha256::new();
    for unit in units {
        h.update(unit.as_bytes());
        h.update(b"\n");
    }
    crate::hex::hex(&h.finalize())
}

impl PartitionPlan {
    pub fn range(&self, p: usize) -> Range<usize> {
        bounds(self.units, self.partitions, p)
    }

    pub fn read(out: &dyn ShardStore) -> Result<Option<Self>> {
        let Some(bytes) = out.read(PLAN)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a vae-pipeline plan", out.name(PLAN)))
    }

    /// Refuses a worker whose view of the run differs from the plan, saying what differs.
    pub fn check(
        &self,
        out: &dyn ShardStore,
        partitions: usize,
        units: &[String],
        identity: &RunIdentity,
    ) -> Result<()> {
        if self.partitions != partitions {
            bail!(
                "--partitions {partitions}, but the plan in this --out has {}: every worker of a run \
                 passes the same count (a new count needs a new --out)",
                self.partitions
            );
        }
        if self.identity_hash != identity.hash() {
            // Plans of earlier versions hold only the hash: the first worker's `_config.toml`
            // holds the identity in full.
            let theirs = match &self.identity {
                Some(theirs) => Some(theirs.clone()),
                None => crate::resume::ConfigFile::read(out)
                    .ok()
                    .flatten()
                    .filter(|c| c.identity_hash == self.identity_hash)
                    .map(|c| c.identity),
            };
            let differences = theirs
                .map(|theirs| identity.differences(&theirs))
                .unwrap_or_default();
            bail!(
                "the settings differ from the plan's in --out {}:\n  {}\nevery worker of a run uses \
                 the preset and flags the plan was made with; to encode with these settings, use a \
                 new --out",
                out.describe(),
                if differences.is_empty() {
                    format!(
                        "identity_hash {} there, {} now",
                        self.identity_hash,
                        identity.hash()
                    )
                } else {
                    differences.join("\n  ")
                }
            );
        }
        if self.units != units.len() || self.units_sha256 != units_sha256(units) {
            bail!(
                "the inputs changed since the plan was made ({} units then, {} now, or other names): \
                 a run's partitions are fixed; write the changed inputs to a new --out",
                self.units,
                units.len()
            );
        }
        Ok(())
    }

    /// The run's plan: read and checked against this worker's view (`units`, the source's), or
    /// made from it (with the metadata schema of every unit) and created only if absent, so of
    /// many workers starting at once one creates it and the others check theirs against it. A
    /// plan of no units is refused.
    pub fn ensure(
        out: &dyn ShardStore,
        partitions: usize,
        identity: &RunIdentity,
        source: &dyn Source,
        input: &Path,
        units: Vec<String>,
    ) -> Result<Self> {
        if let Some(plan) = Self::read(out)? {
            plan.check(out, partitions, &units, identity)?;
            return Ok(plan);
        }
        if units.is_empty() {
            bail!(
                "--input {} holds no images (jpg, png, webp, gif, bmp or tiff files, searched \
                 recursively, or tar or Parquet files): nothing to split into partitions",
                input.display()
            );
        }
        if format::shard_files(out)?
            .iter()
            .any(|s| Scope::Whole.owns(s))
        {
            bail!(
                "--out {} holds a single-process run's shards: a many-worker run needs its own --out",
                out.describe()
            );
        }
        let (sidecars, unreadable) = SidecarSchema::infer(source.metadata_pass());
        if unreadable > 0 {
            eprintln!(
                "warning: {unreadable} .json sidecar(s) are not JSON objects and were ignored"
            );
        }
        let plan = PartitionPlan {
            format_version: format::FORMAT_VERSION,
            partitions,
            units: units.len(),
            units_sha256: units_sha256(&units),
            identity_hash: identity.hash(),
            identity: Some(identity.clone()),
            sidecars,
            created: format!(
                "{} by pid {} on {}",
                crate::host::now_utc(),
                std::process::id(),
                crate::host::hostname()
            ),
        };
        let mut file = out.create(PLAN, Commit::CreateOnly)?;
        file.write_all(&serde_json::to_vec_pretty(&plan)?)?;
        if let Err(e) = file.commit() {
            // Another worker created it first: theirs is the plan.
            let theirs = Self::read(out)?.ok_or(e)?;
            theirs.check(out, partitions, &units, identity)?;
            return Ok(theirs);
        }
        Ok(plan)
    }
}

/// A partition's done marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneMarker {
    pub partition: usize,
    pub rows: i64,
    /// The partition's shards with their rows: `finalize` builds the manifest from these
    /// instead of reading every footer again (one request each on object storage).
    pub shards: Vec<ManifestEntry>,
    pub encoded: usize,
    pub failures: BTreeMap<String, usize>,
    /// sha256 over the partition's keys, sorted, one per line.
    pub keys_sha256: String,
    pub finished: String,
    pub host: String,
    /// Rows `finalize` dropped from the partition's shards as copies of a row in a lower
    /// partition (`--dedupe`); `shards` and `rows` count what is left. Kept so that finalize
    /// reaches the same result however often it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<DroppedRow>,
}

/// A row `finalize` dropped as a cross-partition duplicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DroppedRow {
    pub shard: String,
    pub key: String,
    /// Hex, as the source's bytes were when the row was dropped.
    pub source_sha256: String,
    /// The key of the copy kept, in a lower partition.
    pub kept: String,
}

impl DroppedRow {
    pub fn sha256(&self) -> Result<[u8; 32]> {
        parse_sha256(&self.source_sha256).with_context(|| {
            format!(
                "a done marker's dropped row {:?} has no valid source_sha256: rerun its partition \
                 after deleting the marker",
                self.key
            )
        })
    }
}

impl DoneMarker {
    pub fn read(out: &dyn ShardStore, p: usize) -> Result<Option<Self>> {
        let Some(bytes) = out.read(&done_marker(p))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a done marker", out.name(&done_marker(p))))
    }

    /// Whether a rerun that encoded and pruned nothing left the partition as this marker
    /// describes it: the same shards with the same rows, the same rows dropped by `finalize`,
    /// and the same failures.
    pub fn still_describes(
        &self,
        manifest: &[ManifestEntry],
        summary: &RunSummary,
        dropped: &[DroppedRow],
    ) -> bool {
        summary.encoded == 0
            && summary.pruned == 0
            && self.dropped == dropped
            && self.failures == summary.failures
            && self.shards.len() == manifest.len()
            && self
                .shards
                .iter()
                .zip(manifest)
                .all(|(a, b)| a.path == b.path && a.rows == b.rows)
    }
}

/// Marks partition `p` done, last, once its shards (`manifest`) are committed; `dropped` are
/// the rows an earlier `finalize` dropped that stay dropped.
pub fn mark_done(
    out: &dyn ShardStore,
    p: usize,
    manifest: &[ManifestEntry],
    summary: &RunSummary,
    dropped: Vec<DroppedRow>,
) -> Result<()> {
    let mut keys = Vec::new();
    for entry in manifest {
        let builder = format::open(out, &entry.path)?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), [format::KEY]);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let column = batch.column(0);
            let column = column
                .as_any()
                .downcast_ref::<StringArray>()
                .context("the key column is not text")?;
            keys.extend(column.iter().flatten().map(str::to_string));
        }
    }
    keys.sort();
    let marker = DoneMarker {
        partition: p,
        rows: manifest.iter().map(|e| e.rows).sum(),
        shards: manifest.to_vec(),
        encoded: summary.encoded,
        failures: summary.failures.clone(),
        keys_sha256: units_sha256(&keys),
        finished: crate::host::now_utc(),
        host: crate::host::hostname(),
        dropped,
    };
    out.write(&done_marker(p), &serde_json::to_vec_pretty(&marker)?)
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit is in exactly one partition, partitions are contiguous and in order, and
    /// their sizes differ by at most one, for any unit list and partition count.
    #[test]
    fn partitions_cover_every_unit_once() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        let mut cases = vec![
            (0, 1),
            (1, 1),
            (3, 8),
            (8, 3),
            (10_000_000, 10_000),
            (usize::MAX / 2, 7),
        ];
        cases.extend((0..500).map(|_| (next(5000), 1 + next(300))));
        for (units, n) in cases {
            let mut at = 0;
            let (mut smallest, mut largest) = (usize::MAX, 0);
            for p in 0..n {
                let r = bounds(units, n, p);
                assert_eq!(
                    r.start, at,
                    "{units} units, {n} partitions: partition {p} starts at {at}"
                );
                assert!(r.end >= r.start);
                smallest = smallest.min(r.len());
                largest = largest.max(r.len());
                at = r.end;
            }
            assert_eq!(
                at, units,
                "{units} units, {n} partitions: every unit is covered"
            );
            assert!(
                largest - smallest <= 1,
                "{units} units, {n} partitions: sizes {smallest}..{largest}"
            );
        }
    }
}
