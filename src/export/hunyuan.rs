//! HunyuanImage 2.1's VAE (`AutoencoderKLHunyuanImage`) as ONNX graphs, op for op as diffusers'
//! `autoencoder_kl_hunyuanimage.py`: AutoencoderKL-like ResNet blocks (GroupNorm 32) and a
//! single-head mid-block attention, but downsampling is a conv then space-to-depth plus a
//! channel-group mean of the space-to-depth input, upsampling a conv then depth-to-space plus the
//! repeated input, and the encoder and decoder have channel shortcuts around their ends. Its
//! space-to-depth order, (dy·2 + dx)·C + c, is ONNX's own (`SpaceToDepth`, `DepthToSpace` DCR).

use anyhow::{bail, Result};
use serde::Deserialize;

use super::checkpoint::Weights;
use super::graph::{int, string, ExportDType, Graph};
use super::onnx_pb::ModelProto;
use super::ops::{image_dims, latent_dims, Builder};

/// Every GroupNorm of the model has 32 groups.
const GROUPS: usize = 32;

/// The fields of an `AutoencoderKLHunyuanImage` `config.json` that the export reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HunyuanConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub spatial_compression_ratio: usize,
    pub scaling_factor: f32,
    #[serde(default = "yes")]
    pub downsample_match_channel: bool,
    #[serde(default = "yes")]
    pub upsample_match_channel: bool,
}

fn yes() -> bool {
    true
}

impl HunyuanConfig {
    pub fn parse(text: &str) -> Result<Self> {
        let config: HunyuanConfig = serde_json::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Stages that resample: the first log2(ratio), never the last.
    fn resamples(&self) -> usize {
        let log2 = self.spatial_compression_ratio.trailing_zeros() as usize;
        log2.min(self.block_out_channels.len() - 1)
    }

    pub fn spatial_factor(&self) -> u32 {
        1 << self.resamples()
    }

    fn check(&self) -> Result<()> {
        let channels = &self.block_out_channels;
        if channels.is_empty() {
            bail!("block_out_channels is empty");
        }
        if !self.spatial_compression_ratio.is_power_of_two()
            || self.spatial_factor() as usize != self.spatial_compression_ratio
        {
            bail!(
                "spatial_compression_ratio {} is not 2^k for k below the {} stages",
                self.spatial_compression_ratio,
                channels.len()
            );
        }
        if !self.downsample_match_channel || !self.upsample_match_channel {
            // diffusers' resnet then applies a channel-changing conv_shortcut to the main path,
            // which only runs when no channels change; no published checkpoint does this.
            bail!("downsample_match_channel and upsample_match_channel must be true");
        }
        if let Some(c) = channels.iter().find(|&&c| !c.is_multiple_of(GROUPS)) {
            bail!("block_out_channels {c} is not a multiple of the 32 norm groups");
        }
        let top = channels[channels.len() - 1];
        if !top.is_multiple_of(2 * self.latent_channels) {
            bail!(
                "the last block_out_channels {top} must be a multiple of 2 × latent_channels {}",
                self.latent_channels
            );
        }
        if self.in_channels != 3 || self.out_channels != 3 {
            bail!("in_channels and out_channels must be 3 (RGB)");
        }
        Ok(())
    }
}

impl Builder<'_> {
    /// `HunyuanImageDownsample`: conv to cout/4, space-to-depth, plus the space-to-depth input
    /// averaged over channel groups.
    fn hy_downsample(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let h = self.conv3(&format!("{prefix}.conv"), x, cin, cout / 4)?;
        let h = self
            .g
            .node("SpaceToDepth", &[&h], vec![int("blocksize", 2)]);
        let s = self.g.node("SpaceToDepth", &[x], vec![int("blocksize", 2)]);
        let s = self.group_mean(&s, 4 * cin, cout, &h);
        Ok(self.g.node("Add", &[&h, &s], vec![]))
    }

    /// `HunyuanImageUpsample`: conv to 4·cout, depth-to-space, plus the input's channels
    /// repeated and depth-to-spaced.
    fn hy_upsample(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let h = self.conv3(&format!("{prefix}.conv"), x, cin, 4 * cout)?;
        let d2s = |b: &mut Self, t: &str| {
            b.g.node(
                "DepthToSpace",
                &[t],
                vec![int("blocksize", 2), string("mode", "DCR")],
            )
        };
        let h = d2s(self, &h);
        let s = self.repeat_channels(x, 4 * cout, 4 * cout / cin);
        let s = d2s(self, &s);
        Ok(self.g.node("Add", &[&h, &s], vec![]))
    }

