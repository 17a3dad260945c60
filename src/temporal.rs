//! Clips through the Wan-family VAEs, exactly as diffusers' `AutoencoderKLWan._encode` /
//! `_decode`: the card's `[temporal]` graphs (`export::wan_clip`) run chunk by chunk, the first
//! frame alone, then `frame_factor` frames at a time (the decoder: one latent frame at a time),
//! each chunk's carried frames handed from its outputs to the next chunk's inputs. Memory holds
//! one chunk and the carried frames, whatever the clip's length. Takes a `ModelCard` with a
//! `[temporal]` table, hands on the encoder output [B, C_out, T', h, w] or decoded frames
//! [B, T, 3, H, W].

use std::borrow::Cow;
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::{f16, slice::HalfFloatSliceExt};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};

use crate::model::{ModelCard, TemporalCard};
use crate::runtime::{self, Gpu};

/// The card's `[temporal]` table, or an error that says how to get one.
fn temporal(card: &ModelCard) -> Result<&TemporalCard> {
    card.temporal.as_ref().with_context(|| {
        format!(
            "model card {} has no [temporal] table: it does not encode clips. Export a Wan-family \
             VAE (Wan 2.1, Wan 2.2, Qwen-Image) with `vae-pipeline export`, which writes the clip \
             graphs and the table",
            card.card_path.display()
        )
    })
}

/// A first-chunk and a later-chunk graph, and the carried frames between them.
struct Chunks {
    first: Session,
    later: Session,
    input: &'static str,
    output: &'static str,
    input_f16: bool,
    /// How many carried tensors the graphs pass on.
    carried: usize,
}

impl Chunks {
    fn open(
        card: &ModelCard,
        (first, later): (&Path, &Path),
        (input, output): (&'static str, &'static str),
        intra_threads: usize,
        gpu: Option<Gpu>,
    ) -> Result<Self> {
        let open = |path: &Path| {
            if !path.is_file() {
                bail!(
                    "model card {}: [temporal] names {}, which does not exist; re-run \
                     `vae-pipeline export` for this VAE (it writes the clip graphs beside encoder.onnx)",
                    card.card_path.display(),
                    path.display()
                );
            }
            runtime::session_on(path, intra_threads, gpu)
                .with_context(|| format!("cannot open clip graph {}", path.display()))
        };
        let (first, later) = (open(first)?, open(later)?);
        let carried = first.outputs().len() - 1;
        if later.inputs().len() != carried + 1 || later.outputs().len() != carried + 1 {
            bail!(
                "model card {}: the [temporal] graphs do not go together (the first chunk hands on \
                 {carried} carried tensors, the later chunk takes {}); re-run `vae-pipeline export`",
                card.card_path.display(),
                later.inputs().len().saturating_sub(1)
            );
        }
        let input_f16 = match first.inputs().iter().find(|o| o.name() == input) {
            Some(o) => matches!(
                o.dtype(),
                ValueType::Tensor {
                    ty: TensorElementType::Float16,
                    ..
                }
            ),
            None => bail!(
                "model card {}: the clip graph has no input {input:?}; re-run `vae-pipeline export`",
                card.card_path.display()
            ),
        };
        Ok(Chunks {
            first,
            later,
            input,
            output,
            input_f16,
            carried,
        })
    }

    /// Runs one chunk (`data` of `shape`): the first when `carried` is empty, which then holds
    /// the frames to carry on. Returns the output's dims and values.
    fn run(
        &mut self,
        carried: &mut Vec<DynValue>,
        data: &[f32],
        shape: [usize; 5],
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let input: SessionInputValue = if self.input_f16 {
            let mut half = vec![f16::ZERO; data.len()];
            half.convert_from_f32_slice(data);
            Tensor::from_array((shape, half))?.into_dyn().into()
        } else {
            TensorRef::from_array_view((shape, data))?.into_dyn().into()
        };
        let session = if carried.is_empty() {
            &mut self.first
        } else {
            &mut self.later
        };
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![(self.input.into(), input)];
        for (i, value) in carried.drain(..).enumerate() {
            inputs.push((format!("cache_{i}").into(), value.into()));
        }
        let mut outputs = session.run(inputs)?;
        for i in 0..self.carried {
            let name = format!("new_cache_{i}");
            carried.push(
                outputs
                    .remove(&name)
                    .with_context(|| format!("clip graph output {name} is missing"))?,
            );
        }
        let value = &outputs[self.output];
        let (dims, values) = match value.try_extract_tensor::<f32>() {
            Ok((s, v)) => (s.to_vec(), v.to_vec()),
            Err(_) => {
                let (s, v) = value.try_extract_tensor::<f16>().with_context(|| {
                    format!(
                        "clip graph output {:?} is neither float32 nor float16",
                        self.output
                    )
                })?;
                (s.to_vec(), v.iter().map(|x| x.to_f32()).collect())
            }
        };
        Ok((dims.iter().map(|&d| d as usize).collect(), values))
    }
}

