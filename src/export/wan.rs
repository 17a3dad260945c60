//! Wan 2.1 / Qwen-Image (`AutoencoderKLWan`, `AutoencoderKLQwenImage`) and Wan 2.2
//! (`AutoencoderKLWan` with `is_residual` and `patch_size` 2) as 2-D graphs of one frame.
//!
//! These are causal 3-D VAEs, and an image is a single frame. A causal 3-D convolution pads the
//! time axis in front with zeros, so on the first (only) frame it sees the real frame through the
//! last temporal slice of its kernel alone: each one is exactly a Conv2d with `weight[:, :, -1]`.
//! The temporal convolutions of the resamplers (`time_conv`) do not run on the first chunk, the
//! attention is per frame, and `AvgDown3D`/`DupUp3D` reduce to channel gathers and means. The
//! encoder therefore equals diffusers' `encode` of a 1-frame video, and the decoder diffusers'
//! `decode` of a 1-frame latent, clamp to [-1, 1] included.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::checkpoint::Weights;
use super::graph::{int, ints, ExportDType, Graph};
use super::onnx_pb::ModelProto;
use super::ops::PatchOrder;
use super::ops::{image_dims, latent_dims, Builder};

/// `F.normalize`'s floor on the norm.
const RMS_EPS: f32 = 1e-12;

/// The fields of an `AutoencoderKLWan` / `AutoencoderKLQwenImage` `config.json` that the
/// export reads (defaults: diffusers' constructor defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct WanConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "base_dim")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "z_dim")]
    pub z_dim: usize,
    #[serde(default = "dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "num_res_blocks")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f32>,
    #[serde(default = "temperal_downsample")]
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
    #[serde(default)]
    pub is_residual: bool,
    /// `AutoencoderKLWan`: image channels after patchify (12 for Wan 2.2).
    #[serde(default)]
    pub in_channels: Option<usize>,
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// `AutoencoderKLQwenImage`: image channels of both encoder input and decoder output.
    #[serde(default)]
    pub input_channels: Option<usize>,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default)]
    pub scale_factor_spatial: Option<usize>,
}

fn base_dim() -> usize {
    96
}
fn z_dim() -> usize {
    16
}
fn dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn num_res_blocks() -> usize {
    2
}
fn temperal_downsample() -> Vec<bool> {
    vec![false, true, true]
}

/// Wan 2.1's (and Qwen-Image's) `latents_mean` / `latents_std`, diffusers' defaults.
const WAN21_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const WAN21_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

impl WanConfig {
    /// The published Wan 2.1 / Qwen-Image config (diffusers' constructor defaults, which their
    /// `vae/config.json` repeat), for single files.
    pub fn published(class_name: &str) -> Self {
        WanConfig {
            class_name: class_name.into(),
            base_dim: base_dim(),
            decoder_base_dim: None,
            z_dim: z_dim(),
            dim_mult: dim_mult(),
            num_res_blocks: num_res_blocks(),
            attn_scales: Vec::new(),
            temperal_downsample: temperal_downsample(),
            latents_mean: WAN21_MEAN.to_vec(),
            latents_std: WAN21_STD.to_vec(),
            is_residual: false,
            in_channels: None,
            out_channels: None,
            input_channels: None,
            patch_size: None,
            scale_factor_spatial: None,
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: WanConfig = serde_json::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Pixels per latent: every down block but the last halves the image, patchify halves it
    /// once more.
    pub fn spatial_factor(&self) -> u32 {
        (1 << (self.dim_mult.len() - 1)) * self.patch() as u32
    }

    /// Channels of the encoder's stages: `base_dim` × (1, `dim_mult`…).
    pub(super) fn encoder_dims(&self) -> Vec<usize> {
        std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|u| self.base_dim * u)
            .collect()
    }

    /// Channels of the decoder's stages: its base × (the last `dim_mult`, `dim_mult` reversed…).
    pub(super) fn decoder_dims(&self) -> Vec<usize> {
        let base = self.decoder_base_dim.unwrap_or(self.base_dim);
        std::iter::once(self.dim_mult[self.dim_mult.len() - 1])
            .chain(self.dim_mult.iter().rev().copied())
            .map(|u| base * u)
            .collect()
    }

    pub(super) fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1)
    }

    /// Channels the graph's `image` has (3; the patchified channels are inside the graph).
    pub(super) fn image_channels(&self) -> usize {
        self.graph_in_channels() / (self.patch() * self.patch())
    }

    pub(super) fn graph_in_channels(&self) -> usize {
        self.input_channels.or(self.in_channels).unwrap_or(3)
    }

    pub(super) fn graph_out_channels(&self) -> usize {
        self.input_channels.or(self.out_channels).unwrap_or(3)
    }

    fn check(&self) -> Result<()> {
        let n = self.dim_mult.len();
        if n == 0 {
            bail!("dim_mult is empty");
        }
        if self.temperal_downsample.len() + 1 < n {
            bail!(
                "temperal_downsample has {} entries; dim_mult {:?} needs {}",
                self.temperal_downsample.len(),
                self.dim_mult,
                n - 1
            );
        }
        if !self.attn_scales.is_empty() {
            bail!(
                "attn_scales {:?}: export builds the Wan/Qwen-Image VAEs without down-block \
                 attention (every published one has attn_scales = [])",
                self.attn_scales
            );
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            bail!(
                "latents_mean ({}) and latents_std ({}) need z_dim = {} values each",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            );
        }
        match self.patch_size {
            None | Some(1) | Some(2) => {}
            Some(p) => bail!("patch_size {p}: export builds patch sizes 1 and 2"),
        }
        let p2 = self.patch() * self.patch();
        for (what, c) in [
            ("in_channels", self.graph_in_channels()),
            ("out_channels", self.graph_out_channels()),
        ] {
            if c != 3 * p2 {
                bail!(
                    "{what} {c}: export builds RGB images ({} channels with patch_size {})",
                    3 * p2,
                    self.patch()
                );
            }
        }
        if let Some(f) = self.scale_factor_spatial {
            if f as u32 != self.spatial_factor() {
                bail!(
                    "scale_factor_spatial {f} does not match dim_mult {:?} with patch_size {} \
                     (factor {})",
                    self.dim_mult,
                    self.patch(),
                    self.spatial_factor()
                );
            }
        }
        Ok(())
    }
}

