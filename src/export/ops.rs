//! Layout ops shared by the newer families: PyTorch's `pixel_unshuffle`/`pixel_shuffle` and the
//! Wan 2.2 patchify order, built from ONNX `SpaceToDepth`/`DepthToSpace` plus a constant channel
//! gather. ONNX's own channel orders differ from PyTorch's, and a plain Reshape/Transpose would
//! need the (dynamic) height and width.

use super::graph::{int, string, ExportDType};
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
}