/// A card's temporal encoder: clips to `encode(x).latent_dist.parameters`.
pub struct ClipEncoder {
    chunks: Chunks,
    frame_factor: usize,
}

impl ClipEncoder {
    /// The card's temporal encoder graphs on the CPU (`gpu` None) or one CUDA GPU, as
    /// `runtime::session_on` opens every session.
    pub fn open(card: &ModelCard, intra_threads: usize, gpu: Option<Gpu>) -> Result<Self> {
        let t = temporal(card)?;
        Ok(ClipEncoder {
            chunks: Chunks::open(
                card,
                (&t.encoder_first, &t.encoder_chunk),
                ("frames", "moments"),
                intra_threads,
                gpu,
            )?,
            frame_factor: t.frame_factor,
        })
    }

    /// `frames`: [B, T, 3, H, W] f32 in the card's `input_range` (frame-major: one frame's CHW
    /// is contiguous), T = 1 + 4k. Returns the encoder output [B, C_out, T', h, w] (C_out = 2·C
    /// for `moments`), T' = 1 + (T − 1)/4, exactly diffusers' `encode(x).latent_dist.parameters`.
    pub fn encode(
        &mut self,
        frames: &[f32],
        b: usize,
        t: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        let f = self.frame_factor;
        if t == 0 || !(t - 1).is_multiple_of(f) {
            bail!(
                "a clip of {t} frames: the temporal encoder takes 1 + {f}k frames (1, {}, {}, …)",
                1 + f,
                1 + 2 * f
            );
        }
        let frame = 3 * h * w;
        if frames.len() != b * t * frame {
            bail!(
                "{} values for a clip of [{b}, {t}, 3, {h}, {w}] ({} expected)",
                frames.len(),
                b * t * frame
            );
        }
        let t_latent = 1 + (t - 1) / f;
        let mut stream = self.stream();
        let mut out = Vec::new();
        let mut chunk = Vec::new();
        for i in 0..t_latent {
            let (start, n) = if i == 0 { (0, 1) } else { (1 + f * (i - 1), f) };
            // One chunk of every clip in the batch; for B = 1 a single slice.
            let data: &[f32] = if b == 1 {
                &frames[start * frame..(start + n) * frame]
            } else {
                chunk.clear();
                for clip in frames.chunks_exact(t * frame) {
                    chunk.extend_from_slice(&clip[start * frame..(start + n) * frame]);
                }
                &chunk
            };
            let values = stream.push(data, b, n, h, w)?;
            if i == 0 {
                out = vec![0.0; values.len() * t_latent];
            }
            // values [B, C, 1, h, w] → out[b, c, i].
            let plane = stream.latent_plane;
            for (k, src) in values.chunks_exact(plane).enumerate() {
                let at = (k * t_latent + i) * plane;
                out[at..at + plane].copy_from_slice(src);
            }
        }
        Ok(out)
    }

    /// One clip chunk by chunk, for callers that decode frames as they go: memory then holds
    /// one chunk, never the clip.
    pub fn stream(&mut self) -> ClipStream<'_> {
        ClipStream {
            encoder: self,
            carried: Vec::new(),
            latent_plane: 0,
        }
    }
}

/// A clip being encoded: the carried frames between chunks.
pub struct ClipStream<'a> {
    encoder: &'a mut ClipEncoder,
    carried: Vec<DynValue>,
    /// h·w of the latent, known after the first chunk.
    latent_plane: usize,
}

impl ClipStream<'_> {
    /// The next chunk, [B, n, 3, H, W] frame-major: n = 1 for the first, then `frame_factor`.
    /// Returns its latent frame of the encoder output, [B, C_out, 1, h, w].
    pub fn push(
        &mut self,
        frames: &[f32],
        b: usize,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        let wanted = if self.carried.is_empty() {
            1
        } else {
            self.encoder.frame_factor
        };
        if n != wanted || frames.len() != b * n * 3 * h * w {
            bail!(
                "a clip chunk of {} values as [{b}, {n}, 3, {h}, {w}]: the temporal encoder takes \
                 the first frame alone, then chunks of {} frames",
                frames.len(),
                self.encoder.frame_factor
            );
        }
        let (dims, values) = self
            .encoder
            .chunks
            .run(&mut self.carried, frames, [b, n, 3, h, w])?;
        if dims.len() != 5 || dims[0] != b || dims[2] != 1 {
            bail!("clip encoder output has shape {dims:?}; expected [{b}, C, 1, h, w]");
        }
        self.latent_plane = dims[3] * dims[4];
        Ok(values)
    }
}