impl Builder<'_> {
    /// A `WanCausalConv3d` on one frame: Conv2d with the last temporal slice of the kernel
    /// (stored under the checkpoint's name, [out, in, k, k]), spatial padding k/2.
    fn causal_conv(
        &mut self,
        prefix: &str,
        x: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
    ) -> Result<String> {
        let name = format!("{prefix}.weight");
        let full = self.w.take(&name, &[cout, cin, kernel, kernel, kernel])?;
        let last = last_temporal_slice(&full, kernel);
        let w = self.g.weight(&name, &[cout, cin, kernel, kernel], &last);
        let b = self.param(&format!("{prefix}.bias"), &[cout], None)?;
        let pad = (kernel / 2) as i64;
        Ok(self.g.node(
            "Conv",
            &[x, &w, &b],
            vec![
                ints("kernel_shape", &[kernel as i64, kernel as i64]),
                ints("pads", &[pad; 4]),
            ],
        ))
    }

    /// `WanRMS_norm`: `x / max(‖x‖₂ over channels, 1e-12) · √C · γ` (`F.normalize`), with the
    /// norm computed in f32 in fp16 graphs. `gamma_shape` is the checkpoint's ([C, 1, 1, 1] in
    /// resnets and heads, [C, 1, 1] in attention).
    fn rms_norm(
        &mut self,
        prefix: &str,
        x: &str,
        c: usize,
        gamma_shape: &[usize],
    ) -> Result<String> {
        self.rms_norm_as(prefix, x, c, gamma_shape, &[c, 1, 1])
    }

    /// [`Builder::rms_norm`] with γ stored as `stored` ([C, 1, 1, 1] on [B, C, T, H, W]).
    pub(super) fn rms_norm_as(
        &mut self,
        prefix: &str,
        x: &str,
        c: usize,
        gamma_shape: &[usize],
        stored: &[usize],
    ) -> Result<String> {
        let f16 = self.g.dtype() == ExportDType::F16;
        let input = if f16 {
            self.g.cast(x, ExportDType::F32)
        } else {
            x.to_string()
        };
        let norm = self.g.node(
            "ReduceL2",
            &[&input],
            vec![ints("axes", &[1]), int("keepdims", 1)],
        );
        let eps = self.g.floats(&[], &[RMS_EPS], ExportDType::F32);
        let norm = self.g.node("Max", &[&norm, &eps], vec![]);
        let mut y = self.g.node("Div", &[&input, &norm], vec![]);
        if f16 {
            y = self.g.cast(&y, ExportDType::F16);
        }
        let dtype = self.g.dtype();
        let scale = self.g.floats(&[], &[(c as f32).sqrt()], dtype);
        let y = self.g.node("Mul", &[&y, &scale], vec![]);
        let gamma = self.param(&format!("{prefix}.gamma"), gamma_shape, Some(stored))?;
        Ok(self.g.node("Mul", &[&y, &gamma], vec![]))
    }

    /// `WanResidualBlock`: RMS norm → SiLU → conv1 → RMS norm → SiLU → conv2, plus the input
    /// (through a 1×1 `conv_shortcut` when the channels change).
    fn wan_resnet(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let shortcut = if cin == cout {
            x.to_string()
        } else {
            self.causal_conv(&format!("{prefix}.conv_shortcut"), x, (cin, cout), 1)?
        };
        let h = self.rms_norm(&format!("{prefix}.norm1"), x, cin, &[cin, 1, 1, 1])?;
        let h = self.silu(&h);
        let h = self.causal_conv(&format!("{prefix}.conv1"), &h, (cin, cout), 3)?;
        let h = self.rms_norm(&format!("{prefix}.norm2"), &h, cout, &[cout, 1, 1, 1])?;
        let h = self.silu(&h);
        let h = self.causal_conv(&format!("{prefix}.conv2"), &h, (cout, cout), 3)?;
        Ok(self.g.node("Add", &[&h, &shortcut], vec![]))
    }

    /// `WanAttentionBlock`: RMS norm, one 1×1 conv to q‖k‖v, single-head attention over the
    /// frame's H·W positions (scale 1/√C; softmax in f32 in fp16 graphs), 1×1 `proj`, residual.
    pub(super) fn wan_attention(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let h = self.rms_norm(&format!("{prefix}.norm"), x, c, &[c, 1, 1])?;
        // The checkpoint reader stores every `attentions.0.to_*` 1×1 conv as a linear [out, in]
        // (the original-naming rule); it is a 1×1 Conv2d here.
        let qkv_w = self.param(
            &format!("{prefix}.to_qkv.weight"),
            &[3 * c, c],
            Some(&[3 * c, c, 1, 1]),
        )?;
        let qkv_b = self.param(&format!("{prefix}.to_qkv.bias"), &[3 * c], None)?;
        let qkv = self.g.node("Conv", &[&h, &qkv_w, &qkv_b], vec![]);
        let q = self.slice_axis(&qkv, 1, 0, c);
        let k = self.slice_axis(&qkv, 1, c, 2 * c);
        let v = self.slice_axis(&qkv, 1, 2 * c, 3 * c);
        let mixed = self.spatial_attention((&q, &k, &v), c, x);
        let out = self.conv(&format!("{prefix}.proj"), &mixed, (c, c), 1, 1, [0; 4])?;
        Ok(self.g.node("Add", &[&out, x], vec![]))
    }

    /// `WanMidBlock`: resnet, attention, resnet.
    fn wan_mid_block(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let h = self.wan_resnet(&format!("{prefix}.resnets.0"), x, c, c)?;
        let h = self.wan_attention(&format!("{prefix}.attentions.0"), &h, c)?;
        self.wan_resnet(&format!("{prefix}.resnets.1"), &h, c, c)
    }

    /// A resampler's `time_conv`: checked against the config, then left out, because the first
    /// chunk never runs it (its feature cache is empty).
    fn first_frame_skips(&mut self, prefix: &str, cin: usize, cout: usize) -> Result<()> {
        let kernel = [cout, cin, 3, 1, 1];
        self.w
            .take(&format!("{prefix}.time_conv.weight"), &kernel)?;
        self.w.take(&format!("{prefix}.time_conv.bias"), &[cout])?;
        Ok(())
    }

    /// `WanResample` downsample2d/3d: zero pad right and bottom, 3×3 stride-2 conv.
    fn wan_downsample(
        &mut self,
        prefix: &str,
        x: &str,
        c: usize,
        temporal: bool,
    ) -> Result<String> {
        if temporal {
            self.first_frame_skips(prefix, c, c)?;
        }
        self.conv(
            &format!("{prefix}.resample.1"),
            x,
            (c, c),
            3,
            2,
            [0, 0, 1, 1],
        )
    }

    /// `WanResample` upsample2d/3d: nearest 2×, 3×3 conv to `cout`.
    fn wan_upsample(
        &mut self,
        prefix: &str,
        x: &str,
        (c, cout): (usize, usize),
        temporal: bool,
    ) -> Result<String> {
        if temporal {
            self.first_frame_skips(prefix, c, 2 * c)?;
        }
        let up = self.upsample_nearest2x(x);
        self.conv3(&format!("{prefix}.resample.1"), &up, c, cout)
    }

    /// `AvgDown3D` on one frame: the time axis is padded in front to `factor_t` frames (zeros),
    /// space-to-depth by `factor_s` (PyTorch order), then each output channel is the mean of
    /// `group` consecutive (channel, frame, offset) entries, zeros included.
    fn avg_down(
        &mut self,
        x: &str,
        (cin, cout): (usize, usize),
        factor_t: usize,
        factor_s: usize,
        like: &str,
    ) -> String {
        let per_channel = factor_t * factor_s * factor_s;
        let group = cin * per_channel / cout;
        if group == 1 && per_channel == 1 {
            return x.to_string();
        }
        let spatial = if factor_s == 2 {
            self.space_to_depth(x, cin, PatchOrder::RowFirst)
        } else {
            x.to_string()
        };
        let offsets = (factor_s * factor_s) as i64;
        let split = self.g.ints(&[0, cin as i64, 1, offsets, -1]);
        let mut h = self.g.node("Reshape", &[&spatial, &split], vec![]);
        if factor_t > 1 {
            let pads = self
                .g
                .ints(&[0, 0, factor_t as i64 - 1, 0, 0, 0, 0, 0, 0, 0]);
            h = self.g.node("Pad", &[&h, &pads], vec![]);
        }
        self.mean_of_groups(&h, cout, group, like)
    }

    /// `DupUp3D` on the first chunk: channel c_in repeated `repeats` times, viewed as
    /// [C_out, factor_t, 2, 2], the last frame kept, depth-to-space.
    fn dup_up(&mut self, x: &str, (cin, cout): (usize, usize), factor_t: usize) -> String {
        let repeats = cout * factor_t * 4 / cin;
        let mut indices = Vec::with_capacity(4 * cout);
        for o in 0..cout {
            for offset in 0..4 {
                indices.push(((o * factor_t + factor_t - 1) * 4 + offset) / repeats);
            }
        }
        let picked = self.gather_channels(x, &indices);
        self.depth_to_space(&picked, cout, PatchOrder::RowFirst)
    }

    /// Head of encoder and decoder: RMS norm → SiLU → 3×3 `conv_out`.
    fn wan_head(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let h = self.rms_norm(&format!("{prefix}.norm_out"), x, cin, &[cin, 1, 1, 1])?;
        let h = self.silu(&h);
        self.causal_conv(&format!("{prefix}.conv_out"), &h, (cin, cout), 3)
    }
}

