//! Encoder-only throughput (`vae-pipeline bench-encoder`): the encode stage alone on
//! synthetic batches, with no files, decoding or writing. It is the ceiling an end-to-end run
//! is measured against: a pipeline that keeps the encoder busy runs within a few percent of it.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::batch::{Batch, Batcher, RowMeta};
use crate::config::LatentMode;
use crate::encode::Encoder;
use crate::model::ModelCard;
use crate::resize::Prepared;
use crate::runtime::Device;

/// What `bench-encoder` prints, as one JSON line.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub model: String,
    pub device: String,
    pub sessions: usize,
    pub threads: usize,
    pub size: u32,
    pub batch_size: usize,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Encodes `images` synthetic `size`² images in batches of `batch_size` on every session of
/// `device` (one per GPU, fed from one queue), after one untimed warm-up batch per session.
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
    let mut encoders = device
        .placements()
        .into_iter()
        .map(|gpu| Encoder::open_on(card, gpu, threads, LatentMode::Mean, 0))
        .collect::<Result<Vec<_>>>()?;
    let batch = |n: usize| synthetic_batch(size, n, card.input_range);
    for encoder in &mut encoders {
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
    let seconds = start.elapsed().as_secs_f64();
    Ok(Throughput {
        model: card.name.clone(),
        device: device.to_string(),
        sessions: encoders.len(),
        threads,
        size,
        batch_size,
        images,
        seconds,
        images_per_second: images as f64 / seconds.max(1e-9),
    })
}

/// `n` copies of a smooth RGB test pattern as one batch, built by the real `Batcher`.
fn synthetic_batch(size: u32, n: usize, range: [f32; 2]) -> Batch {
    let side = size as usize;
    let pixels: Vec<u8> = (0..side * side * 3)
        .map(|i| {
            let (y, x, c) = (i / (3 * side), (i / 3) % side, i % 3);
            ((x * 255 / side + y * 127 / side + c * 60) % 256) as u8
        })
        .collect();
    let image = Prepared {
        pixels,
        width: size,
        height: size,
        crop_left: 0,
        crop_top: 0,
        crop_width: size,
        crop_height: size,
    };
    let mut batcher = Batcher::new(n, range);
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
        };
        done = batcher.push(&image, meta);
    }
    done.expect("n images fill a batch of n")
}
