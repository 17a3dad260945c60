//! The Wan-family VAEs on clips: diffusers' `AutoencoderKLWan._encode` / `_decode` as four
//! graphs (first chunk and later chunk, each direction) that `crate::temporal` loops over.
//!
//! diffusers encodes the first frame alone, then chunks of 4 frames, and decodes one latent
//! frame at a time. Every causal 3-D convolution with a temporal kernel of 3 carries frames
//! across chunks (`feat_cache`, `CACHE_T` = 2); its rules (an empty cache means zero padding, a
//! one-frame cache gets the previous cache's last frame prepended) amount to one: the conv sees
//! the last 2 frames of everything it was fed before, zeros before the first. So here each
//! such conv puts its carried frames in front of the chunk (2 zero frames on the first chunk)
//! and hands on the last 2 frames of that concatenation. The resamplers keep their own rules:
//! `downsample3d` skips its stride-2 `time_conv` on the first chunk and carries the last
//! spatially downsampled frame; `upsample3d` skips its `time_conv` on the first chunk ("Rep")
//! and starts from zero frames on the second. Attention and the spatial resamplers run per
//! frame as in diffusers (frames folded into the batch); `AvgDown3D` pads time in front to its
//! factor and `DupUp3D` drops its first `factor_t − 1` frames on the first chunk.
//!
//! First-chunk graphs take no carried frames and return them as `new_cache_{i}`; later-chunk
//! graphs take them as `cache_{i}` ([batch, C, frames, h, w], the same order) and return the
//! new ones. Encoders take `frames` [batch, T, 3, H, W] (frame-major, so a chunk of a clip is a
//! contiguous slice) and return `moments` [batch, 2·z_dim, 1, h, w]; decoders take `latent`
//! [batch, z_dim, 1, h, w] and return `frames` [batch, T, 3, H, W], clamped to [-1, 1].

use anyhow::{bail, Result};

use super::checkpoint::Weights;
use super::graph::{int, ints, Dim, ExportDType, Graph};
use super::onnx_pb::ModelProto;
use super::ops::{Builder, PatchOrder};
use super::wan::WanConfig;

/// Frames per chunk after the first: the VAE's temporal factor.
pub const FRAME_FACTOR: usize = 4;

/// The graph files `export` writes beside `encoder.onnx`, and the card keys that name them.
pub const FILES: [&str; 4] = [
    "encoder_first.onnx",
    "encoder_chunk.onnx",
    "decoder_first.onnx",
    "decoder_chunk.onnx",
];

/// Which chunk a graph runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// The first frame (encoder) or latent frame (decoder): no carried frames in.
    First,
    /// Every later chunk: the previous chunk's carried frames in.
    Later,
}

/// The four temporal graphs of a checkpoint, in [`FILES`] order. Each pair of one chunk kind
/// takes every tensor of its own copy of the weights (checked), as the image graphs do.
pub fn graphs(
    config: &WanConfig,
    weights: &Weights,
    dtype: ExportDType,
) -> Result<Vec<ModelProto>> {
    let mut first = weights.clone();
    let encoder_first = encoder(config, &mut first, dtype, Chunk::First)?;
    let decoder_first = decoder(config, &mut first, dtype, Chunk::First)?;
    first.finish()?;
    let mut later = weights.clone();
    let encoder_chunk = encoder(config, &mut later, dtype, Chunk::Later)?;
    let decoder_chunk = decoder(config, &mut later, dtype, Chunk::Later)?;
    later.finish()?;
    Ok(vec![
        encoder_first,
        encoder_chunk,
        decoder_first,
        decoder_chunk,
    ])
}

/// Frames a causal conv carries: its temporal kernel minus one (diffusers' `CACHE_T`).
const CARRIED: usize = 2;

/// One carried tensor: the value handed on, its channels and frames.
struct Carried {
    value: String,
    channels: usize,
    frames: usize,
}

/// A temporal graph under construction.
struct Clip<'a> {
    b: Builder<'a>,
    chunk: Chunk,
    carried: Vec<Carried>,
}

fn cache_input(i: usize) -> String {
    format!("cache_{i}")
}

fn cache_output(i: usize) -> String {
    format!("new_cache_{i}")
}

