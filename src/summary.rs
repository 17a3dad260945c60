//! What a run did: the summary the pipeline hands on, printed at the end and recorded in
//! `_SUCCESS` or a partition's done marker. Below both the pipeline and the set layer, which
//! adds up its partitions' summaries.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::failure::FailureKind;

/// What the run did, as the final summary prints it and `_SUCCESS` records it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Images encoded by this run.
    pub encoded: usize,
    /// Images whose committed row was current, skipped.
    pub already_committed: usize,
    /// Committed rows dropped because their source changed, vanished or became unusable.
    pub pruned: usize,
    /// Inputs that could not be used (not counting `--dedupe` duplicates).
    pub failed: usize,
    /// Later copies of identical files under `--dedupe`: listed in `_errors.jsonl`, not failures.
    pub duplicates: usize,
    pub failures: BTreeMap<String, usize>,
    pub shards: usize,
    pub rows: i64,
    /// Rows per shard folder (`WxH`): the bucket histogram.
    pub buckets: BTreeMap<String, i64>,
    pub seconds: f64,
    pub images_per_second: f64,
    pub decode_threads: usize,
    pub encode_threads: usize,
    /// Seconds each stage spent working (decode summed over its threads).
    pub busy_seconds: StageBusy,
    pub identity_hash: String,
    /// A signal stopped the run before every input was seen.
    pub interrupted: bool,
    /// Object-store requests that failed transiently (5xx, throttling, resets) and were retried.
    pub retried_requests: u64,
    /// A clip run: rows are windows of frames (counted, and printed, as windows).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub clip_windows: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageBusy {
    pub decode_resize: f64,
    pub encode: f64,
    pub write: f64,
}

impl RunSummary {
    /// Adds another partition's counts (a worker that ran several).
    pub fn add(&mut self, other: &RunSummary) {
        self.encoded += other.encoded;
        self.already_committed += other.already_committed;
        self.pruned += other.pruned;
        self.failed += other.failed;
        self.duplicates += other.duplicates;
        for (kind, n) in &other.failures {
            *self.failures.entry(kind.clone()).or_default() += n;
        }
        self.shards += other.shards;
        self.rows += other.rows;
        for (shape, n) in &other.buckets {
            *self.buckets.entry(shape.clone()).or_default() += n;
        }
        self.seconds += other.seconds;
        self.images_per_second = self.encoded as f64 / self.seconds.max(1e-9);
        self.decode_threads = other.decode_threads;
        self.encode_threads = other.encode_threads;
        self.clip_windows = other.clip_windows;
        self.busy_seconds.decode_resize += other.busy_seconds.decode_resize;
        self.busy_seconds.encode += other.busy_seconds.encode;
        self.busy_seconds.write += other.busy_seconds.write;
        self.identity_hash = other.identity_hash.clone();
        self.interrupted |= other.interrupted;
        self.retried_requests = other.retried_requests;
    }

    /// The stage that limited throughput: the one busiest for its share of threads.
    pub fn bottleneck(&self) -> &'static str {
        let decode = self.busy_seconds.decode_resize / self.decode_threads.max(1) as f64;
        let stages = [
            ("decode+resize", decode),
            ("encode", self.busy_seconds.encode),
            ("write", self.busy_seconds.write),
        ];
        stages
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or("none", |s| s.0)
    }

    /// Share of this run's inputs that failed (duplicates are not failures).
    pub fn failed_fraction(&self) -> f64 {
        let seen = self.encoded + self.already_committed + self.failed + self.duplicates;
        if seen == 0 {
            0.0
        } else {
            self.failed as f64 / seen as f64
        }
    }

    pub fn print(&self) {
        let failures = if self.failed == 0 {
            String::new()
        } else {
            let kinds: Vec<String> = self
                .failures
                .iter()
                .filter(|(k, _)| k.as_str() != FailureKind::Duplicate.as_str())
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            format!(" ({}; see _errors.jsonl)", kinds.join(", "))
        };
        let resumed = if self.already_committed + self.pruned == 0 {
            String::new()
        } else {
            format!(
                ", {} already committed, {} stale rows pruned",
                self.already_committed, self.pruned
            )
        };
        let duplicates = if self.duplicates == 0 {
            String::new()
        } else {
            format!(", {} duplicates (--dedupe)", self.duplicates)
        };
        let unit = if self.clip_windows {
            "clip windows"
        } else {
            "images"
        };
        eprintln!(
            "encoded {} {unit}{resumed}{duplicates}, {} failed{failures}; {} rows in {} shard(s); {:.1} s, {:.2} {unit}/s",
            self.encoded, self.failed, self.rows, self.shards, self.seconds, self.images_per_second
        );
        if self.buckets.len() > 1 {
            let mut counts: Vec<_> = self.buckets.iter().collect();
            counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let line: Vec<String> = counts
                .iter()
                .map(|(shape, n)| format!("{shape} {n}"))
                .collect();
            eprintln!("buckets: {}", line.join(", "));
        }
        // A worker whose partitions were all done already ran no stage.
        if self.decode_threads == 0 {
            return;
        }
        eprintln!(
            "busy: decode+resize {:.1} s over {} thread(s), encode {:.1} s ({} ONNX Runtime thread(s)), write {:.1} s; bottleneck: {}",
            self.busy_seconds.decode_resize,
            self.decode_threads,
            self.busy_seconds.encode,
            self.encode_threads,
            self.busy_seconds.write,
            self.bottleneck()
        );
        if self.retried_requests > 0 {
            eprintln!(
                "object storage: {} request(s) failed transiently and were retried with back-off",
                self.retried_requests
            );
        }
    }
}
