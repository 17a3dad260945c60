//! DC-AE (`AutoencoderDC`: Sana's f32c32, and the `-in` / `-mix` layouts) as ONNX graphs, op for
//! op as diffusers' `autoencoder_dc.py` computes them: ResBlocks with channel RMSNorm (weight and
//! bias) or batch norm, EfficientViT blocks (ReLU linear attention with multiscale depthwise
//! projections, then GLUMBConv), pixel-(un)shuffle shortcuts in PyTorch's channel order. The
//! encoder is deterministic: it outputs the `latent` itself.
//!
//! diffusers switches between two attention formulas by size (linear when H·W > the head dim,
//! quadratic otherwise). Both compute `Σⱼ vⱼ (kⱼ·qᵢ) / (Σⱼ kⱼ·qᵢ + ε)`, only in another order;
//! the graph always uses the linear form (memory linear in H·W), in f32 also in fp16 graphs.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::checkpoint::Weights;
use super::graph::{float, int, ints, ExportDType, Graph};
use super::onnx_pb::ModelProto;
use super::ops::PatchOrder;
use super::ops::{image_dims, latent_dims, Builder};

/// eps of every DC-AE RMSNorm and BatchNorm2d.
const NORM_EPS: f32 = 1e-5;
/// eps of the linear attention's denominator.
const ATTENTION_EPS: f32 = 1e-15;
/// GLUMBConv's hidden width over its input width.
const GLU_EXPAND: usize = 4;

/// A config value given once for every stage or per stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerStage<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Clone> PerStage<T> {
    fn stages(&self, n: usize) -> Vec<T> {
        match self {
            PerStage::All(v) => vec![v.clone(); n],
            PerStage::Each(v) => v.clone(),
        }
    }
}

/// The fields of an `AutoencoderDC` `config.json` (defaults: diffusers' constructor defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct DcConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "thirty_two")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub attention_head_dim: usize,
    #[serde(default = "res_block")]
    pub encoder_block_types: PerStage<String>,
    #[serde(default = "res_block")]
    pub decoder_block_types: PerStage<String>,
    #[serde(default = "block_out_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "encoder_layers")]
    pub encoder_layers_per_block: Vec<usize>,
    #[serde(default = "decoder_layers")]
    pub decoder_layers_per_block: Vec<usize>,
    #[serde(default = "multiscales")]
    pub encoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "multiscales")]
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "pixel_shuffle")]
    pub upsample_block_type: String,
    #[serde(default = "pixel_unshuffle")]
    pub downsample_block_type: String,
    #[serde(default = "rms_norm")]
    pub decoder_norm_types: PerStage<String>,
    #[serde(default = "silu")]
    pub decoder_act_fns: PerStage<String>,
    #[serde(default = "yes")]
    pub encoder_out_shortcut: bool,
    #[serde(default = "yes")]
    pub decoder_in_shortcut: bool,
    #[serde(default = "relu")]
    pub decoder_conv_act_fn: String,
    #[serde(default = "one")]
    pub scaling_factor: f32,
}

fn three() -> usize {
    3
}
fn thirty_two() -> usize {
    32
}
fn res_block() -> PerStage<String> {
    PerStage::All("ResBlock".into())
}
fn block_out_channels() -> Vec<usize> {
    vec![128, 256, 512, 512, 1024, 1024]
}
fn encoder_layers() -> Vec<usize> {
    vec![2, 2, 2, 3, 3, 3]
}
fn decoder_layers() -> Vec<usize> {
    vec![3, 3, 3, 3, 3, 3]
}
fn multiscales() -> Vec<Vec<usize>> {
    vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]]
}
fn pixel_shuffle() -> String {
    "pixel_shuffle".into()
}
fn pixel_unshuffle() -> String {
    "pixel_unshuffle".into()
}
fn rms_norm() -> PerStage<String> {
    PerStage::All("rms_norm".into())
}
fn silu() -> PerStage<String> {
    PerStage::All("silu".into())
}
fn relu() -> String {
    "relu".into()
}
fn yes() -> bool {
    true
}
fn one() -> f32 {
    1.0
}