/// The encoder graph: `image` [N, 3, H, W] in [-1, 1] → `moments` [N, 2·z_dim, H/f, W/f]
/// (`quant_conv` included).
pub fn encoder(config: &WanConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: 0,
    };
    let n = config.dim_mult.len();
    let dims = config.encoder_dims();
    let mut x = "image".to_string();
    if config.patch() == 2 {
        x = b.space_to_depth(&x, config.image_channels(), PatchOrder::ColumnFirst);
    }
    let mut h = b.causal_conv(
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
            let input = h.clone();
            let mut from = cin;
            for j in 0..config.num_res_blocks {
                h = b.wan_resnet(&format!("{prefix}.resnets.{j}"), &h, from, cout)?;
                from = cout;
            }
            if down {
                h = b.wan_downsample(&format!("{prefix}.downsampler"), &h, cout, temporal)?;
            }
            let factor_t = if temporal { 2 } else { 1 };
            let factor_s = if down { 2 } else { 1 };
            let shortcut = b.avg_down(&input, (cin, cout), factor_t, factor_s, &h);
            h = b.g.node("Add", &[&h, &shortcut], vec![]);
        } else {
            let mut from = cin;
            for _ in 0..config.num_res_blocks {
                h = b.wan_resnet(&format!("encoder.down_blocks.{flat}"), &h, from, cout)?;
                from = cout;
                flat += 1;
            }
            if down {
                h = b.wan_downsample(&format!("encoder.down_blocks.{flat}"), &h, cout, temporal)?;
                flat += 1;
            }
        }
    }
    let top = dims[n];
    h = b.wan_mid_block("encoder.mid_block", &h, top)?;
    let moments = 2 * config.z_dim;
    h = b.wan_head("encoder", &h, top, moments)?;
    h = b.causal_conv("quant_conv", &h, (moments, moments), 1)?;
    Ok(b.g.finish(
        "vae_encoder",
        ("image", &image_dims(config.image_channels())),
        ("moments", &latent_dims(moments)),
        &h,
    ))
}

