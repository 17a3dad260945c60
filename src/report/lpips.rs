//! Optional LPIPS from a user-supplied ONNX export. Takes originals and reconstructions in
//! [0, 1], hands on one distance per image. The expected I/O (docs/report.md, "LPIPS ONNX I/O"):
//! two float32 inputs `[N, 3, H, W]` in [-1, 1] (the `lpips` package's convention), the
//! original first, and one output holding N distances (`[N]`, `[N, 1]` or `[N, 1, 1, 1]`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::runtime;

pub struct Lpips {
    session: Session,
    inputs: [String; 2],
    output: String,
}

impl Lpips {
    /// Opens `path` and checks its I/O with a gray probe pair of `size`² before any work.
    pub fn open(path: &Path, threads: usize, size: usize) -> Result<Self> {
        let at = path.display();
        if !path.is_file() {
            bail!("--lpips {at} does not exist; pass an LPIPS ONNX export (see docs/report.md)");
        }
        let session =
            runtime::session(path, threads).with_context(|| format!("cannot open --lpips {at}"))?;
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        if inputs.len() != 2 {
            bail!("--lpips {at} has inputs {inputs:?}; expected two images (original, reconstruction)");
        }
        for input in session.inputs() {
            if !matches!(
                input.dtype(),
                ValueType::Tensor { ty: TensorElementType::Float32, shape, .. } if shape.len() == 4
            ) {
                bail!(
                    "--lpips {at}: input {:?} is {:?}; expected float32 [N, 3, H, W] in [-1, 1]",
                    input.name(),
                    input.dtype()
                );
            }
        }
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if outputs.len() != 1 {
            bail!("--lpips {at} has outputs {outputs:?}; expected one (the distances)");
        }
        let mut lpips = Lpips {
            inputs: [inputs[0].to_string(), inputs[1].to_string()],
            output: outputs[0].to_string(),
            session,
        };
        let gray = vec![0.5; 3 * size * size];
        lpips
            .score(&gray, &gray, 1, size, size)
            .with_context(|| format!("--lpips {at}: probing with a {size}x{size} image pair"))?;
        Ok(lpips)
    }

    /// Distances of `n` image pairs, planar `[n, 3, h, w]` in [0, 1].
    pub fn score(
        &mut self,
        original: &[f32],
        reconstruction: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f64>> {
        let shape = [n, 3, h, w];
        let signed = |x: &[f32]| -> Vec<f32> { x.iter().map(|v| v * 2.0 - 1.0).collect() };
        let a = ort::value::Tensor::from_array((shape, signed(original)))?;
        let b = ort::value::Tensor::from_array((shape, signed(reconstruction)))?;
        let outputs = self.session.run(ort::inputs![
            self.inputs[0].as_str() => a,
            self.inputs[1].as_str() => b
        ])?;
        let (dims, values) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .context("LPIPS output is not float32")?;
        if values.len() != n {
            bail!(
                "LPIPS output has shape {:?} for {n} image pairs; expected {n} distances",
                &dims[..]
            );
        }
        Ok(values.iter().map(|&v| f64::from(v)).collect())
    }
}