/// The scale of a stack whose stages have `layers` layers: stages with layers (but the last)
/// resample 2×, and so does the first conv when the first stage has none.
fn factor(layers: &[usize]) -> u32 {
    let n = layers.len();
    let resamples = (0..n - 1).filter(|&i| layers[i] > 0).count() + usize::from(layers[0] == 0);
    1 << resamples
}

/// One stage of the encoder or decoder.
struct Stage {
    channels: usize,
    layers: usize,
    block: String,
    multiscales: Vec<usize>,
    norm: String,
    act: String,
}

impl DcConfig {
    pub fn parse(text: &str) -> Result<Self> {
        let config: DcConfig = serde_json::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Pixels per latent: the stages that downsample, plus `conv_in` when the first stage has
    /// no layers (it then downsamples itself).
    pub fn spatial_factor(&self) -> u32 {
        factor(&self.encoder_layers_per_block)
    }

    fn encoder_stages(&self) -> Vec<Stage> {
        let n = self.encoder_block_out_channels.len();
        let blocks = self.encoder_block_types.stages(n);
        (0..n)
            .map(|i| Stage {
                channels: self.encoder_block_out_channels[i],
                layers: self.encoder_layers_per_block[i],
                block: blocks[i].clone(),
                multiscales: self.encoder_qkv_multiscales[i].clone(),
                norm: "rms_norm".into(),
                act: "silu".into(),
            })
            .collect()
    }

    fn decoder_stages(&self) -> Vec<Stage> {
        let n = self.decoder_block_out_channels.len();
        let (blocks, norms, acts) = (
            self.decoder_block_types.stages(n),
            self.decoder_norm_types.stages(n),
            self.decoder_act_fns.stages(n),
        );
        (0..n)
            .map(|i| Stage {
                channels: self.decoder_block_out_channels[i],
                layers: self.decoder_layers_per_block[i],
                block: blocks[i].clone(),
                multiscales: self.decoder_qkv_multiscales[i].clone(),
                norm: norms[i].clone(),
                act: acts[i].clone(),
            })
            .collect()
    }

    fn check(&self) -> Result<()> {
        let n = self.encoder_block_out_channels.len();
        if n < 2 || self.decoder_block_out_channels.len() != n {
            bail!("encoder and decoder need the same number (≥ 2) of block_out_channels");
        }
        let lengths = [
            self.encoder_layers_per_block.len(),
            self.decoder_layers_per_block.len(),
            self.encoder_qkv_multiscales.len(),
            self.decoder_qkv_multiscales.len(),
        ];
        if lengths.iter().any(|&l| l != n) {
            bail!("layers_per_block and qkv_multiscales need one entry per stage ({n})");
        }
        for (what, value) in [
            ("encoder_block_types", &self.encoder_block_types),
            ("decoder_block_types", &self.decoder_block_types),
            ("decoder_norm_types", &self.decoder_norm_types),
            ("decoder_act_fns", &self.decoder_act_fns),
        ] {
            if let PerStage::Each(v) = value {
                if v.len() != n {
                    bail!("{what} has {} entries; there are {n} stages", v.len());
                }
            }
        }
        for stage in self.encoder_stages().iter().chain(&self.decoder_stages()) {
            if !matches!(stage.block.as_str(), "ResBlock" | "EfficientViTBlock") {
                bail!(
                    "block type {:?}: export builds ResBlock and EfficientViTBlock",
                    stage.block
                );
            }
            if !matches!(stage.norm.as_str(), "rms_norm" | "batch_norm") {
                bail!(
                    "norm type {:?}: export builds rms_norm and batch_norm",
                    stage.norm
                );
            }
            Activation::parse(&stage.act)?;
            if stage.block == "EfficientViTBlock"
                && !stage.channels.is_multiple_of(self.attention_head_dim)
            {
                bail!(
                    "{} channels are not a whole number of {}-channel attention heads",
                    stage.channels,
                    self.attention_head_dim
                );
            }
        }
        Activation::parse(&self.decoder_conv_act_fn)?;
        if !matches!(
            self.downsample_block_type.as_str(),
            "pixel_unshuffle" | "conv"
        ) {
            bail!(
                "downsample_block_type {:?}: export builds pixel_unshuffle and conv",
                self.downsample_block_type
            );
        }
        if !matches!(
            self.upsample_block_type.as_str(),
            "pixel_shuffle" | "interpolate"
        ) {
            bail!(
                "upsample_block_type {:?}: export builds pixel_shuffle and interpolate",
                self.upsample_block_type
            );
        }
        if self.in_channels != 3 {
            bail!("in_channels {}: export builds RGB images", self.in_channels);
        }
        let decoder_factor = factor(&self.decoder_layers_per_block);
        if decoder_factor != self.spatial_factor() {
            bail!(
                "the decoder upsamples {decoder_factor}x but the encoder downsamples {}x",
                self.spatial_factor()
            );
        }
        Ok(())
    }
}

/// The activations DC-AE configs name.
#[derive(Clone, Copy)]
enum Activation {
    Relu,
    Relu6,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "relu" => Activation::Relu,
            "relu6" => Activation::Relu6,
            "silu" => Activation::Silu,
            other => bail!("activation {other:?}: export builds relu, relu6 and silu"),
        })
    }
}