/// The decoder graph: unnormalized `latent` [N, z_dim, h, w] → `image` [N, 3, h·f, w·f],
/// clamped to [-1, 1] as diffusers' `decode` returns it (`post_quant_conv` included).
pub fn decoder(config: &WanConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: 0,
    };
    let n = config.dim_mult.len();
    let dims = config.decoder_dims();
    let z = config.z_dim;
    let mut h = b.causal_conv("post_quant_conv", "latent", (z, z), 1)?;
    h = b.causal_conv("decoder.conv_in", &h, (z, dims[0]), 3)?;
    h = b.wan_mid_block("decoder.mid_block", &h, dims[0])?;
    // temperal_upsample is temperal_downsample reversed.
    let temporal_up: Vec<bool> = config.temperal_downsample[..n - 1]
        .iter()
        .rev()
        .copied()
        .collect();
    for i in 0..n {
        let (mut cin, cout) = (dims[i], dims[i + 1]);
        if i > 0 && !config.is_residual {
            // Wan 2.1's upsamplers halve the channels.
            cin /= 2;
        }
        let up = i != n - 1;
        let temporal = up && temporal_up[i];
        let prefix = format!("decoder.up_blocks.{i}");
        let input = h.clone();
        let mut from = cin;
        for j in 0..=config.num_res_blocks {
            h = b.wan_resnet(&format!("{prefix}.resnets.{j}"), &h, from, cout)?;
            from = cout;
        }
        if !up {
            continue;
        }
        if config.is_residual {
            h = b.wan_upsample(&format!("{prefix}.upsampler"), &h, (cout, cout), temporal)?;
            let factor_t = if temporal { 2 } else { 1 };
            let shortcut = b.dup_up(&input, (cin, cout), factor_t);
            h = b.g.node("Add", &[&h, &shortcut], vec![]);
        } else {
            h = b.wan_upsample(
                &format!("{prefix}.upsamplers.0"),
                &h,
                (cout, cout / 2),
                temporal,
            )?;
        }
    }
    h = b.wan_head("decoder", &h, dims[n], config.graph_out_channels())?;
    if config.patch() == 2 {
        h = b.depth_to_space(&h, config.image_channels(), PatchOrder::ColumnFirst);
    }
    let dtype = b.g.dtype();
    let lo = b.g.floats(&[], &[-1.0], dtype);
    let hi = b.g.floats(&[], &[1.0], dtype);
    h = b.g.node("Clip", &[&h, &lo, &hi], vec![]);
    Ok(b.g.finish(
        "vae_decoder",
        ("latent", &latent_dims(z)),
        ("image", &image_dims(config.image_channels())),
        &h,
    ))
}

