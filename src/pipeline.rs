//! The wiring: discover → decode+resize (rayon pool) → batch → encode → write, joined by bounded
//! channels so memory stays flat and a slow stage back-pressures the ones before it. Takes a
//! `PrecomputeConfig`, hands on a `RunSummary`. A rerun resumes: committed rows whose source is
//! unchanged are skipped, stale ones pruned.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::batch::{Batch, Batcher, RowMeta};
use crate::config::PrecomputeConfig;
use crate::decode::{decode_source, read_source, SourceBytes};
use crate::discover::{self, Source};
use crate::encode::{EncodedBatch, Encoder};
use crate::failure::{Failure, FailureKind};
use crate::model::ModelCard;
use crate::resize::{prepare, Framing, Prepared};
use crate::resume::{self, Committed};
use crate::runtime::Device;
use crate::sidecar::SidecarSchema;
use crate::write::{self, ShardWriter};

/// Batches waiting for the encoder: one being filled while one waits is enough to overlap.
const ENCODE_QUEUE: usize = 2;
/// Messages waiting for the writer.
const WRITE_QUEUE: usize = 4;

/// What the run did, as the final summary prints it and `_SUCCESS` records it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Images encoded by this run.
    pub encoded: usize,
    /// Images whose committed row was current, skipped.
    pub already_committed: usize,
    /// Committed rows dropped because their source changed, vanished or became unusable.
    pub pruned: usize,
    pub failed: usize,
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
    pub config_hash: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageBusy {
    pub decode_resize: f64,
    pub encode: f64,
    pub write: f64,
}

impl RunSummary {
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

