//! The graph `Builder` every family shares (convolutions, GroupNorm, SiLU, resnet blocks, with
//! their weights taken from the checkpoint) and the layout ops of the newer families: PyTorch's `pixel_unshuffle`/`pixel_shuffle` and the
//! Wan 2.2 patchify order, built from ONNX `SpaceToDepth`/`DepthToSpace` plus a constant channel
//! gather. ONNX's own channel orders differ from PyTorch's, and a plain Reshape/Transpose would
//! need the (dynamic) height and width.

use anyhow::Result;

use super::checkpoint::Weights;
use super::graph::{float, int, ints, string, Dim, ExportDType, Graph};

/// diffusers builds every VAE GroupNorm (resnets, attention, conv_norm_out) with eps 1e-6.
const NORM_EPS: f32 = 1e-6;

/// Image dims: dynamic batch, height and width, as the pipeline feeds any bucket size.
pub(super) fn image_dims(channels: usize) -> [Dim; 4] {
    [
        Dim::Named("batch"),
        Dim::Fixed(channels),
        Dim::Named("height"),
        Dim::Named("width"),
    ]
}

pub(super) fn latent_dims(channels: usize) -> [Dim; 4] {
    [
        Dim::Named("batch"),
        Dim::Fixed(channels),
        Dim::Named("latent_height"),
        Dim::Named("latent_width"),
    ]
}

/// Builds one graph from the checkpoint's weights.
pub(super) struct Builder<'a> {
    pub(super) g: Graph,
    pub(super) w: &'a mut Weights,
    /// GroupNorm groups (`norm_num_groups`); unused by families without group norms.
    pub(super) groups: usize,
}

impl Builder<'_> {
    pub(super) fn conv(
        &mut self,
        prefix: &str,
        x: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
        stride: i64,
        pads: [i64; 4],
    ) -> Result<String> {
        let w = self.param(
            &format!("{prefix}.weight"),
            &[cout, cin, kernel, kernel],
            None,
        )?;
        let b = self.param(&format!("{prefix}.bias"), &[cout], None)?;
        Ok(self.g.node(
            "Conv",
            &[x, &w, &b],
            vec![
                ints("kernel_shape", &[kernel as i64, kernel as i64]),
                ints("strides", &[stride, stride]),
                ints("pads", &pads),
            ],
        ))
    }

    /// 3×3, stride 1, padding 1: every conv of the VAE but the downsamplers and 1×1s.
    pub(super) fn conv3(
        &mut self,
        prefix: &str,
        x: &str,
        cin: usize,
        cout: usize,
    ) -> Result<String> {
        self.conv(prefix, x, (cin, cout), 3, 1, [1, 1, 1, 1])
    }

    /// Takes a checkpoint tensor of `shape` and stores it with `stored_shape` (same values).
    pub(super) fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        stored_shape: Option<&[usize]>,
    ) -> Result<String> {
        let values = self.w.take(name, shape)?;
        Ok(self.g.weight(name, stored_shape.unwrap_or(shape), &values))
    }

    /// `torch.nn.GroupNorm(groups, c, eps=1e-6)`, as PyTorch's own ONNX export writes it:
    /// Reshape to [N, groups, -1], InstanceNormalization, Reshape back, per-channel affine. In
    /// fp16 graphs the statistics are computed in f32: the sum of squares of a VAE activation
    /// overflows fp16 long before the activation does.
    pub(super) fn group_norm(&mut self, prefix: &str, x: &str, c: usize) -> Result<String> {
        let f16 = self.g.dtype() == ExportDType::F16;
        let shape = self.g.node("Shape", &[x], vec![]);
        let input = if f16 {
            self.g.cast(x, ExportDType::F32)
        } else {
            x.to_string()
        };
        let grouped_shape = self.g.ints(&[0, self.groups as i64, -1]);
        let grouped = self.g.node("Reshape", &[&input, &grouped_shape], vec![]);
        let ones = self
            .g
            .floats(&[self.groups], &vec![1.0; self.groups], ExportDType::F32);
        let zeros = self
            .g
            .floats(&[self.groups], &vec![0.0; self.groups], ExportDType::F32);
        let normed = self.g.node(
            "InstanceNormalization",
            &[&grouped, &ones, &zeros],
            vec![float("epsilon", NORM_EPS)],
        );
        let y = self.g.node("Reshape", &[&normed, &shape], vec![]);
        self.channel_affine(prefix, y, c, f16)
    }

    /// A norm's output `y` (computed in f32) back in f16 when `f16`, then `y · weight + bias`
    /// per channel with the norm's `{prefix}.weight` and `{prefix}.bias`.
    pub(super) fn channel_affine(
        &mut self,
        prefix: &str,
        mut y: String,
        c: usize,
        f16: bool,
    ) -> Result<String> {
        if f16 {
            y = self.g.cast(&y, ExportDType::F16);
        }
        let gamma = self.param(&format!("{prefix}.weight"), &[c], Some(&[c, 1, 1]))?;
        let beta = self.param(&format!("{prefix}.bias"), &[c], Some(&[c, 1, 1]))?;
        let scaled = self.g.node("Mul", &[&y, &gamma], vec![]);
        Ok(self.g.node("Add", &[&scaled, &beta], vec![]))
    }

    /// SiLU = x · sigmoid(x) (opset 17 has no SiLU op).
    pub(super) fn silu(&mut self, x: &str) -> String {
        let s = self.g.node("Sigmoid", &[x], vec![]);
        self.g.node("Mul", &[x, &s], vec![])
    }

    /// `ResnetBlock2D` without time embedding: norm1 → SiLU → conv1 → norm2 → SiLU → conv2,
    /// plus the input (through a 1×1 `conv_shortcut` when the channels change).
    pub(super) fn resnet(
        &mut self,
        prefix: &str,
        x: &str,
        cin: usize,
        cout: usize,
    ) -> Result<String> {
        let h = self.group_norm(&format!("{prefix}.norm1"), x, cin)?;
        let h = self.silu(&h);
        let h = self.conv3(&format!("{prefix}.conv1"), &h, cin, cout)?;
        let h = self.group_norm(&format!("{prefix}.norm2"), &h, cout)?;
        let h = self.silu(&h);
        let h = self.conv3(&format!("{prefix}.conv2"), &h, cout, cout)?;
        let shortcut = if cin == cout {
            x.to_string()
        } else {
            self.conv(
                &format!("{prefix}.conv_shortcut"),
                x,
                (cin, cout),
                1,
                1,
                [0; 4],
            )?
        };
        Ok(self.g.node("Add", &[&shortcut, &h], vec![]))
    }
}

