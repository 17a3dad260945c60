//! The AutoencoderKL architecture as ONNX graphs, op for op as diffusers' `Encoder` and
//! `Decoder` (vae.py) compute it. Takes a `VaeConfig` and `Weights`, hands on the encoder
//! (`image` → `moments`, `quant_conv` included) and the decoder (`latent` → `image`,
//! `post_quant_conv` included).

use anyhow::Result;

use super::checkpoint::Weights;
use super::family::VaeConfig;
use super::graph::{int, ints, string, ExportDType, Graph};
use super::onnx_pb::ModelProto;
use super::ops::{image_dims, latent_dims, Builder};

impl Builder<'_> {
    /// A linear layer on [N, L, C_in]: the weight [C_out, C_in] is stored transposed for MatMul,
    /// times `scale`.
    fn linear(&mut self, prefix: &str, x: &str, c: usize, scale: f32) -> Result<String> {
        let name = format!("{prefix}.weight");
        let w = self.w.take(&name, &[c, c])?;
        let mut t = vec![0.0; c * c];
        for o in 0..c {
            for i in 0..c {
                t[i * c + o] = w[o * c + i] * scale;
            }
        }
        let wt = self.g.weight(&name, &[c, c], &t);
        let bias_name = format!("{prefix}.bias");
        let b: Vec<f32> = self
            .w
            .take(&bias_name, &[c])?
            .iter()
            .map(|v| v * scale)
            .collect();
        let b = self.g.weight(&bias_name, &[c], &b);
        let y = self.g.node("MatMul", &[x, &wt], vec![]);
        Ok(self.g.node("Add", &[&y, &b], vec![]))
    }

    /// The mid block's single-head self-attention over all H·W positions (diffusers'
    /// `Attention` with `residual_connection`, `upcast_softmax`): the 1/√C scale is folded
    /// into `to_q`, and in fp16 graphs the softmax runs in f32.
    fn attention(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let f16 = self.g.dtype() == ExportDType::F16;
        let h = self.group_norm(&format!("{prefix}.group_norm"), x, c)?;
        let shape = self.g.node("Shape", &[x], vec![]);
        let flat_shape = self.g.ints(&[0, 0, -1]);
        let flat = self.g.node("Reshape", &[&h, &flat_shape], vec![]);
        let tokens = self
            .g
            .node("Transpose", &[&flat], vec![ints("perm", &[0, 2, 1])]);
        let scale = 1.0 / (c as f32).sqrt();
        let q = self.linear(&format!("{prefix}.to_q"), &tokens, c, scale)?;
        let k = self.linear(&format!("{prefix}.to_k"), &tokens, c, 1.0)?;
        let v = self.linear(&format!("{prefix}.to_v"), &tokens, c, 1.0)?;
        let kt = self
            .g
            .node("Transpose", &[&k], vec![ints("perm", &[0, 2, 1])]);
        let mut scores = self.g.node("MatMul", &[&q, &kt], vec![]);
        if f16 {
            scores = self.g.cast(&scores, ExportDType::F32);
        }
        let mut probs = self.g.node("Softmax", &[&scores], vec![int("axis", -1)]);
        if f16 {
            probs = self.g.cast(&probs, ExportDType::F16);
        }
        let mixed = self.g.node("MatMul", &[&probs, &v], vec![]);
        let out = self.linear(&format!("{prefix}.to_out.0"), &mixed, c, 1.0)?;
        let out = self
            .g
            .node("Transpose", &[&out], vec![ints("perm", &[0, 2, 1])]);
        let out = self.g.node("Reshape", &[&out, &shape], vec![]);
        Ok(self.g.node("Add", &[&out, x], vec![]))
    }

    /// `UNetMidBlock2D`: resnet, attention (unless `mid_block_add_attention` is off), resnet.
    fn mid_block(&mut self, prefix: &str, x: &str, c: usize, attention: bool) -> Result<String> {
        let mut h = self.resnet(&format!("{prefix}.resnets.0"), x, c, c)?;
        if attention {
            h = self.attention(&format!("{prefix}.attentions.0"), &h, c)?;
        }
        self.resnet(&format!("{prefix}.resnets.1"), &h, c, c)
    }

    /// `conv_norm_out` → SiLU → `conv_out`.
    fn head(&mut self, prefix: &str, x: &str, cin: usize, cout: usize) -> Result<String> {
        let h = self.group_norm(&format!("{prefix}.conv_norm_out"), x, cin)?;
        let h = self.silu(&h);
        self.conv3(&format!("{prefix}.conv_out"), &h, cin, cout)
    }
}