    /// Share of this run's inputs that failed.
    pub fn failed_fraction(&self) -> f64 {
        let seen = self.encoded + self.already_committed + self.failed;
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
        eprintln!(
            "encoded {} images{resumed}, {} failed{failures}; {} rows in {} shard(s); {:.1} s, {:.2} images/s",
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
        eprintln!(
            "busy: decode+resize {:.1} s over {} thread(s), encode {:.1} s ({} ONNX Runtime thread(s)), write {:.1} s; bottleneck: {}",
            self.busy_seconds.decode_resize,
            self.decode_threads,
            self.busy_seconds.encode,
            self.encode_threads,
            self.busy_seconds.write,
            self.bottleneck()
        );
    }
}

/// How the thread budget is split between the decode pool and each ONNX Runtime session. On
/// the CPU both get every thread (the encoder is the bottleneck for any real VAE; ONNX Runtime
/// does not spin while waiting, so the pool takes the cores whenever the encoder waits for a
/// batch, and README "Scaling" shows the measurements behind this). On GPUs the sessions need
/// one thread each for the few CPU-side nodes and decoding gets the cores.
pub fn thread_split(budget: usize, device: &Device) -> (usize, usize) {
    match device {
        Device::Cpu => (budget.max(1), budget.max(1)),
        Device::Cuda(_) => (budget.max(1), 1),
    }
}

/// Runs `precompute`: everything that can be checked is checked before the first image.
pub fn precompute(config: &PrecomputeConfig) -> Result<RunSummary> {
    config.validate()?;
    let input = std::fs::canonicalize(&config.input)
        .with_context(|| format!("--input {} does not exist", config.input.display()))?;
    if !input.is_dir() {
        bail!("--input {} is not a folder", config.input.display());
    }
    let card = ModelCard::resolve(&config.model)?;
    card.check_size(config.size)?;
    let device = Device::parse(&config.device)?;
    let (decode_threads, encode_threads) = thread_split(config.thread_budget(), &device);
    let encoders = device
        .placements()
        .into_iter()
        .map(|gpu| Encoder::open_on(&card, gpu, encode_threads, config.latent_mode, config.seed))
        .collect::<Result<Vec<_>>>()?;

    let encoder_sha256 = card.encoder_sha256()?;
    let identity = format!(
        "{}|{:?}|{:?}|{}|{}|{}|{}",
        card.name,
        card.input_range,
        card.output,
        card.latent_channels,
        card.scaling_factor,
        card.shift_factor,
        encoder_sha256
    );
    // JSON sidecars decide columns, so their schema is inferred first and is part of the config.
    let limit = if config.limit > 0 {
        config.limit
    } else {
        usize::MAX
    };
    let images: Vec<std::path::PathBuf> = discover::walk(&input)
        .take(limit)
        .flatten()
        .map(|s| s.path)
        .collect();
    let (sidecars, unreadable) = SidecarSchema::infer(images.iter().map(|p| p.as_path()));
    drop(images);
    if unreadable > 0 {
        eprintln!("warning: {unreadable} .json sidecar(s) are not JSON objects and were ignored");
    }
    let identity = format!("{identity}|{}", sidecars.describe());
    let mut effective = config.clone();
    effective.input = input.clone();
    let config_hash = effective.output_hash(&identity);
    let config_toml = effective.to_toml();
    let committed =
        resume::prepare_output(&config.out, &config_hash, &config_toml, config.overwrite)?;
    if !committed.is_empty() {
        eprintln!(
            "{} holds {} committed rows of this config: resuming",
            config.out.display(),
            committed.len()
        );
    }

    let metadata = vec![
        (
            "vae_pipeline.version".into(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("vae_pipeline.model".into(), card.name.clone()),
        ("vae_pipeline.encoder_sha256".into(), encoder_sha256),
        (
            "vae_pipeline.scaling_factor".into(),
            card.scaling_factor.to_string(),
        ),
        (
            "vae_pipeline.shift_factor".into(),
            card.shift_factor.to_string(),
        ),
        ("vae_pipeline.normalization".into(), card.normalization()),
        (
            "vae_pipeline.latent_mode".into(),
            config.latent_mode.as_str().into(),
        ),
        ("vae_pipeline.dtype".into(), config.dtype.as_str().into()),
        (
            "vae_pipeline.resize".into(),
            format!("{} {}", config.resize.as_str(), config.size),
        ),
        ("vae_pipeline.config_hash".into(), config_hash.clone()),
        ("vae_pipeline.config".into(), config_toml),
    ];
    let rows = RowMaker {
        config,
        framing: Framing::new(config)?,
        captions: match &config.captions {
            Some(path) => crate::captions::load(path)?,
            None => HashMap::new(),
        },
        sidecars: sidecars.clone(),
    };
    let extra_columns = sidecars
        .fields
        .iter()
        .map(|(c, _, t)| (c.clone(), t.data_type()))
        .collect();
    let mut writer = ShardWriter::new(
        &config.out,
        config.shard_rows,
        config.dtype,
        metadata,
        extra_columns,
    )?;

    let start = Instant::now();
    let sessions = encoders.len();
    let (batch_tx, batch_rx) = bounded::<(u64, Batch)>(ENCODE_QUEUE * sessions);
    let (write_tx, write_rx) = bounded::<Message>(WRITE_QUEUE * sessions);
    let progress = Progress::new();

    let stages = std::thread::scope(|scope| -> Result<_> {
        let producer_tx = write_tx.clone();
        let committed = &committed;
        let rows = &rows;
        let producer = scope.spawn(move || {
            produce(
                &input,
                rows,
                card.input_range,
                decode_threads,
                committed,
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
        let write_busy = consume(&mut writer, write_rx, &progress);
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
    let pruned = resume::prune(&committed, &produced.current)?;
    let mut summary = RunSummary {
        encoded: totals.rows,
        already_committed: produced.skipped,
        pruned,
        failed: totals.failed(),
        failures: totals
            .failures
            .iter()
            .map(|(k, n)| (k.as_str().to_string(), *n))
            .collect(),
        decode_threads,
        encode_threads,
        busy_seconds: StageBusy {
            decode_resize: produced.busy.as_secs_f64(),
            encode: encode_busy.as_secs_f64(),
            write: (write_busy + t.elapsed()).as_secs_f64(),
        },
        config_hash,
        ..RunSummary::default()
    };
    summary.seconds = start.elapsed().as_secs_f64();
    summary.images_per_second = totals.rows as f64 / summary.seconds.max(1e-9);
    summary.shards = write::shard_files(&config.out)?.len();
    if summary.failed_fraction() > config.max_failures {
        summary.print();
        bail!(
            "{:.1}% of the inputs failed, more than --max-failures {}: no _SUCCESS written (see {})",
            summary.failed_fraction() * 100.0,
            config.max_failures,
            config.out.join(write::ERRORS).display()
        );
    }
    write::seal(&config.out, |manifest| {
        summary.rows = manifest.iter().map(|e| e.rows).sum();
        for entry in manifest {
            let folder = entry.path.split('/').next().unwrap_or_default().to_string();
            *summary.buckets.entry(folder).or_default() += entry.rows;
        }
        Ok(serde_json::to_value(&summary)?)
    })?;
    Ok(summary)
}

/// One image out of decode+resize.
enum PreparedRow {
    Ready(Prepared, RowMeta),
    /// A committed row is current for this key.
    Committed {
        key: String,
        sha256: [u8; 32],
    },
    Failed(Failure),
}

enum Message {
    /// A batch's latents and its place in batch order.
    Encoded(u64, EncodedBatch),
    Failed(Failure),
}

/// What the producer hands back: its busy time, the current hash of every readable source that
/// has a committed row (what pruning keeps; bounded by the committed set, empty on a fresh run),
/// and how many images were skipped as committed.
struct Produced {
    busy: Duration,
    current: HashMap<String, [u8; 32]>,
    skipped: usize,
}

/// Discover, decode and resize in order-preserving chunks on a rayon pool, then batch. Two
/// chunks are in flight: the pool decodes the next while this thread batches the last, so
/// neither waits for the other.
#[allow(clippy::too_many_arguments)]
fn produce(
    input: &Path,
    rows: &RowMaker,
    input_range: [f32; 2],
    threads: usize,
    committed: &Committed,
    batch_tx: Sender<(u64, Batch)>,
    write_tx: Sender<Message>,
) -> Result<Produced> {
    let config = rows.config;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .context("cannot start the decode thread pool")?;
    let chunk_len = (config.batch_size * threads).max(32);
    let limit = if config.limit > 0 {
        config.limit
    } else {
        usize::MAX
    };
    let mut sources = discover::walk(input).take(limit).peekable();
    let mut batching = Batching {
        config,
        batcher: Batcher::new(config.batch_size, input_range).with_flip(config.flip),
        next_seq: 0,
        first_with: HashMap::new(),
        committed,
        produced: Produced {
            busy: Duration::ZERO,
            current: HashMap::new(),
            skipped: 0,
        },
        batch_tx: &batch_tx,
        write_tx: &write_tx,
    };
    pool.in_place_scope(|scope| {
        let mut in_flight = VecDeque::new();
        let submit = |chunk: Vec<Result<Source, Failure>>| {
            let (tx, rx) = bounded(1);
            scope.spawn(move |_| {
                let prepared: Vec<(PreparedRow, Duration)> = chunk
                    .into_par_iter()
                    .map(|item| {
                        let t = Instant::now();
                        let row = match item {
                            Ok(source) => rows.prepare_row(&source, committed),
                            Err(failure) => PreparedRow::Failed(failure),
                        };
                        (row, t.elapsed())
                    })
                    .collect();
                let _ = tx.send(prepared);
            });
            rx
        };
        loop {
            while in_flight.len() < 2 && sources.peek().is_some() {
                in_flight.push_back(submit(sources.by_ref().take(chunk_len).collect()));
            }
            let Some(next) = in_flight.pop_front() else {
                break;
            };
            let prepared = next.recv().expect("decode chunk finished");
            if !batching.push_all(prepared) {
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

/// The producer's in-order half: dedupe, committed bookkeeping, batching and numbering.
struct Batching<'a> {
    config: &'a PrecomputeConfig,
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
    fn push_all(&mut self, prepared: Vec<(PreparedRow, Duration)>) -> bool {
        for (row, took) in prepared {
            self.produced.busy += took;
            let row = match row {
                PreparedRow::Ready(_, ref meta) if self.config.dedupe => {
                    match self.first_with.get(&meta.source_sha256) {
                        Some(first) => PreparedRow::Failed(Failure::new(
                            meta.key.clone(),
                            FailureKind::Duplicate,
                            format!("same bytes as {first}, encoded once (--dedupe)"),
                        )),
                        None => {
                            self.first_with.insert(meta.source_sha256, meta.key.clone());
                            row
                        }
                    }
                }
                PreparedRow::Committed { ref key, sha256 } if self.config.dedupe => {
                    self.first_with.entry(sha256).or_insert_with(|| key.clone());
                    row
                }
                row => row,
            };
            let sent = match row {
                PreparedRow::Ready(image, meta) => {
                    if self.committed.has_key(&meta.key) {
                        self.produced
                            .current
                            .insert(meta.key.clone(), meta.source_sha256);
                    }
                    match self.batcher.push(&image, meta) {
                        Some(batch) => self.send(batch),
                        None => true,
                    }
                }
                PreparedRow::Committed { key, sha256 } => {
                    self.produced.current.insert(key, sha256);
                    self.produced.skipped += 1;
                    true
                }
                PreparedRow::Failed(failure) => {
                    self.write_tx.send(Message::Failed(failure)).is_ok()
                }
            };
            if !sent {
                return false;
            }
        }
        true
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

/// The decode+resize stage for one source: what `precompute` and `report` both run per image.
pub fn decode_and_resize(
    source: &Source,
    config: &PrecomputeConfig,
) -> Result<(Prepared, RowMeta), Failure> {
    let framing = Framing::new(config)
        .map_err(|e| Failure::new(source.key.clone(), FailureKind::Io, format!("{e:#}")))?;
    let rows = RowMaker {
        config,
        framing,
        captions: HashMap::new(),
        sidecars: SidecarSchema::default(),
    };
    rows.decoded_row(source, read_source(source)?)
}

/// What turns a source into a prepared row, built once per run.
struct RowMaker<'a> {
    config: &'a PrecomputeConfig,
    framing: Framing,
    /// `--captions`: overrides sidecar captions.
    captions: HashMap<String, String>,
    /// The run's JSON sidecar columns.
    sidecars: SidecarSchema,
}

impl RowMaker<'_> {
    /// `decode_and_resize` for `precompute`: sources whose committed row is current (same key,
    /// same bytes) are not decoded.
    fn prepare_row(&self, source: &Source, committed: &Committed) -> PreparedRow {
        let read = match read_source(source) {
            Ok(read) => read,
            Err(failure) => return PreparedRow::Failed(failure),
        };
        if committed.holds(&source.key, &read.sha256) {
            return PreparedRow::Committed {
                key: source.key.clone(),
                sha256: read.sha256,
            };
        }
        match self.decoded_row(source, read) {
            Ok((image, meta)) => PreparedRow::Ready(image, meta),
            Err(failure) => PreparedRow::Failed(failure),
        }
    }

    fn decoded_row(
        &self,
        source: &Source,
        read: SourceBytes,
    ) -> Result<(Prepared, RowMeta), Failure> {
        let config = self.config;
        let fail = |kind, message: String| Failure::new(source.key.clone(), kind, message);
        let hint = |w, h| self.framing.geometry(&source.key, w, h).map(|g| g.resized);
        let decoded = decode_source(source, read, &config.decode_options(), Some(&hint))?;
        let (orig_width, orig_height) = (decoded.width, decoded.height);
        let geometry = self.framing.geometry(&source.key, orig_width, orig_height).ok_or_else(|| {
            fail(FailureKind::TooSmall, format!("{orig_width}x{orig_height}: no bucket fits without upscaling (--no-upscale)"))
        })?;
        let (tw, th) = geometry.resized;
        if u64::from(tw) * u64::from(th) > config.max_pixels {
            return Err(fail(
                FailureKind::TooLarge,
                format!(
                    "{orig_width}x{orig_height} resized for a {}x{} window is {tw}x{th}, above --max-pixels {}",
                    geometry.target.0, geometry.target.1, config.max_pixels
                ),
            ));
        }
        let image = prepare(decoded.rgb, geometry)
            .map_err(|e| fail(FailureKind::Corrupt, format!("{e:#}")))?;
        let meta = RowMeta {
            key: source.key.clone(),
            source_sha256: decoded.source_sha256,
            orig_width: orig_width as i32,
            orig_height: orig_height as i32,
            crop_top: geometry.offset.1,
            crop_left: geometry.offset.0,
            width: image.crop_width as i32,
            height: image.crop_height as i32,
            caption: self.captions.get(&source.key).cloned().or(decoded.caption),
            extra: self.sidecars.values(&source.path),
        };
        Ok((image, meta))
    }
}

/// The writer's loop: runs on the calling thread until every sender is gone.
fn consume(
    writer: &mut ShardWriter,
    rx: Receiver<Message>,
    progress: &Progress,
) -> Result<Duration> {
    let mut busy = Duration::ZERO;
    // Batches from several sessions can arrive out of order; they are written in order.
    let mut waiting: BTreeMap<u64, EncodedBatch> = BTreeMap::new();
    let mut next = 0u64;
    for message in rx {
        let t = Instant::now();
        match message {
            Message::Encoded(seq, batch) => {
                waiting.insert(seq, batch);
                while let Some(batch) = waiting.remove(&next) {
                    writer.write(batch)?;
                    next += 1;
                }
            }
            Message::Failed(failure) => writer.record_failure(&failure)?,
        }
        busy += t.elapsed();
        let totals = writer.totals();
        progress.update(totals.rows, totals.failed());
    }
    Ok(busy)
}

/// A progress bar on a terminal, a plain line every 10 s otherwise (logs, `make`).
struct Progress {
    bar: Option<ProgressBar>,
    start: Instant,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .expect("valid progress template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            start: now,
            last_line: std::cell::Cell::new(now),
        }
    }

    fn update(&self, encoded: usize, failed: usize) {
        let rate = encoded as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let msg = format!("{encoded} encoded, {failed} failed, {rate:.2} images/s");
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None if self.last_line.get().elapsed() >= Duration::from_secs(10) => {
                self.last_line.set(Instant::now());
                eprintln!("progress: {msg}");
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