/// Where the 2×2 offset goes in the channel index of a space-to-depth.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PatchOrder {
    /// `c·4 + dy·2 + dx`: `F.pixel_unshuffle` (and ONNX `DepthToSpace` mode CRD).
    RowFirst,
    /// `c·4 + dx·2 + dy`: Wan 2.2's `patchify`, width offset first.
    ColumnFirst,
}

impl PatchOrder {
    fn channel(self, c: usize, dy: usize, dx: usize) -> usize {
        match self {
            PatchOrder::RowFirst => c * 4 + dy * 2 + dx,
            PatchOrder::ColumnFirst => c * 4 + dx * 2 + dy,
        }
    }
}

impl Builder<'_> {
    /// Picks channels of `x` (axis 1) by constant indices.
    pub(super) fn gather_channels(&mut self, x: &str, indices: &[usize]) -> String {
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = self.g.ints(&idx);
        self.g.node("Gather", &[x, &idx], vec![int("axis", 1)])
    }

    /// [N, C, H, W] → [N, 4C, H/2, W/2], pixel (2i+dy, 2j+dx) of channel c at `order`'s channel.
    /// ONNX `SpaceToDepth` puts it at (dy·2 + dx)·C + c; a gather reorders.
    pub(super) fn space_to_depth(&mut self, x: &str, c: usize, order: PatchOrder) -> String {
        let s2d = self.g.node("SpaceToDepth", &[x], vec![int("blocksize", 2)]);
        let mut indices = vec![0; 4 * c];
        for ch in 0..c {
            for dy in 0..2 {
                for dx in 0..2 {
                    indices[order.channel(ch, dy, dx)] = (dy * 2 + dx) * c + ch;
                }
            }
        }
        self.gather_channels(&s2d, &indices)
    }

    /// The inverse of [`Builder::space_to_depth`]: [N, 4C, h, w] → [N, C, 2h, 2w]. ONNX
    /// `DepthToSpace` (mode CRD) reads channel c·4 + dy·2 + dx; other orders are gathered first.
    pub(super) fn depth_to_space(&mut self, x: &str, c: usize, order: PatchOrder) -> String {
        let input = if order == PatchOrder::RowFirst {
            x.to_string()
        } else {
            let mut indices = vec![0; 4 * c];
            for ch in 0..c {
                for dy in 0..2 {
                    for dx in 0..2 {
                        indices[PatchOrder::RowFirst.channel(ch, dy, dx)] =
                            order.channel(ch, dy, dx);
                    }
                }
            }
            self.gather_channels(x, &indices)
        };
        self.g.node(
            "DepthToSpace",
            &[&input],
            vec![int("blocksize", 2), string("mode", "CRD")],
        )
    }

    /// Nearest-neighbour 2× upsampling (`F.interpolate` "nearest" and "nearest-exact" agree at
    /// an integer scale: ONNX's asymmetric + floor).
    pub(super) fn upsample_nearest2x(&mut self, x: &str) -> String {
        let scales = self.g.floats(&[4], &[1.0, 1.0, 2.0, 2.0], ExportDType::F32);
        self.g.node(
            "Resize",
            &[x, "", &scales],
            vec![
                string("mode", "nearest"),
                string("coordinate_transformation_mode", "asymmetric"),
                string("nearest_mode", "floor"),
            ],
        )
    }

    /// `x.unflatten(1, (cout, group)).mean(2)`: output channel o is the mean of the `group`
    /// consecutive channels o·group.. of `x` (which has `cin`); `like` has the output's shape.
    pub(super) fn group_mean(&mut self, x: &str, cin: usize, cout: usize, like: &str) -> String {
        let group = cin / cout;
        if group == 1 {
            return x.to_string();
        }
        self.mean_of_groups(x, cout, group, like)
    }

    /// `x` viewed as [N, cout, group, …], averaged over the groups, reshaped like `like`.
    pub(super) fn mean_of_groups(
        &mut self,
        x: &str,
        cout: usize,
        group: usize,
        like: &str,
    ) -> String {
        let grouped = self.g.ints(&[0, cout as i64, group as i64, -1]);
        let h = self.g.node("Reshape", &[x, &grouped], vec![]);
        let mean = self.g.node(
            "ReduceMean",
            &[&h],
            vec![ints("axes", &[2]), int("keepdims", 0)],
        );
        let shape = self.g.node("Shape", &[like], vec![]);
        self.g.node("Reshape", &[&mean, &shape], vec![])
    }

    /// `repeat_interleave(repeats, dim=1)` to `cout` channels: channel k is channel k / repeats.
    pub(super) fn repeat_channels(&mut self, x: &str, cout: usize, repeats: usize) -> String {
        let indices: Vec<usize> = (0..cout).map(|k| k / repeats).collect();
        self.gather_channels(x, &indices)
    }

    /// Channels `start..end` of `x` along `axis`.
    pub(super) fn slice_axis(&mut self, x: &str, axis: i64, start: usize, end: usize) -> String {
        let starts = self.g.ints(&[start as i64]);
        let ends = self.g.ints(&[end as i64]);
        let axes = self.g.ints(&[axis]);
        self.g.node("Slice", &[x, &starts, &ends, &axes], vec![])
    }

    /// Single-head self-attention over the H·W positions of [N, C, H, W] maps `q`, `k`, `v`:
    /// softmax(q kᵀ / √C) v (diffusers' `scaled_dot_product_attention` of one head), back in the
    /// shape of `like`. In fp16 graphs the softmax runs in f32.
    pub(super) fn spatial_attention(
        &mut self,
        (q, k, v): (&str, &str, &str),
        c: usize,
        like: &str,
    ) -> String {
        let f16 = self.g.dtype() == ExportDType::F16;
        let flat_shape = self.g.ints(&[0, c as i64, -1]);
        // k as [N, C, HW]; q and v as [N, HW, C].
        let kt = self.g.node("Reshape", &[k, &flat_shape], vec![]);
        let mut tokens = |x: &str| {
            let flat = self.g.node("Reshape", &[x, &flat_shape], vec![]);
            self.g
                .node("Transpose", &[&flat], vec![ints("perm", &[0, 2, 1])])
        };
        let (q, v) = (tokens(q), tokens(v));
        let mut scores = self.g.node("MatMul", &[&q, &kt], vec![]);
        if f16 {
            scores = self.g.cast(&scores, ExportDType::F32);
        }
        let scale = self
            .g
            .floats(&[], &[1.0 / (c as f32).sqrt()], ExportDType::F32);
        let scores = self.g.node("Mul", &[&scores, &scale], vec![]);
        let mut probs = self.g.node("Softmax", &[&scores], vec![int("axis", -1)]);
        if f16 {
            probs = self.g.cast(&probs, ExportDType::F16);
        }
        let mixed = self.g.node("MatMul", &[&probs, &v], vec![]);
        let mixed = self
            .g
            .node("Transpose", &[&mixed], vec![ints("perm", &[0, 2, 1])]);
        let shape = self.g.node("Shape", &[like], vec![]);
        self.g.node("Reshape", &[&mixed, &shape], vec![])
    }
}
