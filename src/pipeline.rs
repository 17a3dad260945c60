//! The wiring: takes a checked `RunPlan` (`plan`), takes the output folder's lock, and runs
//! source → decode+resize (rayon pool) → batch → encode → write, joined by bounded channels so
//! memory stays flat and a slow stage back-pressures the ones before it. Hands on a
//! `RunSummary`. A rerun resumes: committed rows that are current are skipped, stale ones pruned.
//! SIGINT, SIGTERM and SIGUSR1 stop it gracefully: no new images, the batches in flight finish,
//! the open shards are committed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;
use serde::Serialize;

use crate::batch::{Batch, Batcher, RowPixels};
use crate::config::PrecomputeConfig;
use crate::encode::{EncodedBatch, Encoder};
use crate::failure::{Failure, FailureKind};
use crate::format::{done_marker, Scope, SUCCESS};
use crate::partition_files::{self, DoneMarker, DroppedRow};
use crate::plan::RunPlan;
use crate::progress::Progress;
use crate::resume::{self, Committed, Current};
use crate::rows::{MetadataDigest, RowMaker};
use crate::source::{SampleRef, Source};
use crate::store::ShardStore;
use crate::summary::{RunSummary, StageBusy};
use crate::write::{self, ShardWriter};

pub use crate::plan::thread_split;

/// Batches waiting for the encoder: one being filled while one waits is enough to overlap.
const ENCODE_QUEUE: usize = 2;
/// Messages waiting for the writer.
const WRITE_QUEUE: usize = 4;
/// Threads encoding Parquet row groups: enough to keep ahead of a GPU (see `shard_file`).
const WRITE_THREADS: usize = 8;

/// Set by SIGINT, SIGTERM or SIGUSR1 (Slurm's pre-emption warning). A second signal more than
/// `REPEAT_GRACE` after the first exits at once with 128 + the signal's number; one sooner is the
/// same request again (`scancel` signals both the batch script and the worker, and the script
/// forwards its copy), so the worker still commits what it has.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    static FIRST_MS: AtomicU64 = AtomicU64::new(0);
    const REPEAT_GRACE_MS: u64 = 2000;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ] {
        let stop = stop.clone();
        let action = move || {
            // Only atomics, clock_gettime and _exit: all async-signal-safe.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if !stop.swap(true, Ordering::SeqCst) {
                FIRST_MS.store(now, Ordering::SeqCst);
            } else if now.saturating_sub(FIRST_MS.load(Ordering::SeqCst)) > REPEAT_GRACE_MS {
                signal_hook::low_level::exit(128 + signal);
            }
        };
        // SAFETY: the action only touches atomics, reads the clock and calls `_exit`.
        unsafe { signal_hook::low_level::register(signal, action) }
            .context("cannot install a signal handler")?;
    }
    Ok(stop)
}

/// One line of `_runs.jsonl`: a run's settings, which do not change its latents.
#[derive(Serialize)]
struct RunRecord<'a> {
    started: String,
    host: String,
    pid: u32,
    version: &'static str,
    identity_hash: &'a str,
    input: String,
    out: String,
    threads: usize,
    batch_size: usize,
    shard_rows: usize,
    device: &'a str,
    limit: usize,
    max_failures: f64,
    captions: Option<String>,
}

