//! Encode: owns one ONNX Runtime session. Takes a `Batch`, hands on an `EncodedBatch`: stored
//! latents (the card's normalization applied, the latent mode chosen) and a `Failure` for every
//! image whose latent is not finite.

use anyhow::{bail, Context, Result};
use half::f16;
use ort::value::{TensorElementType, ValueType};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::batch::{Batch, BatchPixels, RowMeta};
use crate::config::LatentMode;
use crate::failure::{Failure, FailureKind};
use crate::format::InputShape;
use crate::model::{EncoderOutput, ModelCard};
use crate::runtime::{self, Gpu, Pixels, Runner};
use crate::temporal::ClipEncoder;

/// diffusers' `DiagonalGaussianDistribution` clamps logvar to this range.
const LOGVAR_RANGE: (f32, f32) = (-30.0, 20.0);

/// Latents of one batch, ready to write.
pub struct EncodedBatch {
    pub width: u32,
    pub height: u32,
    /// Frames per clip window; None for images.
    pub frames: Option<u32>,
    /// `[C, h, w]` of one stored latent, `[C, T', h, w]` for clips.
    pub latent_shape: Vec<usize>,
    pub rows: Vec<RowMeta>,
    /// `rows.len()` × C·h·w stored values.
    pub latents: Vec<f32>,
    /// Scaled std per element, in `dist` mode.
    pub stds: Option<Vec<f32>>,
    /// With `--flip`: the mirrored images' latents (and stds in `dist` mode).
    pub flip_latents: Option<Vec<f32>>,
    pub flip_stds: Option<Vec<f32>>,
    /// Images dropped from this batch (non-finite latents).
    pub failures: Vec<Failure>,
}

impl EncodedBatch {
    pub fn input_shape(&self) -> InputShape {
        InputShape {
            width: self.width,
            height: self.height,
            frames: self.frames,
        }
    }
}

/// One encoder worker: a session (or a card's temporal graphs, for clips) plus what turns its
/// output into stored latents.
pub struct Encoder {
    engine: Engine,
    output_name: String,
    post: Post,
}

/// What runs the encoder: the image graph through a `Runner`, or the temporal VAE's chunk loop.
enum Engine {
    Images(Box<Runner>),
    Clips(ClipEncoder),
}

/// What turns an encoder output into stored latents: shared by the rows of a batch, which are
/// done in parallel.
struct Post {
    card: ModelCard,
    mode: LatentMode,
    seed: u64,
}

/// One row's stored values: latent, std, flipped latent, flipped std.
type RowValues = (
    Vec<f32>,
    Option<Vec<f32>>,
    Option<(Vec<f32>, Option<Vec<f32>>)>,
);

impl Encoder {
    /// Opens the card's encoder with `intra_threads` ONNX Runtime threads and checks that the
    /// ONNX graph agrees with the card (names, element type, channels) before any work.
    pub fn open(
        card: &ModelCard,
        intra_threads: usize,
        mode: LatentMode,
        seed: u64,
    ) -> Result<Self> {
        Self::open_on(card, None, intra_threads, mode, seed)
    }

    /// `open` on the CPU (`gpu` None) or on one CUDA GPU.
    pub fn open_on(
        card: &ModelCard,
        gpu: Option<Gpu>,
        intra_threads: usize,
        mode: LatentMode,
        seed: u64,
    ) -> Result<Self> {
        let mut encoder = Self::connect(card, gpu, intra_threads, mode, seed)?;
        encoder.probe()?;
        Ok(encoder)
    }