impl<'a> Clip<'a> {
    fn new(w: &'a mut Weights, dtype: ExportDType, chunk: Chunk) -> Self {
        Clip {
            b: Builder {
                g: Graph::new(dtype),
                w,
                groups: 0,
            },
            chunk,
            carried: Vec::new(),
        }
    }

    fn first(&self) -> bool {
        self.chunk == Chunk::First
    }

    /// `x[start:]` along `axis` (`start` negative: from the end).
    fn tail(&mut self, x: &str, axis: i64, start: i64) -> String {
        let starts = self.b.g.ints(&[start]);
        let ends = self.b.g.ints(&[i64::MAX]);
        let axes = self.b.g.ints(&[axis]);
        self.b.g.node("Slice", &[x, &starts, &ends, &axes], vec![])
    }

    /// `x` reshaped to `lead` followed by the dims of `like` from index `from` on (the dynamic
    /// height and width).
    fn reshape(&mut self, x: &str, lead: &[i64], like: &str, from: i64) -> String {
        let shape = self.b.g.node("Shape", &[like], vec![]);
        let rest = self.tail(&shape, 0, from);
        let lead = self.b.g.ints(lead);
        let full = self
            .b
            .g
            .node("Concat", &[&lead, &rest], vec![int("axis", 0)]);
        self.b.g.node("Reshape", &[x, &full], vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.b.g.node("Transpose", &[x], vec![ints("perm", perm)])
    }

    /// [B, C, T, H, W] → [B·T, C, H, W], frames folded into the batch.
    fn fold_frames(&mut self, x: &str, c: usize) -> String {
        let t = self.transpose(x, &[0, 2, 1, 3, 4]);
        self.reshape(&t, &[-1, c as i64], x, 3)
    }

    /// [B·T, C, H, W] → [B, C, T, H, W].
    fn unfold_frames(&mut self, x: &str, t: usize, c: usize) -> String {
        let y = self.reshape(x, &[-1, t as i64, c as i64], x, 2);
        self.transpose(&y, &[0, 2, 1, 3, 4])
    }

    /// The chunk `x` with this conv's `frames` carried frames in front (zeros on the first
    /// chunk); the last `frames` of the result are carried on.
    fn with_carried(&mut self, x: &str, c: usize, frames: usize) -> String {
        let i = self.carried.len();
        let joined = match self.chunk {
            Chunk::First => {
                let pads = self.b.g.ints(&[0, 0, frames as i64, 0, 0, 0, 0, 0, 0, 0]);
                self.b.g.node("Pad", &[x, &pads], vec![])
            }
            Chunk::Later => {
                let cache = cache_input(i);
                self.b.g.node("Concat", &[&cache, x], vec![int("axis", 2)])
            }
        };
        let value = self.tail(&joined, 2, -(frames as i64));
        self.carried.push(Carried {
            value,
            channels: c,
            frames,
        });
        joined
    }

    /// `WanCausalConv3d` with a k×k×k kernel (k = 1 or 3, spatial padding k/2).
    fn causal_conv(
        &mut self,
        prefix: &str,
        x: &str,
        (cin, cout): (usize, usize),
        k: usize,
    ) -> Result<String> {
        let w = self
            .b
            .param(&format!("{prefix}.weight"), &[cout, cin, k, k, k], None)?;
        let bias = self.b.param(&format!("{prefix}.bias"), &[cout], None)?;
        let input = if k == 1 {
            x.to_string()
        } else {
            self.with_carried(x, cin, CARRIED)
        };
        let p = (k / 2) as i64;
        Ok(self.b.g.node(
            "Conv",
            &[&input, &w, &bias],
            vec![
                ints("kernel_shape", &[k as i64; 3]),
                ints("pads", &[0, p, p, 0, p, p]),
            ],
        ))
    }

    /// `WanRMS_norm` over the channels of [B, C, T, H, W].
    fn norm(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        self.b
            .rms_norm_as(prefix, x, c, &[c, 1, 1, 1], &[c, 1, 1, 1])
    }

    fn resnet(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let shortcut = if cin == cout {
            x.to_string()
        } else {
            self.causal_conv(&format!("{prefix}.conv_shortcut"), x, (cin, cout), 1)?
        };
        let h = self.norm(&format!("{prefix}.norm1"), x, cin)?;
        let h = self.b.silu(&h);
        let h = self.causal_conv(&format!("{prefix}.conv1"), &h, (cin, cout), 3)?;
        let h = self.norm(&format!("{prefix}.norm2"), &h, cout)?;
        let h = self.b.silu(&h);
        let h = self.causal_conv(&format!("{prefix}.conv2"), &h, (cout, cout), 3)?;
        Ok(self.b.g.node("Add", &[&h, &shortcut], vec![]))
    }

    /// `WanMidBlock`: resnet, per-frame attention, resnet.
    fn mid_block(&mut self, prefix: &str, x: &str, c: usize, t: usize) -> Result<String> {
        let h = self.resnet(&format!("{prefix}.resnets.0"), x, c, c)?;
        let frames = self.fold_frames(&h, c);
        let attended = self
            .b
            .wan_attention(&format!("{prefix}.attentions.0"), &frames, c)?;
        let h = self.unfold_frames(&attended, t, c);
        self.resnet(&format!("{prefix}.resnets.1"), &h, c, c)
    }

    /// Takes a `time_conv` the first chunk does not run, so the weights are still all used.
    fn skip_time_conv(&mut self, prefix: &str, (cin, cout): (usize, usize)) -> Result<()> {
        self.b
            .w
            .take(&format!("{prefix}.time_conv.weight"), &[cout, cin, 3, 1, 1])?;
        self.b
            .w
            .take(&format!("{prefix}.time_conv.bias"), &[cout])?;
        Ok(())
    }

    /// `WanResample` downsample2d/3d on `t` frames: per frame zero pad right and bottom and a
    /// 3×3 stride-2 conv; then (3d, later chunks) the stride-2 `time_conv` over the carried
    /// frame and the chunk. Returns the output and its frame count.
    fn downsample(
        &mut self,
        prefix: &str,
        x: &str,
        c: usize,
        t: usize,
        temporal: bool,
    ) -> Result<(String, usize)> {
        let frames = self.fold_frames(x, c);
        let h = self.b.conv(
            &format!("{prefix}.resample.1"),
            &frames,
            (c, c),
            3,
            2,
            [0, 0, 1, 1],
        )?;
        let h = self.unfold_frames(&h, t, c);
        if !temporal {
            return Ok((h, t));
        }
        if self.first() {
            self.skip_time_conv(prefix, (c, c))?;
            self.carried.push(Carried {
                value: h.clone(),
                channels: c,
                frames: 1,
            });
            return Ok((h, t));
        }
        if t < 2 {
            bail!(
                "{prefix}: a chunk of {FRAME_FACTOR} frames is down to {t} here; export builds \
                 clips for at most two temporal downsamplers (temperal_downsample)"
            );
        }
        let w = self.b.param(
            &format!("{prefix}.time_conv.weight"),
            &[c, c, 3, 1, 1],
            None,
        )?;
        let bias = self
            .b
            .param(&format!("{prefix}.time_conv.bias"), &[c], None)?;
        let joined = self.with_carried(&h, c, 1);
        let y = self.b.g.node(
            "Conv",
            &[&joined, &w, &bias],
            vec![
                ints("kernel_shape", &[3, 1, 1]),
                ints("strides", &[2, 1, 1]),
            ],
        );
        Ok((y, (t + 1 - 3) / 2 + 1))
    }

    /// `WanResample` upsample2d/3d on `t` frames: (3d, later chunks) `time_conv` to 2·c
    /// channels, interleaved into 2·t frames; then per frame nearest 2× and a 3×3 conv to
    /// `cout`. Returns the output and its frame count.
    fn upsample(
        &mut self,
        prefix: &str,
        x: &str,
        (c, cout): (usize, usize),
        t: usize,
        temporal: bool,
    ) -> Result<(String, usize)> {
        let (mut h, mut t) = (x.to_string(), t);
        if temporal && self.first() {
            self.skip_time_conv(prefix, (c, 2 * c))?;
            // "Rep": the second chunk's time_conv sees zeros before it.
            let shape = self.b.g.node("Shape", &[x], vec![]);
            let starts = self.b.g.ints(&[0]);
            let ends = self.b.g.ints(&[2]);
            let batch_channels = self.b.g.node("Slice", &[&shape, &starts, &ends], vec![]);
            let spatial = self.tail(&shape, 0, 3);
            let frames = self.b.g.ints(&[CARRIED as i64]);
            let full = self.b.g.node(
                "Concat",
                &[&batch_channels, &frames, &spatial],
                vec![int("axis", 0)],
            );
            let zeros = self.b.g.zeros(&full);
            self.carried.push(Carried {
                value: zeros,
                channels: c,
                frames: CARRIED,
            });
        } else if temporal {
            let w = self.b.param(
                &format!("{prefix}.time_conv.weight"),
                &[2 * c, c, 3, 1, 1],
                None,
            )?;
            let bias = self
                .b
                .param(&format!("{prefix}.time_conv.bias"), &[2 * c], None)?;
            let joined = self.with_carried(x, c, CARRIED);
            let y = self.b.g.node(
                "Conv",
                &[&joined, &w, &bias],
                vec![ints("kernel_shape", &[3, 1, 1])],
            );
            // [B, 2c, t, H, W] viewed as [B, 2, c, t, H, W], stacked on a new axis after t.
            let split = self.reshape(&y, &[-1, 2, c as i64, t as i64], &y, 3);
            let moved = self.transpose(&split, &[0, 2, 3, 1, 4, 5]);
            t *= 2;
            h = self.reshape(&moved, &[-1, c as i64, t as i64], &moved, 4);
        }
        let frames = self.fold_frames(&h, c);
        let up = self.b.upsample_nearest2x(&frames);
        let conv = self
            .b
            .conv3(&format!("{prefix}.resample.1"), &up, c, cout)?;
        Ok((self.unfold_frames(&conv, t, cout), t))
    }

    /// `AvgDown3D` of the block input `x` (`t` frames): time padded in front to a multiple of
    /// `ft`, per-frame space-to-depth by `fs`, each output channel the mean of `group`
    /// consecutive (channel, frame offset, pixel offset) entries.
    fn avg_down(
        &mut self,
        x: &str,
        (cin, cout): (usize, usize),
        t: usize,
        (ft, fs): (usize, usize),
    ) -> String {
        let per_channel = ft * fs * fs;
        let group = cin * per_channel / cout;
        if per_channel == 1 && group == 1 {
            return x.to_string();
        }
        let pad = (ft - t % ft) % ft;
        let mut h = x.to_string();
        if pad > 0 {
            let pads = self.b.g.ints(&[0, 0, pad as i64, 0, 0, 0, 0, 0, 0, 0]);
            h = self.b.g.node("Pad", &[&h, &pads], vec![]);
        }
        let (tp, offsets) = (t + pad, fs * fs);
        if fs == 2 {
            let frames = self.fold_frames(&h, cin);
            let s2d = self.b.space_to_depth(&frames, cin, PatchOrder::RowFirst);
            h = self.unfold_frames(&s2d, tp, cin * offsets);
        }
        let tq = (tp / ft) as i64;
        // [B, cin·s, tq·ft, H', W'] → [B, cin, s, tq, ft, H', W'] → [B, cin, ft, s, tq, H', W'].
        let split = self.reshape(&h, &[-1, cin as i64, offsets as i64, tq, ft as i64], &h, 3);
        let moved = self.transpose(&split, &[0, 1, 4, 2, 3, 5, 6]);
        let grouped = self.reshape(&moved, &[-1, cout as i64, group as i64, tq], &moved, 5);
        self.b.g.node(
            "ReduceMean",
            &[&grouped],
            vec![ints("axes", &[2]), int("keepdims", 0)],
        )
    }

    /// `DupUp3D` of the block input `x` (`t` frames): channels repeated, viewed as
    /// [C_out, ft, 2, 2], depth-to-space per frame, `ft` frames per input frame; the first chunk
    /// keeps the last of its `ft`.
    fn dup_up(&mut self, x: &str, (cin, cout): (usize, usize), t: usize, ft: usize) -> String {
        let wide = cout * ft * 4;
        let repeated = self.b.repeat_channels(x, wide, wide / cin);
        let split = self.reshape(
            &repeated,
            &[-1, cout as i64, ft as i64, 4, t as i64],
            &repeated,
            3,
        );
        // [B, cout, ft, 4, t, H, W] → [B, t, ft, cout, 4, H, W] → [B·t·ft, 4·cout, H, W].
        let moved = self.transpose(&split, &[0, 4, 2, 1, 3, 5, 6]);
        let frames = self.reshape(&moved, &[-1, 4 * cout as i64], &moved, 5);
        let up = self.b.depth_to_space(&frames, cout, PatchOrder::RowFirst);
        let y = self.unfold_frames(&up, t * ft, cout);
        if self.first() && ft > 1 {
            return self.tail(&y, 2, ft as i64 - 1);
        }
        y
    }

    /// Head of encoder and decoder: RMS norm → SiLU → 3×3×3 `conv_out`.
    fn head(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let h = self.norm(&format!("{prefix}.norm_out"), x, cin)?;
        let h = self.b.silu(&h);
        self.causal_conv(&format!("{prefix}.conv_out"), &h, (cin, cout), 3)
    }

    /// The model: `input` and `output` (with the value it is) plus the carried frames.
    fn finish(self, name: &str, input: (&str, &[Dim]), output: (&str, &[Dim], &str)) -> ModelProto {
        let dims: Vec<[Dim; 5]> = self
            .carried
            .iter()
            .map(|c| {
                [
                    Dim::Named("batch"),
                    Dim::Fixed(c.channels),
                    Dim::Fixed(c.frames),
                    Dim::Any,
                    Dim::Any,
                ]
            })
            .collect();
        let n = self.carried.len();
        let in_names: Vec<String> = (0..n).map(cache_input).collect();
        let out_names: Vec<String> = (0..n).map(cache_output).collect();
        let mut inputs = vec![input];
        if self.chunk == Chunk::Later {
            inputs.extend(
                in_names
                    .iter()
                    .zip(&dims)
                    .map(|(n, d)| (n.as_str(), &d[..])),
            );
        }
        let mut outputs = vec![output];
        outputs.extend(
            out_names
                .iter()
                .zip(&dims)
                .zip(&self.carried)
                .map(|((n, d), c)| (n.as_str(), &d[..], c.value.as_str())),
        );
        self.b.g.finish_many(name, &inputs, &outputs)
    }
}

fn frame_dims(t: usize, c: usize) -> [Dim; 5] {
    [
        Dim::Named("batch"),
        Dim::Fixed(t),
        Dim::Fixed(c),
        Dim::Named("height"),
        Dim::Named("width"),
    ]
}

fn latent_dims(c: usize) -> [Dim; 5] {
    [
        Dim::Named("batch"),
        Dim::Fixed(c),
        Dim::Fixed(1),
        Dim::Named("latent_height"),
        Dim::Named("latent_width"),
    ]
}

fn chunk_frames(chunk: Chunk) -> usize {
    match chunk {
        Chunk::First => 1,
        Chunk::Later => FRAME_FACTOR,
    }
}

/// The encoder of one chunk: `frames` → `moments` (`quant_conv` included), carried frames.
pub fn encoder(
    config: &WanConfig,
    w: &mut Weights,
    dtype: ExportDType,
    chunk: Chunk,
) -> Result<ModelProto> {
    let mut c = Clip::new(w, dtype, chunk);
    let frames_in = chunk_frames(chunk);
    let mut t = frames_in;
    let rgb = config.image_channels();
    let x = if config.patch() == 2 {
        let frames = c.reshape("frames", &[-1, rgb as i64], "frames", 3);
        let patched = c.b.space_to_depth(&frames, rgb, PatchOrder::ColumnFirst);
        c.unfold_frames(&patched, t, 4 * rgb)
    } else {
        c.transpose("frames", &[0, 2, 1, 3, 4])
    };
    let n = config.dim_mult.len();
    let dims = config.encoder_dims();
    let mut h = c.causal_conv(
        "encoder.conv_in",
        &x,
        (config.graph_in_channels(), dims[0]),
        3,
    )?;
    let mut flat = 0;
    for i in 0..n {
        let (cin, cout) = (dims[i], dims[i + 1]);
        let down = i != n - 1;
        let temporal = down && config.temperal_downsample[i];
        if config.is_residual {
            let prefix = format!("encoder.down_blocks.{i}");
            let (input, t_in) = (h.clone(), t);
            let mut from = cin;
            for j in 0..config.num_res_blocks {
                h = c.resnet(&format!("{prefix}.resnets.{j}"), &h, from, cout)?;
                from = cout;
            }
            if down {
                (h, t) = c.downsample(&format!("{prefix}.downsampler"), &h, cout, t, temporal)?;
            }
            let ft = if temporal { 2 } else { 1 };
            let fs = if down { 2 } else { 1 };
            let shortcut = c.avg_down(&input, (cin, cout), t_in, (ft, fs));
            h = c.b.g.node("Add", &[&h, &shortcut], vec![]);
        } else {
            let mut from = cin;
            for _ in 0..config.num_res_blocks {
                h = c.resnet(&format!("encoder.down_blocks.{flat}"), &h, from, cout)?;
                from = cout;
                flat += 1;
            }
            if down {
                let prefix = format!("encoder.down_blocks.{flat}");
                (h, t) = c.downsample(&prefix, &h, cout, t, temporal)?;
                flat += 1;
            }
        }
    }
    if t != 1 {
        bail!(
            "temperal_downsample {:?}: a chunk of {frames_in} frames gives {t} latent frames; \
             export builds clips for Wan's 4-to-1",
            config.temperal_downsample
        );
    }
    let top = dims[n];
    h = c.mid_block("encoder.mid_block", &h, top, t)?;
    let moments = 2 * config.z_dim;
    h = c.head("encoder", &h, top, moments)?;
    h = c.causal_conv("quant_conv", &h, (moments, moments), 1)?;
    Ok(c.finish(
        "vae_clip_encoder",
        ("frames", &frame_dims(frames_in, rgb)),
        ("moments", &latent_dims(moments), &h),
    ))
}

/// The decoder of one latent frame: unnormalized `latent` → `frames` (1 on the first chunk,
/// 4 after), `post_quant_conv` included and clamped to [-1, 1] as diffusers' `decode`.
pub fn decoder(
    config: &WanConfig,
    w: &mut Weights,
    dtype: ExportDType,
    chunk: Chunk,
) -> Result<ModelProto> {
    let mut c = Clip::new(w, dtype, chunk);
    let n = config.dim_mult.len();
    let dims = config.decoder_dims();
    let z = config.z_dim;
    let mut t = 1;
    let mut h = c.causal_conv("post_quant_conv", "latent", (z, z), 1)?;
    h = c.causal_conv("decoder.conv_in", &h, (z, dims[0]), 3)?;
    h = c.mid_block("decoder.mid_block", &h, dims[0], t)?;
    let temporal_up: Vec<bool> = config.temperal_downsample[..n - 1]
        .iter()
        .rev()
        .copied()
        .collect();
    for i in 0..n {
        let (mut cin, cout) = (dims[i], dims[i + 1]);
        if i > 0 && !config.is_residual {
            cin /= 2;
        }
        let up = i != n - 1;
        let temporal = up && temporal_up[i];
        let prefix = format!("decoder.up_blocks.{i}");
        let (input, t_in) = (h.clone(), t);
        let mut from = cin;
        for j in 0..=config.num_res_blocks {
            h = c.resnet(&format!("{prefix}.resnets.{j}"), &h, from, cout)?;
            from = cout;
        }
        if !up {
            continue;
        }
        if config.is_residual {
            (h, t) = c.upsample(
                &format!("{prefix}.upsampler"),
                &h,
                (cout, cout),
                t,
                temporal,
            )?;
            let ft = if temporal { 2 } else { 1 };
            let shortcut = c.dup_up(&input, (cin, cout), t_in, ft);
            h = c.b.g.node("Add", &[&h, &shortcut], vec![]);
        } else {
            let prefix = format!("{prefix}.upsamplers.0");
            (h, t) = c.upsample(&prefix, &h, (cout, cout / 2), t, temporal)?;
        }
    }
    h = c.head("decoder", &h, dims[n], config.graph_out_channels())?;
    let rgb = config.image_channels();
    let out_channels = config.graph_out_channels();
    h = if config.patch() == 2 {
        let frames = c.fold_frames(&h, out_channels);
        let unpatched = c.b.depth_to_space(&frames, rgb, PatchOrder::ColumnFirst);
        c.reshape(&unpatched, &[-1, t as i64, rgb as i64], &unpatched, 2)
    } else {
        c.transpose(&h, &[0, 2, 1, 3, 4])
    };
    let dtype = c.b.g.dtype();
    let lo = c.b.g.floats(&[], &[-1.0], dtype);
    let hi = c.b.g.floats(&[], &[1.0], dtype);
    h = c.b.g.node("Clip", &[&h, &lo, &hi], vec![]);
    Ok(c.finish(
        "vae_clip_decoder",
        ("latent", &latent_dims(z)),
        ("frames", &frame_dims(t, rgb), &h),
    ))
}