    /// `HunyuanImageAttentionBlock`: GroupNorm, 1×1 q/k/v convs, one head, 1×1 `proj`, residual.
    fn hy_attention(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let h = self.group_norm(&format!("{prefix}.norm"), x, c)?;
        let project = |b: &mut Self, name: &str| -> Result<String> {
            // The checkpoint reader stores `attentions.0.to_*` 1×1 convs as linears [out, in].
            let w = b.param(
                &format!("{prefix}.{name}.weight"),
                &[c, c],
                Some(&[c, c, 1, 1]),
            )?;
            let bias = b.param(&format!("{prefix}.{name}.bias"), &[c], None)?;
            Ok(b.g.node("Conv", &[&h, &w, &bias], vec![]))
        };
        let q = project(self, "to_q")?;
        let k = project(self, "to_k")?;
        let v = project(self, "to_v")?;
        let mixed = self.spatial_attention((&q, &k, &v), c, x);
        let out = self.conv(&format!("{prefix}.proj"), &mixed, (c, c), 1, 1, [0; 4])?;
        Ok(self.g.node("Add", &[&out, x], vec![]))
    }

    fn hy_mid_block(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let h = self.resnet(&format!("{prefix}.resnets.0"), x, c, c)?;
        let h = self.hy_attention(&format!("{prefix}.attentions.0"), &h, c)?;
        self.resnet(&format!("{prefix}.resnets.1"), &h, c, c)
    }

    /// `norm_out` → SiLU → `conv_out`.
    fn hy_head(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let h = self.group_norm(&format!("{prefix}.norm_out"), x, cin)?;
        let h = self.silu(&h);
        self.conv3(&format!("{prefix}.conv_out"), &h, cin, cout)
    }
}

/// The encoder graph: `image` [N, 3, H, W] in [-1, 1] → `moments` [N, 2·latent, H/f, W/f].
pub fn encoder(config: &HunyuanConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: GROUPS,
    };
    let channels = &config.block_out_channels;
    let n = channels.len();
    let mut h = b.conv3("encoder.conv_in", "image", config.in_channels, channels[0])?;
    let mut flat = 0;
    let mut c = channels[0];
    for i in 0..n {
        for _ in 0..config.layers_per_block {
            h = b.resnet(&format!("encoder.down_blocks.{flat}"), &h, c, channels[i])?;
            c = channels[i];
            flat += 1;
        }
        if i < config.resamples() {
            let prefix = format!("encoder.down_blocks.{flat}");
            h = b.hy_downsample(&prefix, &h, c, channels[i + 1])?;
            c = channels[i + 1];
            flat += 1;
        }
    }
    h = b.hy_mid_block("encoder.mid_block", &h, c)?;
    let moments = 2 * config.latent_channels;
    let out = b.hy_head("encoder", &h, c, moments)?;
    let shortcut = b.group_mean(&h, c, moments, &out);
    let out = b.g.node("Add", &[&out, &shortcut], vec![]);
    Ok(b.g.finish(
        "vae_encoder",
        ("image", &image_dims(config.in_channels)),
        ("moments", &latent_dims(moments)),
        &out,
    ))
}

/// The decoder graph: unscaled `latent` [N, latent, h, w] → `image` [N, 3, h·f, w·f], about
/// [-1, 1], not clamped.
pub fn decoder(config: &HunyuanConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: GROUPS,
    };
    let channels: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
    let n = channels.len();
    let z = config.latent_channels;
    let h = b.conv3("decoder.conv_in", "latent", z, channels[0])?;
    let shortcut = b.repeat_channels("latent", channels[0], channels[0] / z);
    let mut h = b.g.node("Add", &[&h, &shortcut], vec![]);
    h = b.hy_mid_block("decoder.mid_block", &h, channels[0])?;
    let mut flat = 0;
    let mut c = channels[0];
    for i in 0..n {
        for _ in 0..=config.layers_per_block {
            h = b.resnet(&format!("decoder.up_blocks.{flat}"), &h, c, channels[i])?;
            c = channels[i];
            flat += 1;
        }
        if i < config.resamples() {
            let prefix = format!("decoder.up_blocks.{flat}");
            h = b.hy_upsample(&prefix, &h, c, channels[i + 1])?;
            c = channels[i + 1];
            flat += 1;
        }
    }
    h = b.hy_head("decoder", &h, c, config.out_channels)?;
    Ok(b.g.finish(
        "vae_decoder",
        ("latent", &latent_dims(z)),
        ("image", &image_dims(config.out_channels)),
        &h,
    ))
}