    /// `open_on` without the probe run: for `bench-encoder`'s resident measurement, whose
    /// CUDA graph (`cuda_graph=1`) must capture its first run at the timed shape.
    pub fn connect(
        card: &ModelCard,
        gpu: Option<Gpu>,
        intra_threads: usize,
        mode: LatentMode,
        seed: u64,
    ) -> Result<Self> {
        let session =
            runtime::session_on(&card.encoder, intra_threads, gpu).with_context(|| {
                format!(
                    "cannot open encoder {} of model card {}",
                    card.encoder.display(),
                    card.card_path.display()
                )
            })?;
        let at = card.card_path.display();
        let pick = |outlets: &[ort::value::Outlet],
                    wanted: &Option<String>,
                    field: &str,
                    what: &str|
         -> Result<String> {
            let names: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
            match wanted {
                Some(n) if names.contains(&n.as_str()) => Ok(n.clone()),
                Some(n) => bail!("model card {at}: field `{field}` = {n:?}, but the encoder's {what}s are {names:?}"),
                None if names.len() == 1 => Ok(names[0].to_string()),
                None => bail!("model card {at}: the encoder has {what}s {names:?}; set `{field}` to the one to use"),
            }
        };
        let input_name = pick(session.inputs(), &card.input_name, "input_name", "input")?;
        let output_name = pick(
            session.outputs(),
            &card.output_name,
            "output_name",
            "output",
        )?;
        let input = session
            .inputs()
            .iter()
            .find(|o| o.name() == input_name)
            .expect("picked");
        let input_f16 = match input.dtype() {
            ValueType::Tensor { ty: TensorElementType::Float32, .. } => false,
            ValueType::Tensor { ty: TensorElementType::Float16, .. } => true,
            other => bail!("model card {at}: encoder input {input_name:?} is {other:?}; vae-pipeline feeds float32 or float16 NCHW images"),
        };
        if let ValueType::Tensor { shape, .. } = input.dtype() {
            if shape.len() != 4 || (shape[1] != -1 && shape[1] != 3) {
                bail!("model card {at}: encoder input {input_name:?} has shape {:?}; expected [batch, 3, height, width]", &shape[..]);
            }
        }
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == output_name)
            .expect("picked");
        if let ValueType::Tensor { shape, .. } = output.dtype() {
            if shape.len() == 4 && shape[1] != -1 && shape[1] as usize != card.output_channels() {
                bail!(
                    "{}",
                    channel_mismatch(card, &output_name, shape[1] as usize)
                );
            }
        }
        let runner = Runner::new(session, input_name, output_name.clone(), input_f16, gpu)?;
        Ok(Encoder {
            engine: Engine::Images(Box::new(runner)),
            output_name,
            post: Post {
                card: card.clone(),
                mode,
                seed,
            },
        })
    }

    /// The card's temporal encoder, for clip windows (`config.video`): `[B, T, 3, H, W]` in,
    /// `[B, C, T', h, w]` out, one chunk of frames at a time.
    pub fn open_clips(
        card: &ModelCard,
        gpu: Option<Gpu>,
        intra_threads: usize,
        mode: LatentMode,
        seed: u64,
    ) -> Result<Self> {
        let clips = ClipEncoder::open(card, intra_threads, gpu)?;
        Ok(Encoder {
            engine: Engine::Clips(clips),
            output_name: "moments".into(),
            post: Post {
                card: card.clone(),
                mode,
                seed,
            },
        })
    }

    /// Whether the encoder takes float16 (the batcher then writes f16 batches).
    pub fn input_f16(&self) -> bool {
        match &self.engine {
            Engine::Images(runner) => runner.input_f16(),
            Engine::Clips(_) => false,
        }
    }

    /// The image session's runner, for `bench-encoder`'s encoder-only measurement.
    pub fn runner(&mut self) -> Result<&mut Runner> {
        match &mut self.engine {
            Engine::Images(runner) => Ok(runner),
            Engine::Clips(_) => bail!("bench-encoder measures image encoders"),
        }
    }

    /// Runs one small gray image to check output channels and spatial factor when the ONNX
    /// graph leaves them dynamic.
    fn probe(&mut self) -> Result<()> {
        let card = &self.post.card;
        let Engine::Images(runner) = &mut self.engine else {
            return Ok(());
        };
        let side = (card.spatial_factor * 8) as usize;
        let mid = (card.input_range[0] + card.input_range[1]) / 2.0;
        let (f32s, f16s) = (
            vec![mid; 3 * side * side],
            vec![f16::from_f32(mid); 3 * side * side],
        );
        let pixels = if runner.input_f16() {
            Pixels::F16(&f16s)
        } else {
            Pixels::F32(&f32s)
        };
        let shape = runner.run(pixels, [1, 3, side, side], |shape, _| Ok(shape))?;
        let at = card.card_path.display();
        if shape[1] != card.output_channels() {
            bail!("{}", channel_mismatch(card, &self.output_name, shape[1]));
        }
        let expect = side / card.spatial_factor as usize;
        if shape[2] != expect || shape[3] != expect {
            bail!(
                "model card {at}: field `spatial_factor` = {} says a {side}x{side} image gives {expect}x{expect} latents, \
                 but the encoder gave {}x{}",
                card.spatial_factor, shape[3], shape[2]
            );
        }
        Ok(())
    }

    /// Encodes `batch` and applies the latent mode and the card's normalization, the rows in
    /// parallel on the rayon pool straight from the bound output.
    pub fn encode(&mut self, mut batch: Batch) -> Result<EncodedBatch> {
        let n = batch.len();
        let images = if batch.flipped { 2 * n } else { n };
        let flipped = batch.flipped;
        let rows = std::mem::take(&mut batch.rows);
        let shape = [images, 3, batch.height as usize, batch.width as usize];
        let Encoder {
            engine,
            output_name,
            post,
        } = self;
        let card = &post.card;
        let runner = match engine {
            Engine::Images(runner) => runner,
            Engine::Clips(clips) => return post.clips(clips, batch, rows),
        };
        let (shape, done) = runner.run(batch.pixels.view(), shape, |shape, raw| {
            if shape[1] != card.output_channels() {
                bail!("{}", channel_mismatch(card, output_name, shape[1]));
            }
            let per_output = shape[1] * shape[2] * shape[3];
            let hw = (shape[2], shape[3]);
            let done = each_row(&rows, flipped, |at, key| {
                let output = raw.f32_range(at * per_output..(at + 1) * per_output);
                post.patchify(post.store(&output, key), hw)
            });
            Ok((shape, done))
        })?;
        let latent_shape = match &card.batch_norm {
            Some(bn) => {
                let p = bn.patch_size;
                if shape[2] % p != 0 || shape[3] % p != 0 {
                    bail!(
                        "model card {}: {}x{} latents cannot be patchified {p}x{p}; use image sides \
                         that are multiples of {}",
                        card.card_path.display(),
                        shape[3],
                        shape[2],
                        card.spatial_factor as usize * p
                    );
                }
                vec![card.latent_channels * p * p, shape[2] / p, shape[3] / p]
            }
            None => vec![card.latent_channels, shape[2], shape[3]],
        };
        Ok(post.assemble(&batch, latent_shape, rows, done))
    }
}