/// The encoder graph: `image` [N, 3, H, W] in [-1, 1] → `moments` [N, 2·latent, H/f, W/f].
pub fn encoder(config: &VaeConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: config.norm_num_groups,
    };
    let channels = &config.block_out_channels;
    let last = channels.len() - 1;
    let mut h = b.conv3("encoder.conv_in", "image", config.in_channels, channels[0])?;
    let mut cin = channels[0];
    for (i, &cout) in channels.iter().enumerate() {
        for j in 0..config.layers_per_block {
            let from = if j == 0 { cin } else { cout };
            h = b.resnet(
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                &h,
                from,
                cout,
            )?;
        }
        if i != last {
            // `Downsample2D(padding=0)`: pad right and bottom by one, then a stride-2 conv;
            // the pad is the conv's own (zero) padding [top, left, bottom, right].
            h = b.conv(
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                &h,
                (cout, cout),
                3,
                2,
                [0, 0, 1, 1],
            )?;
        }
        cin = cout;
    }
    h = b.mid_block(
        "encoder.mid_block",
        &h,
        channels[last],
        config.mid_block_add_attention,
    )?;
    let moments = 2 * config.latent_channels;
    h = b.head("encoder", &h, channels[last], moments)?;
    if config.use_quant_conv {
        h = b.conv("quant_conv", &h, (moments, moments), 1, 1, [0; 4])?;
    }
    Ok(b.g.finish(
        "vae_encoder",
        ("image", &image_dims(config.in_channels)),
        ("moments", &latent_dims(moments)),
        &h,
    ))
}

/// The decoder graph: unscaled `latent` [N, latent, h, w] → `image` [N, 3, h·f, w·f], about
/// [-1, 1], not clamped.
pub fn decoder(config: &VaeConfig, w: &mut Weights, dtype: ExportDType) -> Result<ModelProto> {
    let mut b = Builder {
        g: Graph::new(dtype),
        w,
        groups: config.norm_num_groups,
    };
    let latent = config.latent_channels;
    let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
    let last = reversed.len() - 1;
    let mut h = "latent".to_string();
    if config.use_post_quant_conv {
        h = b.conv("post_quant_conv", &h, (latent, latent), 1, 1, [0; 4])?;
    }
    h = b.conv3("decoder.conv_in", &h, latent, reversed[0])?;
    h = b.mid_block(
        "decoder.mid_block",
        &h,
        reversed[0],
        config.mid_block_add_attention,
    )?;
    let mut cin = reversed[0];
    for (i, &cout) in reversed.iter().enumerate() {
        for j in 0..=config.layers_per_block {
            let from = if j == 0 { cin } else { cout };
            h = b.resnet(
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                &h,
                from,
                cout,
            )?;
        }
        if i != last {
            // `Upsample2D`: nearest-neighbour 2× (F.interpolate's "nearest" is ONNX's
            // asymmetric + floor), then a 3×3 conv.
            let scales = b.g.floats(&[4], &[1.0, 1.0, 2.0, 2.0], ExportDType::F32);
            let up = b.g.node(
                "Resize",
                &[&h, "", &scales],
                vec![
                    string("mode", "nearest"),
                    string("coordinate_transformation_mode", "asymmetric"),
                    string("nearest_mode", "floor"),
                ],
            );
            h = b.conv3(
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                &up,
                cout,
                cout,
            )?;
        }
        cin = cout;
    }
    h = b.head("decoder", &h, reversed[last], config.out_channels)?;
    Ok(b.g.finish(
        "vae_decoder",
        ("latent", &latent_dims(latent)),
        ("image", &image_dims(config.out_channels)),
        &h,
    ))
}

/// Parameters in a graph: the sum of its initializers' sizes.
pub fn parameters(model: &ModelProto) -> usize {
    model.graph.as_ref().map_or(0, |g| {
        g.initializer
            .iter()
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum()
    })
}