/// A card's temporal decoder: raw latents to frames, as diffusers' `decode(z).sample`.
pub struct ClipDecoder {
    chunks: Chunks,
    frame_factor: usize,
}

impl ClipDecoder {
    pub fn open(card: &ModelCard, intra_threads: usize, gpu: Option<Gpu>) -> Result<Self> {
        let t = temporal(card)?;
        let (Some(first), Some(later)) = (&t.decoder_first, &t.decoder_chunk) else {
            bail!(
                "model card {}: [temporal] has no decoder_first / decoder_chunk; re-run \
                 `vae-pipeline export` for this VAE",
                card.card_path.display()
            );
        };
        Ok(ClipDecoder {
            chunks: Chunks::open(
                card,
                (first, later),
                ("latent", "frames"),
                intra_threads,
                gpu,
            )?,
            frame_factor: t.frame_factor,
        })
    }

    /// `z`: raw (un-normalized) latent [B, C, T', h, w] → frames [B, T, 3, H, W] as diffusers'
    /// `decode(z).sample` (clamped to [-1, 1] as diffusers does), T = 1 + 4(T' − 1).
    pub fn decode(
        &mut self,
        z: &[f32],
        b: usize,
        t_latent: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        let plane = h * w;
        if t_latent == 0 || b == 0 || !z.len().is_multiple_of(b * t_latent * plane) {
            bail!(
                "{} values are not a latent of [{b}, C, {t_latent}, {h}, {w}]",
                z.len()
            );
        }
        let c = z.len() / (b * t_latent * plane);
        let f = self.frame_factor;
        let t = 1 + f * (t_latent - 1);
        let mut stream = self.stream();
        let mut out = Vec::new();
        let mut chunk = Vec::with_capacity(b * c * plane);
        for i in 0..t_latent {
            chunk.clear();
            // Latent frame i of every channel: [B, C, 1, h, w].
            for src in z.chunks_exact(t_latent * plane) {
                chunk.extend_from_slice(&src[i * plane..(i + 1) * plane]);
            }
            let (n, values) = stream.push(&chunk, b, c, h, w)?;
            let frame = values.len() / (b * n);
            if i == 0 {
                out = vec![0.0; b * t * frame];
            }
            let start = if i == 0 { 0 } else { 1 + f * (i - 1) };
            for (k, src) in values.chunks_exact(n * frame).enumerate() {
                let at = (k * t + start) * frame;
                out[at..at + n * frame].copy_from_slice(src);
            }
        }
        Ok(out)
    }

    /// One latent clip frame by frame, for callers that consume frames as they come (memory
    /// holds one chunk of frames, never the clip).
    pub fn stream(&mut self) -> DecodeStream<'_> {
        DecodeStream {
            decoder: self,
            carried: Vec::new(),
        }
    }
}

/// A latent clip being decoded: the carried frames between latent frames.
pub struct DecodeStream<'a> {
    decoder: &'a mut ClipDecoder,
    carried: Vec<DynValue>,
}

impl DecodeStream<'_> {
    /// The next raw latent frame [B, C, 1, h, w]; returns how many frames it decodes to (1 for
    /// the first, then `frame_factor`) and those frames, [B, n, 3, H, W].
    pub fn push(
        &mut self,
        z: &[f32],
        b: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<(usize, Vec<f32>)> {
        if z.len() != b * c * h * w {
            bail!(
                "{} values are not a latent frame of [{b}, {c}, 1, {h}, {w}]",
                z.len()
            );
        }
        let n = if self.carried.is_empty() {
            1
        } else {
            self.decoder.frame_factor
        };
        let (dims, values) = self
            .decoder
            .chunks
            .run(&mut self.carried, z, [b, c, 1, h, w])?;
        if dims.len() != 5 || dims[0] != b || dims[1] != n || dims[2] != 3 {
            bail!("clip decoder output has shape {dims:?}; expected [{b}, {n}, 3, H, W]");
        }
        Ok((n, values))
    }
}