fn record_run(config: &PrecomputeConfig, plan: &RunPlan, scope: Scope) -> Result<()> {
    let out = match plan.out.local_root() {
        Some(root) => std::fs::canonicalize(root)
            .unwrap_or_else(|_| root.to_path_buf())
            .display()
            .to_string(),
        None => plan.out.describe(),
    };
    let record = RunRecord {
        started: crate::host::now_utc(),
        host: crate::host::hostname(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
        identity_hash: &plan.metadata.identity_hash,
        input: plan.input.display().to_string(),
        out,
        threads: config.threads,
        batch_size: config.batch_size,
        shard_rows: config.shard_rows,
        device: &config.device,
        limit: config.limit,
        max_failures: config.max_failures,
        captions: config.captions.as_ref().map(|p| p.display().to_string()),
    };
    // Object stores cannot append: the (small) file is read and written whole, here as locally.
    let mut runs = plan.out.read(&scope.runs())?.unwrap_or_default();
    serde_json::to_writer(&mut runs, &record)?;
    runs.push(b'\n');
    plan.out.write(&scope.runs(), &runs)
}

/// Locks, opens and writes one scope of the set (all of it, or one partition).
pub fn precompute_scope(plan: RunPlan, scope: Scope, stop: &AtomicBool) -> Result<RunSummary> {
    let config = &plan.config;
    let out = plan.out.clone();
    let _lock = out.lock(&scope.lock())?;
    // Another run may have finished between the plan's look and the lock: look again.
    let state = resume::inspect_output(out.as_ref(), &plan.identity, config.overwrite, scope)?;
    let mut committed = resume::open_output(out.as_ref(), &plan.identity, state, scope)?;
    let finality = Finality::new(out.clone(), scope)?;
    if let Some((marker, _)) = &finality.done {
        for row in &marker.dropped {
            committed.add_dropped(row.key.clone(), row.sha256()?);
        }
    }
    record_run(config, &plan, scope)?;
    if !committed.is_empty() {
        eprintln!(
            "{} holds {} committed rows of this identity: resuming",
            out.describe(),
            committed.len()
        );
    }
    run(plan, scope, &committed, stop, finality)
}

/// Whether the set's `_SUCCESS` still describes it while one scope is written. A whole run
/// removes it before it starts (`resume::open_output`), a partition that is not done too. A
/// rerun of a done partition removes it, and the partition's done marker, only once the
/// partition changes (a row encoded or pruned, other failures): a worker requeued on a finished
/// partition whose inputs are unchanged leaves a finalized set final.
struct Finality {
    out: Arc<dyn ShardStore>,
    scope: Scope,
    /// The partition's done marker and error lines as this rerun found them; None once it
    /// changed the partition (or when it was not done).
    done: Option<(DoneMarker, Option<Vec<u8>>)>,
}

impl Finality {
    fn new(out: Arc<dyn ShardStore>, scope: Scope) -> Result<Self> {
        let done = match scope {
            Scope::Whole => None,
            Scope::Partition(p) => match DoneMarker::read(out.as_ref(), p)? {
                Some(marker) => Some((marker, out.read(&scope.errors())?)),
                None => {
                    out.remove(SUCCESS)?;
                    None
                }
            },
        };
        Ok(Finality { out, scope, done })
    }

    /// The scope is about to change: the set is no longer final, the partition no longer done.
    fn changed(&mut self) -> Result<()> {
        if self.done.take().is_some() {
            self.out.remove(SUCCESS)?;
            if let Scope::Partition(p) = self.scope {
                self.out.remove(&done_marker(p))?;
            }
        }
        Ok(())
    }
}

fn run(
    plan: RunPlan,
    scope: Scope,
    committed: &Committed,
    stop: &AtomicBool,
    mut finality: Finality,
) -> Result<RunSummary> {
    let RunPlan {
        config,
        source,
        card,
        encoders,
        decode_threads,
        encode_threads,
        metadata,
        rows,
        tensors,
        inputs,
        out,
        ..
    } = plan;
    let config = &config;
    let mut writer = ShardWriter::new(
        out.clone(),
        scope,
        config.shard_rows,
        metadata.clone(),
        tensors,
        rows.sidecars.columns(),
        config.thread_budget().min(WRITE_THREADS),
    )?
    .with_compression(config.latent_compression);

    let start = Instant::now();
    let sessions = encoders.len();
    let input_f16 = encoders.first().is_some_and(Encoder::input_f16);
    let (batch_tx, batch_rx) = bounded::<(u64, Batch)>(ENCODE_QUEUE * sessions);
    let (write_tx, write_rx) = bounded::<Message>(WRITE_QUEUE * sessions);
    let clips = rows.video.is_some();
    let mut progress = Progress::new(inputs as u64, if clips { "clips" } else { "images" });

    let stages = std::thread::scope(|scope| -> Result<_> {
        let producer_tx = write_tx.clone();
        let rows = &rows;
        let source = source.as_ref();
        let batcher = Batcher::new(config.batch_size, card.input_range)
            .with_flip(config.flip)
            .with_f16(input_f16);
        let producer = scope.spawn(move || {
            produce(
                source,
                rows,
                config,
                batcher,
                decode_threads,
                committed,
                stop,
                batch_tx,
                producer_tx,
            )
        });
        // One thread per session, all taking batches from one queue; the writer puts their
        // results back in batch order.
        let encoding: Vec<_> = encoders
            .into_iter()
            .map(|mut encoder| {
                let (batch_rx, write_tx) = (batch_rx.clone(), write_tx.clone());
                scope.spawn(move || -> Result<Duration> {
                    let mut busy = Duration::ZERO;
                    for (seq, batch) in batch_rx {
                        let t = Instant::now();
                        let encoded = encoder.encode(batch)?;
                        busy += t.elapsed();
                        if write_tx.send(Message::Encoded(seq, encoded)).is_err() {
                            break;
                        }
                    }
                    Ok(busy)
                })
            })
            .collect();
        drop((batch_rx, write_tx));
        let write_busy = consume(&mut writer, write_rx, &mut progress, &mut finality, clips);
        let encode_busy = encoding
            .into_iter()
            .map(|e| e.join().expect("encoder thread panicked"))
            .collect::<Result<Vec<Duration>>>();
        let produced = producer.join().expect("decode thread panicked");
        // The first failure in flow order is the cause; later ones are its echo.
        let encode_busy = encode_busy?.into_iter().max().unwrap_or_default();
        Ok((produced?, encode_busy, write_busy?))
    });
    progress.finish();
    let (produced, encode_busy, write_busy): (Produced, Duration, Duration) = match stages {
        Ok(done) => done,
        Err(e) => {
            writer.abort();
            return Err(e);
        }
    };

    let t = Instant::now();
    let totals = writer.close()?;
    if let Some((_, errors)) = &finality.done {
        if out.read(&scope.errors())? != *errors {
            finality.changed()?;
        }
    }
    // Pruning needs every input seen: an interrupted run leaves it to the rerun.
    let pruned = if produced.interrupted {
        0
    } else {
        resume::prune(out.as_ref(), committed, &produced.current, || {
            finality.changed()
        })?
    };
    let manifest = write::manifest(out.as_ref(), |shard| scope.owns(shard))?;
    let mut summary = RunSummary {
        encoded: totals.rows,
        already_committed: produced.skipped,
        pruned,
        failed: totals.failed(),
        duplicates: totals.duplicates(),
        failures: totals
            .failures
            .iter()
            .map(|(k, n)| (k.as_str().to_string(), *n))
            .collect(),
        shards: manifest.len(),
        rows: manifest.iter().map(|e| e.rows).sum(),
        decode_threads,
        encode_threads,
        busy_seconds: StageBusy {
            decode_resize: produced.busy.as_secs_f64(),
            encode: encode_busy.as_secs_f64(),
            write: (write_busy + t.elapsed()).as_secs_f64(),
        },
        identity_hash: metadata.identity_hash.clone(),
        interrupted: produced.interrupted,
        retried_requests: crate::object::transient_failures(),
        clip_windows: clips,
        ..RunSummary::default()
    };
    for entry in &manifest {
        let folder = entry.path.split('/').next().unwrap_or_default().to_string();
        *summary.buckets.entry(folder).or_default() += entry.rows;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    summary.images_per_second = totals.rows as f64 / summary.seconds.max(1e-9);
    let errors = out.name(&scope.errors());
    if summary.interrupted {
        summary.print();
        bail!(
            "interrupted; what was done is committed ({} rows). Rerun the same command to resume",
            summary.rows
        );
    }
    let (unreadable, first) = crate::object::unreadable_objects();
    if unreadable > 0 {
        summary.print();
        bail!(
            "{unreadable} read(s) of input objects failed, e.g. {}: no _SUCCESS written (see {}). \
             Rerun the same command to resume once the bucket is readable",
            first.unwrap_or_default(),
            errors
        );
    }
    if summary.failed_fraction() > config.max_failures {
        summary.print();
        bail!(
            "{:.1}% of the inputs failed, more than {} {}: no _SUCCESS written (see {})",
            summary.failed_fraction() * 100.0,
            config.knob("max_failures"),
            config.max_failures,
            errors
        );
    }
    if summary.rows == 0 && scope == Scope::Whole {
        summary.print();
        bail!(
            "no rows: none of the {inputs} inputs could be encoded, so no _SUCCESS is written (see {})",
            errors
        );
    }
    match scope {
        Scope::Whole => write::seal(out.as_ref(), &manifest, &serde_json::to_value(&summary)?)?,
        Scope::Partition(p) => {
            // Rows finalize dropped whose sources are unchanged stay dropped.
            let dropped: Vec<DroppedRow> = finality
                .done
                .as_ref()
                .map(|(marker, _)| {
                    marker
                        .dropped
                        .iter()
                        .filter(|row| produced.still_dropped.contains(&row.key))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            match &finality.done {
                Some((marker, _)) if marker.still_describes(&manifest, &summary, &dropped) => {
                    eprintln!(
                        "partition {p} was done and its inputs are unchanged: its done marker stands"
                    )
                }
                _ => {
                    finality.changed()?;
                    partition_files::mark_done(out.as_ref(), p, &manifest, &summary, dropped)?
                }
            }
        }
    }
    Ok(summary)
}

/// One row out of decode+resize: an image, or one window of a clip.
enum PreparedRow {
    Ready(RowPixels, crate::batch::RowMeta, MetadataDigest),
    /// A committed row is current for this key.
    Committed {
        key: String,
        sha256: [u8; 32],
        digest: MetadataDigest,
    },
    /// `finalize` dropped this key's row as a copy of another partition's, and its source is
    /// unchanged: it stays dropped.
    Dropped {
        key: String,
        sha256: [u8; 32],
    },
    /// The source could not be read now, but has a committed row: the row stays.
    Unreadable(Failure),
    Failed(Failure),
}

enum Message {
    /// A batch's latents and its place in batch order.
    Encoded(u64, EncodedBatch),
    Failed(Failure),
    /// An input whose committed row is current (for progress).
    Skipped,
    /// A clip's windows are all handed on (progress counts clips, not windows).
    ClipDone,
}

/// What the producer hands back: its busy time, the current state of every source that has a
/// committed row (what pruning keeps; bounded by the committed set, empty on a fresh run), how
/// many images were skipped as committed, and whether a signal stopped it.
struct Produced {
    busy: Duration,
    current: HashMap<String, Current>,
    skipped: usize,
    /// Keys whose row `finalize` dropped and that stay dropped (`PreparedRow::Dropped`).
    still_dropped: HashSet<String>,
    interrupted: bool,
}

/// List, load, decode and resize in order-preserving chunks on a rayon pool, then batch. Two
/// chunks are in flight: the pool decodes the next while this thread batches the last, so
/// neither waits for the other. A raised `stop` ends the listing; what is in flight finishes.
#[allow(clippy::too_many_arguments)]
fn produce(
    source: &(dyn Source + Send),
    rows: &RowMaker,
    config: &PrecomputeConfig,
    batcher: Batcher,
    threads: usize,
    committed: &Committed,
    stop: &AtomicBool,
    batch_tx: Sender<(u64, Batch)>,
    write_tx: Sender<Message>,
) -> Result<Produced> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .context("cannot start the decode thread pool")?;
    // A clip holds many frames: a chunk is one clip per decode thread.
    let chunk_len = if rows.video.is_some() {
        threads.max(1)
    } else {
        (config.batch_size * threads).max(32)
    };
    let limit = if config.limit > 0 {
        config.limit
    } else {
        usize::MAX
    };
    let mut samples = source.list().take(limit).peekable();
    let mut batching = Batching {
        stop,
        dedupe: config.dedupe,
        clips: rows.video.is_some(),
        batcher,
        next_seq: 0,
        first_with: HashMap::new(),
        committed,
        produced: Produced {
            busy: Duration::ZERO,
            current: HashMap::new(),
            skipped: 0,
            still_dropped: HashSet::new(),
            interrupted: false,
        },
        batch_tx: &batch_tx,
        write_tx: &write_tx,
    };
    pool.in_place_scope(|scope| {
        let mut in_flight = VecDeque::new();
        let submit = |chunk: Vec<Result<SampleRef, Failure>>| {
            let (tx, rx) = bounded(1);
            scope.spawn(move |_| {
                let prepared: Vec<(Vec<PreparedRow>, Duration)> = chunk
                    .into_par_iter()
                    .map(|item| {
                        let t = Instant::now();
                        let rows = match item {
                            Ok(sample) if rows.video.is_some() => {
                                prepare_clip_rows(source, rows, sample, committed)
                            }
                            Ok(sample) => vec![prepare_row(source, rows, sample, committed)],
                            Err(failure) => vec![unusable(failure, committed)],
                        };
                        (rows, t.elapsed())
                    })
                    .collect();
                let _ = tx.send(prepared);
            });
            rx
        };
        loop {
            if stop.load(Ordering::Relaxed) && samples.peek().is_some() {
                batching.produced.interrupted = true;
            }
            while in_flight.len() < 2 && !batching.produced.interrupted && samples.peek().is_some()
            {
                in_flight.push_back(submit(samples.by_ref().take(chunk_len).collect()));
            }
            let Some(next) = in_flight.pop_front() else {
                break;
            };
            let prepared = next.recv().expect("decode chunk finished");
            if !batching.push_all(prepared) || batching.produced.interrupted {
                // The encoder or writer stopped: its error is the run's; drain and return.
                for rx in in_flight.drain(..) {
                    let _ = rx.recv();
                }
                return;
            }
        }
        batching.flush();
    });
    Ok(batching.produced)
}

/// Loads one sample and makes its row; a sample whose committed row is current (same key,
/// bytes, caption and metadata) is not decoded.
fn prepare_row(
    source: &(dyn Source + Send),
    rows: &RowMaker,
    sample: SampleRef,
    committed: &Committed,
) -> PreparedRow {
    let loaded = match source.load(sample) {
        Ok(loaded) => loaded,
        Err(failure) => return unusable(failure, committed),
    };
    let text = rows.text(&loaded);
    let digest = rows.digest(&text);
    if committed.holds(&loaded.key, &loaded.bytes.sha256, &digest) {
        return PreparedRow::Committed {
            key: loaded.key.clone(),
            sha256: loaded.bytes.sha256,
            digest,
        };
    }
    if committed.was_dropped(&loaded.key, &loaded.bytes.sha256) {
        return PreparedRow::Dropped {
            key: loaded.key.clone(),
            sha256: loaded.bytes.sha256,
        };
    }
    match rows.prepare(loaded, text) {
        Ok((image, meta)) => PreparedRow::Ready(RowPixels::Image(image), meta, digest),
        Err(failure) => PreparedRow::Failed(failure),
    }
}

/// Loads one clip and makes a row per window (`RowMaker::clip_windows`); windows whose
/// committed rows are current are not decoded, and a clip whose windows all are is not decoded
/// at all.
fn prepare_clip_rows(
    source: &(dyn Source + Send),
    rows: &RowMaker,
    sample: SampleRef,
    committed: &Committed,
) -> Vec<PreparedRow> {
    let loaded = match source.load(sample) {
        Ok(loaded) => loaded,
        Err(failure) => return vec![unusable(failure, committed)],
    };
    let text = rows.text(&loaded);
    let digest = rows.digest(&text);
    let (info, windows) = match rows.clip_windows(&loaded) {
        Ok(planned) => planned,
        Err(failure) => return vec![PreparedRow::Failed(failure)],
    };
    let sha256 = loaded.bytes.sha256;
    let mut out = Vec::with_capacity(windows.len());
    let mut wanted = Vec::new();
    for window in windows {
        if committed.holds(&window.key, &sha256, &digest) {
            out.push(PreparedRow::Committed {
                key: window.key,
                sha256,
                digest,
            });
        } else if committed.was_dropped(&window.key, &sha256) {
            out.push(PreparedRow::Dropped {
                key: window.key,
                sha256,
            });
        } else {
            wanted.push(window);
        }
    }
    if !wanted.is_empty() {
        match rows.prepare_clip(&loaded, &text, &info, wanted) {
            Ok(ready) => out.extend(
                ready
                    .into_iter()
                    .map(|(pixels, meta)| PreparedRow::Ready(pixels, meta, digest)),
            ),
            Err(failure) => out.push(PreparedRow::Failed(failure)),
        }
    }
    out
}

/// A sample that could not be listed or loaded. One that cannot be read now (permissions, a
/// flaky mount) but has committed rows (its own, or a clip's windows) keeps them.
fn unusable(mut failure: Failure, committed: &Committed) -> PreparedRow {
    if failure.kind == FailureKind::Io
        && (committed.has_key(&failure.key) || !committed.keys_under(&failure.key).is_empty())
    {
        failure.message += "; its committed row is kept";
        PreparedRow::Unreadable(failure)
    } else {
        PreparedRow::Failed(failure)
    }
}

/// The producer's in-order half: dedupe, committed bookkeeping, batching and numbering.
struct Batching<'a> {
    /// Raised by a signal: no more rows go into batches.
    stop: &'a AtomicBool,
    dedupe: bool,
    /// A clip run: rows are windows, `--dedupe` compares clip and window.
    clips: bool,
    batcher: Batcher,
    next_seq: u64,
    /// --dedupe: the first key (in key order) holding each content hash.
    first_with: HashMap<[u8; 32], String>,
    committed: &'a Committed,
    produced: Produced,
    batch_tx: &'a Sender<(u64, Batch)>,
    write_tx: &'a Sender<Message>,
}

impl Batching<'_> {
    /// Takes one chunk's rows in order; false when a downstream stage has gone.
    fn push_all(&mut self, prepared: Vec<(Vec<PreparedRow>, Duration)>) -> bool {
        for (rows, took) in prepared {
            if self.stop.load(Ordering::Relaxed) {
                self.produced.interrupted = true;
                return true;
            }
            self.produced.busy += took;
            for row in rows {
                if !self.push(row) {
                    return false;
                }
            }
            if self.clips && self.write_tx.send(Message::ClipDone).is_err() {
                return false;
            }
        }
        true
    }

    /// What `--dedupe` compares (`format::content_id`).
    fn content_id(&self, key: &str, sha256: &[u8; 32]) -> [u8; 32] {
        crate::format::content_id(sha256, key, self.clips)
    }

    /// Takes one row; false when a downstream stage has gone.
    fn push(&mut self, row: PreparedRow) -> bool {
        let row = match row {
            PreparedRow::Ready(_, ref meta, _) if self.dedupe => {
                let id = self.content_id(&meta.key, &meta.source_sha256);
                match self.first_with.get(&id) {
                    Some(first) => PreparedRow::Failed(Failure::new(
                        meta.key.clone(),
                        FailureKind::Duplicate,
                        format!("same bytes as {first}, encoded once (--dedupe)"),
                    )),
                    None => {
                        self.first_with.insert(id, meta.key.clone());
                        row
                    }
                }
            }
            PreparedRow::Committed {
                ref key, sha256, ..
            }
            | PreparedRow::Dropped { ref key, sha256 }
                if self.dedupe =>
            {
                let id = self.content_id(key, &sha256);
                self.first_with.entry(id).or_insert_with(|| key.clone());
                row
            }
            row => row,
        };
        match row {
            PreparedRow::Ready(pixels, meta, digest) => {
                if self.committed.has_key(&meta.key) {
                    self.produced
                        .current
                        .insert(meta.key.clone(), Current::Row(meta.source_sha256, digest));
                }
                match self.batcher.push(pixels, meta) {
                    Some(batch) => self.send(batch),
                    None => true,
                }
            }
            PreparedRow::Committed {
                key,
                sha256,
                digest,
            } => {
                self.produced
                    .current
                    .insert(key, Current::Row(sha256, digest));
                self.produced.skipped += 1;
                self.write_tx.send(Message::Skipped).is_ok()
            }
            PreparedRow::Dropped { key, .. } => {
                self.produced.still_dropped.insert(key);
                self.produced.skipped += 1;
                self.write_tx.send(Message::Skipped).is_ok()
            }
            PreparedRow::Unreadable(failure) => {
                for key in self.committed.keys_under(&failure.key) {
                    self.produced.current.insert(key, Current::Unreadable);
                }
                self.produced
                    .current
                    .insert(failure.key.clone(), Current::Unreadable);
                self.write_tx.send(Message::Failed(failure)).is_ok()
            }
            PreparedRow::Failed(failure) => self.write_tx.send(Message::Failed(failure)).is_ok(),
        }
    }

    fn send(&mut self, batch: Batch) -> bool {
        self.next_seq += 1;
        self.batch_tx.send((self.next_seq - 1, batch)).is_ok()
    }

    /// The partial batches left at the end.
    fn flush(&mut self) {
        for batch in self.batcher.flush() {
            if !self.send(batch) {
                break;
            }
        }
    }
}

/// The writer's loop: runs on the calling thread until every sender is gone.
fn consume(
    writer: &mut ShardWriter,
    rx: Receiver<Message>,
    progress: &mut Progress,
    finality: &mut Finality,
    clips: bool,
) -> Result<Duration> {
    let mut busy = Duration::ZERO;
    // Batches from several sessions can arrive out of order; they are written in order.
    let mut waiting: BTreeMap<u64, EncodedBatch> = BTreeMap::new();
    let mut next = 0u64;
    let mut skipped = 0;
    let mut clips_done = 0;
    for message in rx {
        let t = Instant::now();
        match message {
            Message::Encoded(seq, batch) => {
                finality.changed()?;
                waiting.insert(seq, batch);
                while let Some(batch) = waiting.remove(&next) {
                    writer.write(batch)?;
                    next += 1;
                }
            }
            Message::Failed(failure) => writer.record_failure(&failure)?,
            Message::Skipped => skipped += 1,
            Message::ClipDone => clips_done += 1,
        }
        busy += t.elapsed();
        let totals = writer.totals();
        let (rows, failed) = (totals.rows, totals.failed() + totals.duplicates());
        let done = if clips {
            clips_done
        } else {
            rows + failed + skipped
        };
        progress.set(done as u64, &format!("{failed} failed"));
    }
    Ok(busy)
}