/// `weight[:, :, -1]` of a [out, in, k, k, k] kernel, as [out, in, k, k].
fn last_temporal_slice(full: &[f32], kernel: usize) -> Vec<f32> {
    let plane = kernel * kernel;
    full.chunks_exact(kernel * plane)
        .flat_map(|slices| slices[(kernel - 1) * plane..].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_kernel_keeps_the_last_temporal_slice() {
        // weight[o, i, t, y, x] = t: the 2-D kernel must be all 2s (t = kernel - 1).
        let kernel = 3;
        let full: Vec<f32> = (0..2 * kernel * kernel * kernel)
            .map(|k| ((k / (kernel * kernel)) % kernel) as f32)
            .collect();
        assert_eq!(
            last_temporal_slice(&full, kernel),
            vec![2.0; 2 * kernel * kernel]
        );
    }

    #[test]
    fn factor_counts_patchify() {
        let qwen = r#"{"_class_name": "AutoencoderKLQwenImage", "latents_mean": [0.0], "latents_std": [1.0], "z_dim": 1}"#;
        assert_eq!(WanConfig::parse(qwen).unwrap().spatial_factor(), 8);
        let wan22 = r#"{"_class_name": "AutoencoderKLWan", "latents_mean": [0.0], "latents_std": [1.0],
            "z_dim": 1, "patch_size": 2, "in_channels": 12, "out_channels": 12, "is_residual": true}"#;
        assert_eq!(WanConfig::parse(wan22).unwrap().spatial_factor(), 16);
    }
}
