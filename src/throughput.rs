//! Encoder throughput (`vae-pipeline bench-encoder`) on synthetic batches, with no files,
//! decoding or writing, measured twice: the encoder alone with its input resident on the device
//! (the number a framework peer reports), and the host path (batcher, copies, latents back) that
//! `precompute` pays on top. The host number is the ceiling an end-to-end run is measured
//! against; the gap between the two is what the host path costs.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::batch::{Batch, Batcher, RowMeta, RowPixels};
use crate::config::LatentMode;
use crate::encode::Encoder;
use crate::model::ModelCard;
use crate::resize::Prepared;
use crate::runtime::Device;

/// What `bench-encoder` prints, as one JSON line. Two measurements of the same sessions:
/// `encoder_*` is the encoder alone (one batch resident on the device, bound once, its output
/// left there: what a PyTorch peer times); `seconds` and `images_per_second` the encode stage
/// as `precompute` runs it (batches written by the batcher, copied in, latents copied out and
/// normalized).
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub model: String,
    pub device: String,
    pub sessions: usize,
    pub threads: usize,
    pub size: u32,
    pub batch_size: usize,
    /// The encoder's input type: "float16" or "float32".
    pub input: &'static str,
    /// Images through the host path.
    pub images: usize,
    /// Images of the resident measurement: whole batches, the same number per session.
    pub encoder_images: usize,
    pub encoder_seconds: f64,
    pub encoder_images_per_second: f64,
    /// The host path; None with `cuda_graph=1`, which only the resident measurement can use.
    pub seconds: Option<f64>,
    pub images_per_second: Option<f64>,
}

/// Encodes `images` synthetic `size`² images in batches of `batch_size` on every session of
/// `device` (all running at once), first resident, then through the host path, each after one
/// untimed warm-up batch per session.
pub fn encoder_throughput(
    card: &ModelCard,
    device: &Device,
    threads: usize,
    size: u32,
    batch_size: usize,
    images: usize,
) -> Result<Throughput> {
    if batch_size == 0 || images == 0 {
        bail!("--batch-size and --images must be at least 1");
    }
    card.check_size(size)?;
    let placements = device.placements();
    let cuda_graph = placements.iter().flatten().any(|g| g.options.cuda_graph);
    let mut encoders = placements
        .into_iter()
        .map(|gpu| Encoder::connect(card, gpu, threads, LatentMode::Mean, 0))
        .collect::<Result<Vec<_>>>()?;
    let input_f16 = encoders[0].input_f16();
    let template = synthetic_batch(size, batch_size, card.input_range, input_f16);
    let shape = [batch_size, 3, size as usize, size as usize];
    // Whole batches, split evenly over the sessions.
    let runs = images.div_ceil(batch_size).div_ceil(encoders.len());
    let encoded = runs * encoders.len() * batch_size;
    // Sessions run at once; each times its own runs after its upload and warm-up, and the
    // slowest one's time is the measurement.
    let encoder_seconds = std::thread::scope(|scope| -> Result<f64> {
        let workers: Vec<_> = encoders
            .iter_mut()
            .map(|encoder| {
                let pixels = template.pixels.view();
                scope.spawn(move || encoder.runner()?.resident(pixels, shape, 1, runs))
            })
            .collect();
        let mut slowest = 0.0f64;
        for worker in workers {
            let took = worker.join().expect("encoder thread panicked")?;
            slowest = slowest.max(took.as_secs_f64());
        }
        Ok(slowest)
    })?;
    let host_seconds = if cuda_graph {
        None
    } else {
        Some(host_path(
            &mut encoders,
            card,
            size,
            batch_size,
            images,
            input_f16,
        )?)
    };
    Ok(Throughput {
        model: card.name.clone(),
        device: device.to_string(),
        sessions: encoders.len(),
        threads,
        size,
        batch_size,
        input: if input_f16 { "float16" } else { "float32" },
        images,
        encoder_images: encoded,
        encoder_seconds,
        encoder_images_per_second: encoded as f64 / encoder_seconds.max(1e-9),
        seconds: host_seconds,
        images_per_second: host_seconds.map(|s| images as f64 / s.max(1e-9)),
    })
}

/// `images` images through the encode stage as `precompute` runs it: one producer writes
/// batches with the real `Batcher` (its images in parallel), every session takes them from one
/// queue and hands back stored latents.
fn host_path(
    encoders: &mut [Encoder],
    card: &ModelCard,
    size: u32,
    batch_size: usize,
    images: usize,
    input_f16: bool,
) -> Result<f64> {
    let batch = |n: usize| synthetic_batch(size, n, card.input_range, input_f16);
    for encoder in encoders.iter_mut() {
        encoder.encode(batch(batch_size))?;
    }
    let batches: Vec<usize> = (0..images)
        .step_by(batch_size)
        .map(|start| batch_size.min(images - start))
        .collect();
    let (tx, rx) = crossbeam_channel::bounded::<Batch>(2 * encoders.len());
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = encoders
            .iter_mut()
            .map(|encoder| {
                let rx = rx.clone();
                scope.spawn(move || -> Result<()> {
                    for batch in rx {
                        encoder.encode(batch)?;
                    }
                    Ok(())
                })
            })
            .collect();
        drop(rx);
        for &n in &batches {
            if tx.send(batch(n)).is_err() {
                break;
            }
        }
        drop(tx);
        for worker in workers {
            worker.join().expect("encoder thread panicked")?;
        }
        Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// `n` copies of a smooth RGB test pattern as one batch, built by the real `Batcher`.
fn synthetic_batch(size: u32, n: usize, range: [f32; 2], f16: bool) -> Batch {
    let side = size as usize;
    let pixels: Vec<u8> = (0..side * side * 3)
        .map(|i| {
            let (y, x, c) = (i / (3 * side), (i / 3) % side, i % 3);
            ((x * 255 / side + y * 127 / side + c * 60) % 256) as u8
        })
        .collect();
    let image = || Prepared {
        pixels: pixels.clone(),
        width: size,
        height: size,
        crop_left: 0,
        crop_top: 0,
        crop_width: size,
        crop_height: size,
    };
    let mut batcher = Batcher::new(n, range).with_f16(f16);
    let mut done = None;
    for i in 0..n {
        let meta = RowMeta {
            key: format!("synthetic-{i}"),
            source_sha256: [0; 32],
            orig_width: size as i32,
            orig_height: size as i32,
            crop_top: 0,
            crop_left: 0,
            width: size as i32,
            height: size as i32,
            caption: None,
            extra: Vec::new(),
            window: None,
        };
        done = batcher.push(RowPixels::Image(image()), meta);
    }
    done.expect("n images fill a batch of n")
}