impl Post {
    /// A batch of clip windows through the temporal encoder, then each row's latent as for
    /// images (the latent mode, the card's per-channel normalization over [C, T'·h·w]).
    fn clips(
        &self,
        clips: &mut ClipEncoder,
        batch: Batch,
        rows: Vec<RowMeta>,
    ) -> Result<EncodedBatch> {
        let card = &self.card;
        let BatchPixels::F32(pixels) = &batch.pixels else {
            bail!("clip batches are float32");
        };
        let t = batch.frames.unwrap_or(1) as usize;
        let (h, w) = (batch.height as usize, batch.width as usize);
        let count = if batch.flipped {
            2 * rows.len()
        } else {
            rows.len()
        };
        let output = clips.encode(pixels, count, t, h, w)?;
        let factor = card.spatial_factor as usize;
        let latent_shape = vec![
            card.latent_channels,
            1 + (t - 1) / card.temporal.as_ref().map_or(1, |tc| tc.frame_factor),
            h / factor,
            w / factor,
        ];
        let per_output = output.len() / count.max(1);
        if per_output != card.output_channels() * latent_shape[1..].iter().product::<usize>() {
            bail!(
                "model card {}: {t} frames of {w}x{h} gave {per_output} values per clip, not {} × {:?}",
                card.card_path.display(),
                card.output_channels(),
                &latent_shape[1..]
            );
        }
        let done = each_row(&rows, batch.flipped, |at, key| {
            self.store(&output[at * per_output..(at + 1) * per_output], key)
        });
        Ok(self.assemble(&batch, latent_shape, rows, done))
    }

    /// The batch's stored latents, rows with NaN or Inf anywhere dropped as `nonfinite`.
    fn assemble(
        &self,
        batch: &Batch,
        latent_shape: Vec<usize>,
        rows: Vec<RowMeta>,
        done: Vec<RowValues>,
    ) -> EncodedBatch {
        let (card, n, flipped) = (&self.card, rows.len(), batch.flipped);
        let per_latent = latent_shape.iter().product::<usize>();
        let dist = card.output == EncoderOutput::Moments && self.mode == LatentMode::Dist;
        let with_std = |on: bool| (on && dist).then(|| Vec::with_capacity(n * per_latent));
        let mut out = EncodedBatch {
            width: batch.width,
            height: batch.height,
            frames: batch.frames,
            latent_shape,
            rows: Vec::with_capacity(n),
            latents: Vec::with_capacity(n * per_latent),
            stds: with_std(true),
            flip_latents: flipped.then(|| Vec::with_capacity(n * per_latent)),
            flip_stds: with_std(flipped),
            failures: Vec::new(),
        };
        for (row, (latent, std, flip)) in rows.into_iter().zip(done) {
            let values = [
                Some(&latent),
                std.as_ref(),
                flip.as_ref().map(|f| &f.0),
                flip.as_ref().and_then(|f| f.1.as_ref()),
            ];
            if values
                .iter()
                .flatten()
                .all(|v| v.iter().all(|x| x.is_finite()))
            {
                out.latents.extend(latent);
                out.stds
                    .iter_mut()
                    .zip(std)
                    .for_each(|(all, s)| all.extend(s));
                if let Some((fl, fs)) = flip {
                    out.flip_latents.iter_mut().for_each(|all| all.extend(&fl));
                    out.flip_stds
                        .iter_mut()
                        .zip(fs)
                        .for_each(|(all, s)| all.extend(s));
                }
                out.rows.push(row);
            } else {
                out.failures.push(Failure::new(
                    row.key,
                    FailureKind::Nonfinite,
                    format!("encoder {} produced NaN or Inf (fp16 overflow?)", card.name),
                ));
            }
        }
        out
    }
}