impl Builder<'_> {
    /// A Conv2d with optional bias and groups, padding k/2.
    #[allow(clippy::too_many_arguments)]
    fn dc_conv(
        &mut self,
        prefix: &str,
        x: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
        stride: i64,
        groups: usize,
        bias: bool,
    ) -> Result<String> {
        let w = self.param(
            &format!("{prefix}.weight"),
            &[cout, cin / groups, kernel, kernel],
            None,
        )?;
        let mut inputs = vec![x.to_string(), w];
        if bias {
            inputs.push(self.param(&format!("{prefix}.bias"), &[cout], None)?);
        }
        let pad = (kernel / 2) as i64;
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.g.node(
            "Conv",
            &inputs,
            vec![
                ints("kernel_shape", &[kernel as i64, kernel as i64]),
                ints("strides", &[stride, stride]),
                ints("pads", &[pad; 4]),
                int("group", groups as i64),
            ],
        ))
    }

    /// A bias-free `nn.Linear` on channels (weight [out, in]) as a 1×1 conv.
    fn channel_linear(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let w = self.param(
            &format!("{prefix}.weight"),
            &[cout, cin],
            Some(&[cout, cin, 1, 1]),
        )?;
        Ok(self.g.node("Conv", &[x, &w], vec![]))
    }

    fn activation(&mut self, name: &str, x: &str) -> Result<String> {
        Ok(match Activation::parse(name)? {
            Activation::Silu => self.silu(x),
            Activation::Relu6 => {
                let dtype = self.g.dtype();
                let lo = self.g.floats(&[], &[0.0], dtype);
                let hi = self.g.floats(&[], &[6.0], dtype);
                self.g.node("Clip", &[x, &lo, &hi], vec![])
            }
            Activation::Relu => self.g.node("Relu", &[x], vec![]),
        })
    }

    /// diffusers' `RMSNorm(c, 1e-5, bias=True)` over channels: x · rsqrt(mean(x²) + eps) · w + b,
    /// the statistics in f32 in fp16 graphs.
    fn channel_rms_norm(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let f16 = self.g.dtype() == ExportDType::F16;
        let input = if f16 {
            self.g.cast(x, ExportDType::F32)
        } else {
            x.to_string()
        };
        let square = self.g.node("Mul", &[&input, &input], vec![]);
        let mean = self.g.node(
            "ReduceMean",
            &[&square],
            vec![ints("axes", &[1]), int("keepdims", 1)],
        );
        let eps = self.g.floats(&[], &[NORM_EPS], ExportDType::F32);
        let var = self.g.node("Add", &[&mean, &eps], vec![]);
        let rms = self.g.node("Sqrt", &[&var], vec![]);
        let y = self.g.node("Div", &[&input, &rms], vec![]);
        self.channel_affine(prefix, y, c, f16)
    }

    /// `BatchNorm2d(c, eps=1e-5)` in eval mode, with its running statistics.
    fn batch_norm2d(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let mut inputs = Vec::with_capacity(5);
        inputs.push(x.to_string());
        for field in ["weight", "bias", "running_mean", "running_var"] {
            inputs.push(self.param(&format!("{prefix}.{field}"), &[c], None)?);
        }
        // The training-step counter: a buffer, not used in eval mode.
        self.w.take(&format!("{prefix}.num_batches_tracked"), &[])?;
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.g.node(
            "BatchNormalization",
            &inputs,
            vec![float("epsilon", NORM_EPS)],
        ))
    }

    fn dc_norm(&mut self, kind: &str, prefix: &str, x: &str, c: usize) -> Result<String> {
        match kind {
            "batch_norm" => self.batch_norm2d(prefix, x, c),
            _ => self.channel_rms_norm(prefix, x, c),
        }
    }

    /// The shape of `like` with its channel count replaced by `c`.
    fn shape_with_channels(&mut self, like: &str, c: usize) -> String {
        let shape = self.g.node("Shape", &[like], vec![]);
        let batch = self.slice_ints(&shape, 0, 1);
        let spatial = self.slice_ints(&shape, 2, 4);
        let channels = self.g.ints(&[c as i64]);
        self.g.node(
            "Concat",
            &[&batch, &channels, &spatial],
            vec![int("axis", 0)],
        )
    }

    fn slice_ints(&mut self, x: &str, start: i64, end: i64) -> String {
        let starts = self.g.ints(&[start]);
        let ends = self.g.ints(&[end]);
        self.g.node("Slice", &[x, &starts, &ends], vec![])
    }

    /// `ResBlock`: conv1 → act → conv2 (no bias) → norm, plus the input.
    fn dc_resblock(&mut self, prefix: &str, x: &str, stage: &Stage) -> Result<String> {
        let c = stage.channels;
        let h = self.dc_conv(&format!("{prefix}.conv1"), x, (c, c), 3, 1, 1, true)?;
        let h = self.activation(&stage.act, &h)?;
        let h = self.dc_conv(&format!("{prefix}.conv2"), &h, (c, c), 3, 1, 1, false)?;
        let h = self.dc_norm(&stage.norm, &format!("{prefix}.norm"), &h, c)?;
        Ok(self.g.node("Add", &[&h, x], vec![]))
    }

    /// `SanaMultiscaleLinearAttention` with its residual.
    fn dc_attention(
        &mut self,
        prefix: &str,
        x: &str,
        stage: &Stage,
        head_dim: usize,
    ) -> Result<String> {
        let c = stage.channels;
        let heads = c / head_dim;
        let inner = heads * head_dim;
        let q = self.channel_linear(&format!("{prefix}.to_q"), x, c, inner)?;
        let k = self.channel_linear(&format!("{prefix}.to_k"), x, c, inner)?;
        let v = self.channel_linear(&format!("{prefix}.to_v"), x, c, inner)?;
        let qkv = self.g.node("Concat", &[&q, &k, &v], vec![int("axis", 1)]);
        let mut scales = vec![qkv.clone()];
        for (s, &kernel) in stage.multiscales.iter().enumerate() {
            let p = format!("{prefix}.to_qkv_multiscale.{s}");
            let width = 3 * inner;
            let h = self.dc_conv(
                &format!("{p}.proj_in"),
                &qkv,
                (width, width),
                kernel,
                1,
                width,
                false,
            )?;
            let h = self.dc_conv(
                &format!("{p}.proj_out"),
                &h,
                (width, width),
                1,
                1,
                3 * heads,
                false,
            )?;
            scales.push(h);
        }
        let scales_ref: Vec<&str> = scales.iter().map(String::as_str).collect();
        let mut all = self.g.node("Concat", &scales_ref, vec![int("axis", 1)]);
        let f16 = self.g.dtype() == ExportDType::F16;
        if f16 {
            all = self.g.cast(&all, ExportDType::F32);
        }
        let groups = inner * (1 + stage.multiscales.len()) / head_dim;
        let split = self.g.ints(&[0, groups as i64, 3 * head_dim as i64, -1]);
        let tokens = self.g.node("Reshape", &[&all, &split], vec![]);
        let q = self.slice_axis(&tokens, 2, 0, head_dim);
        let q = self.g.node("Relu", &[&q], vec![]);
        let k = self.slice_axis(&tokens, 2, head_dim, 2 * head_dim);
        let k = self.g.node("Relu", &[&k], vec![]);
        let v = self.slice_axis(&tokens, 2, 2 * head_dim, 3 * head_dim);
        // Σⱼ vⱼ kⱼᵀ qᵢ over Σⱼ kⱼᵀ qᵢ (+ eps): [N, G, d, d] · [N, G, d, HW].
        let kt = self
            .g
            .node("Transpose", &[&k], vec![ints("perm", &[0, 1, 3, 2])]);
        let vk = self.g.node("MatMul", &[&v, &kt], vec![]);
        let numerator = self.g.node("MatMul", &[&vk, &q], vec![]);
        let axis = self.g.ints(&[3]);
        let k_sum = self
            .g
            .node("ReduceSum", &[&k, &axis], vec![int("keepdims", 1)]);
        let k_sum_t = self
            .g
            .node("Transpose", &[&k_sum], vec![ints("perm", &[0, 1, 3, 2])]);
        let denominator = self.g.node("MatMul", &[&k_sum_t, &q], vec![]);
        let eps = self.g.floats(&[], &[ATTENTION_EPS], ExportDType::F32);
        let denominator = self.g.node("Add", &[&denominator, &eps], vec![]);
        let mut h = self.g.node("Div", &[&numerator, &denominator], vec![]);
        if f16 {
            h = self.g.cast(&h, ExportDType::F16);
        }
        let shape = self.shape_with_channels(x, groups * head_dim);
        let h = self.g.node("Reshape", &[&h, &shape], vec![]);
        let h = self.channel_linear(&format!("{prefix}.to_out"), &h, groups * head_dim, c)?;
        let h = self.dc_norm(&stage.norm, &format!("{prefix}.norm_out"), &h, c)?;
        Ok(self.g.node("Add", &[&h, x], vec![]))
    }

    /// `GLUMBConv` (expand 4, RMSNorm, residual).
    fn glumb_conv(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let hidden = GLU_EXPAND * c;
        let h = self.dc_conv(
            &format!("{prefix}.conv_inverted"),
            x,
            (c, 2 * hidden),
            1,
            1,
            1,
            true,
        )?;
        let h = self.silu(&h);
        let h = self.dc_conv(
            &format!("{prefix}.conv_depth"),
            &h,
            (2 * hidden, 2 * hidden),
            3,
            1,
            2 * hidden,
            true,
        )?;
        let value = self.slice_axis(&h, 1, 0, hidden);
        let gate = self.slice_axis(&h, 1, hidden, 2 * hidden);
        let gate = self.silu(&gate);
        let h = self.g.node("Mul", &[&value, &gate], vec![]);
        let h = self.dc_conv(
            &format!("{prefix}.conv_point"),
            &h,
            (hidden, c),
            1,
            1,
            1,
            false,
        )?;
        let h = self.channel_rms_norm(&format!("{prefix}.norm"), &h, c)?;
        Ok(self.g.node("Add", &[&h, x], vec![]))
    }

    fn dc_block(
        &mut self,
        prefix: &str,
        x: &str,
        stage: &Stage,
        head_dim: usize,
    ) -> Result<String> {
        if stage.block == "ResBlock" {
            return self.dc_resblock(prefix, x, stage);
        }
        let h = self.dc_attention(&format!("{prefix}.attn"), x, stage, head_dim)?;
        self.glumb_conv(&format!("{prefix}.conv_out"), &h, stage.channels)
    }

    /// `DCDownBlock2d`: a stride-2 conv, or a conv to cout/4 then pixel_unshuffle; with the
    /// shortcut, plus the pixel-unshuffled input averaged over channel groups.
    fn dc_down(
        &mut self,
        prefix: &str,
        x: &str,
        (cin, cout): (usize, usize),
        unshuffle: bool,
        shortcut: bool,
    ) -> Result<String> {
        let conv = format!("{prefix}.conv");
        let h = if unshuffle {
            let h = self.dc_conv(&conv, x, (cin, cout / 4), 3, 1, 1, true)?;
            self.space_to_depth(&h, cout / 4, PatchOrder::RowFirst)
        } else {
            self.dc_conv(&conv, x, (cin, cout), 3, 2, 1, true)?
        };
        if !shortcut {
            return Ok(h);
        }
        let y = self.space_to_depth(x, cin, PatchOrder::RowFirst);
        let y = self.group_mean(&y, 4 * cin, cout, &h);
        Ok(self.g.node("Add", &[&h, &y], vec![]))
    }

    /// `DCUpBlock2d`: nearest 2× then conv, or a conv to 4·cout then pixel_shuffle; with the
    /// shortcut, plus the input's channels repeated and pixel-shuffled.
    fn dc_up(
        &mut self,
        prefix: &str,
        x: &str,
        (cin, cout): (usize, usize),
        interpolate: bool,
        shortcut: bool,
    ) -> Result<String> {
        let conv = format!("{prefix}.conv");
        let h = if interpolate {
            let up = self.upsample_nearest2x(x);
            self.dc_conv(&conv, &up, (cin, cout), 3, 1, 1, true)?
        } else {
            let h = self.dc_conv(&conv, x, (cin, 4 * cout), 3, 1, 1, true)?;
            self.depth_to_space(&h, cout, PatchOrder::RowFirst)
        };
        if !shortcut {
            return Ok(h);
        }
        let y = self.repeat_channels(x, 4 * cout, 4 * cout / cin);
        let y = self.depth_to_space(&y, cout, PatchOrder::RowFirst);
        Ok(self.g.node("Add", &[&h, &y], vec![]))
    }
}

