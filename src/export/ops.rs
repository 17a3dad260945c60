//! Layout ops shared by the newer families: PyTorch's `pixel_unshuffle`/`pixel_shuffle` and the
//! Wan 2.2 patchify order, built from ONNX `SpaceToDepth`/`DepthToSpace` plus a constant channel
//! gather. ONNX's own channel orders differ from PyTorch's, and a plain Reshape/Transpose would
//! need the (dynamic) height and width.

use super::graph::{int, ints, string, ExportDType};
use super::vae::Builder;

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