impl Post {
    /// One image's encoder output → its stored latent (latent mode and normalization applied)
    /// and, in `dist` mode, its scaled std. `noise_key` seeds `sample` mode's noise.
    fn store(&self, output: &[f32], noise_key: &str) -> (Vec<f32>, Option<Vec<f32>>) {
        let (scale, shift) = (self.card.scaling_factor, self.card.shift_factor);
        let per_channel = self.card.per_channel();
        let normalize = |mut z: Vec<f32>| {
            if let Some(stats) = per_channel {
                stats.normalize(&mut z, true);
            }
            z.iter_mut().for_each(|v| *v = (*v - shift) * scale);
            z
        };
        if self.card.output == EncoderOutput::Latent {
            return (normalize(output.to_vec()), None);
        }
        let (mean, logvar) = output.split_at(output.len() / 2);
        let std = logvar
            .iter()
            .map(|&lv| (0.5 * lv.clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)).exp());
        match self.mode {
            LatentMode::Mean => (normalize(mean.to_vec()), None),
            LatentMode::Dist => {
                let mut std: Vec<f32> = std.collect();
                if let Some(stats) = per_channel {
                    stats.normalize(&mut std, false);
                }
                std.iter_mut().for_each(|s| *s *= scale.abs());
                (normalize(mean.to_vec()), Some(std))
            }
            LatentMode::Sample => {
                let mut rng = key_rng(self.seed, noise_key);
                let sampled = mean
                    .iter()
                    .zip(std)
                    .map(|(&m, s)| {
                        let eps: f32 = StandardNormal.sample(&mut rng);
                        m + s * eps
                    })
                    .collect();
                (normalize(sampled), None)
            }
        }
    }
}

impl Post {
    /// FLUX.2's normalization (card `[batch_norm]`), after `store`: 2×2 patchify of one
    /// [C, h, w] latent (and its std), then (z − mean) / sqrt(var + eps) per patchified channel;
    /// a std only scales, by the same 1 / sqrt(var + eps). No-op for other cards.
    fn patchify(
        &self,
        (latent, std): (Vec<f32>, Option<Vec<f32>>),
        (h, w): (usize, usize),
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let Some(bn) = &self.card.batch_norm else {
            return (latent, std);
        };
        let p = bn.patch_size;
        let (ph, pw) = (h / p, w / p);
        let inv_std: Vec<f32> = bn
            .running_var
            .iter()
            .map(|v| 1.0 / (v + bn.eps).sqrt())
            .collect();
        let rearrange = |values: &[f32], center: bool| {
            let mut out = vec![0.0; values.len()];
            for c in 0..values.len() / (h * w) {
                for dy in 0..p {
                    for dx in 0..p {
                        let k = (c * p + dy) * p + dx;
                        let mean = if center { bn.running_mean[k] } else { 0.0 };
                        for i in 0..ph {
                            let src = c * h * w + (i * p + dy) * w + dx;
                            let dst = (k * ph + i) * pw;
                            for j in 0..pw {
                                out[dst + j] = (values[src + j * p] - mean) * inv_std[k];
                            }
                        }
                    }
                }
            }
            out
        };
        (rearrange(&latent, true), std.map(|s| rearrange(&s, false)))
    }
}

/// Each row's stored values, the rows in parallel: `one(at, noise key)` turns encoder output
/// `at` into a latent (and std); with `flipped`, a row's mirror image is the output after it.
fn each_row(
    rows: &[RowMeta],
    flipped: bool,
    one: impl Fn(usize, &str) -> (Vec<f32>, Option<Vec<f32>>) + Sync,
) -> Vec<RowValues> {
    (0..rows.len())
        .into_par_iter()
        .map(|i| {
            let at = if flipped { 2 * i } else { i };
            let (latent, std) = one(at, &rows[i].key);
            let flip = flipped.then(|| one(at + 1, &format!("{}#flip", rows[i].key)));
            (latent, std, flip)
        })
        .collect()
}

/// The RNG for `sample` mode: one stream per (seed, key), so a rerun or a different batch
/// split draws the same noise for the same image.
fn key_rng(seed: u64, key: &str) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(key.as_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

fn channel_mismatch(card: &ModelCard, output: &str, got: usize) -> String {
    let kind = match card.output {
        EncoderOutput::Latent => "output = \"latent\"",
        EncoderOutput::Moments => "output = \"moments\" (mean ‖ logvar)",
    };
    format!(
        "model card {}: field `latent_channels` = {} with {kind} expects {} output channels, \
         but encoder output {output:?} has {got}",
        card.card_path.display(),
        card.latent_channels,
        card.output_channels()
    )
}