/// The encoder graph: `image` [N, 3, H, W] in [-1, 1] → `latent` [N, latent, H/f, W/f].
pub fn encoder(config: &DcConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: 0,
    };
    let stages = config.encoder_stages();
    let n = stages.len();
    let unshuffle = config.downsample_block_type == "pixel_unshuffle";
    let head_dim = config.attention_head_dim;
    let mut h = if stages[0].layers > 0 {
        b.dc_conv(
            "encoder.conv_in",
            "image",
            (3, stages[0].channels),
            3,
            1,
            1,
            true,
        )?
    } else {
        b.dc_down(
            "encoder.conv_in",
            "image",
            (3, stages[1].channels),
            unshuffle,
            false,
        )?
    };
    for (i, stage) in stages.iter().enumerate() {
        for j in 0..stage.layers {
            h = b.dc_block(&format!("encoder.down_blocks.{i}.{j}"), &h, stage, head_dim)?;
        }
        if i < n - 1 && stage.layers > 0 {
            let prefix = format!("encoder.down_blocks.{i}.{}", stage.layers);
            h = b.dc_down(
                &prefix,
                &h,
                (stage.channels, stages[i + 1].channels),
                unshuffle,
                true,
            )?;
        }
    }
    let top = stages[n - 1].channels;
    let latent = config.latent_channels;
    let out = b.dc_conv("encoder.conv_out", &h, (top, latent), 3, 1, 1, true)?;
    let out = if config.encoder_out_shortcut {
        let y = b.group_mean(&h, top, latent, &out);
        b.g.node("Add", &[&out, &y], vec![])
    } else {
        out
    };
    Ok(b.g.finish(
        "vae_encoder",
        ("image", &image_dims(3)),
        ("latent", &latent_dims(latent)),
        &out,
    ))
}

/// The decoder graph: unscaled `latent` [N, latent, h, w] → `image` [N, 3, h·f, w·f], about
/// [-1, 1], not clamped.
pub fn decoder(config: &DcConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: 0,
    };
    let stages = config.decoder_stages();
    let n = stages.len();
    let interpolate = config.upsample_block_type == "interpolate";
    let head_dim = config.attention_head_dim;
    let latent = config.latent_channels;
    let top = stages[n - 1].channels;
    let mut h = b.dc_conv("decoder.conv_in", "latent", (latent, top), 3, 1, 1, true)?;
    if config.decoder_in_shortcut {
        let y = b.repeat_channels("latent", top, top / latent);
        h = b.g.node("Add", &[&h, &y], vec![]);
    }
    for i in (0..n).rev() {
        let stage = &stages[i];
        let mut j = 0;
        if i < n - 1 && stage.layers > 0 {
            let prefix = format!("decoder.up_blocks.{i}.0");
            h = b.dc_up(
                &prefix,
                &h,
                (stages[i + 1].channels, stage.channels),
                interpolate,
                true,
            )?;
            j = 1;
        }
        for l in 0..stage.layers {
            h = b.dc_block(
                &format!("decoder.up_blocks.{i}.{}", j + l),
                &h,
                stage,
                head_dim,
            )?;
        }
    }
    let channels = if stages[0].layers > 0 {
        stages[0].channels
    } else {
        stages[1].channels
    };
    h = b.channel_rms_norm("decoder.norm_out", &h, channels)?;
    h = b.activation(&config.decoder_conv_act_fn, &h)?;
    h = if stages[0].layers > 0 {
        b.dc_conv("decoder.conv_out", &h, (channels, 3), 3, 1, 1, true)?
    } else {
        b.dc_up("decoder.conv_out", &h, (channels, 3), interpolate, false)?
    };
    Ok(b.g.finish(
        "vae_decoder",
        ("latent", &latent_dims(latent)),
        ("image", &image_dims(3)),
        &h,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_counts_the_first_stage_conv_in() {
        let sana = r#"{"_class_name": "AutoencoderDC", "encoder_layers_per_block": [1, 1, 1, 1, 1, 1],
            "decoder_layers_per_block": [1, 1, 1, 1, 1, 1]}"#;
        assert_eq!(DcConfig::parse(sana).unwrap().spatial_factor(), 32);
        let dc_in = r#"{"_class_name": "AutoencoderDC", "encoder_layers_per_block": [0, 1, 1, 1, 1, 1],
            "decoder_layers_per_block": [0, 1, 1, 1, 1, 1]}"#;
        assert_eq!(DcConfig::parse(dc_in).unwrap().spatial_factor(), 32);
        let f64c128 = r#"{"_class_name": "AutoencoderDC", "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048],
            "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048],
            "encoder_layers_per_block": [0, 4, 8, 2, 2, 2, 2], "decoder_layers_per_block": [0, 5, 10, 2, 2, 2, 2],
            "encoder_qkv_multiscales": [[], [], [], [], [], [], []], "decoder_qkv_multiscales": [[], [], [], [], [], [], []]}"#;
        assert_eq!(DcConfig::parse(f64c128).unwrap().spatial_factor(), 64);
    }
}
