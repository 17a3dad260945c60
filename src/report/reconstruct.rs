//! The decoder half of the round trip: owns the card's decoder session. Takes raw latents
//! (`z`, the card's normalization undone), hands on reconstructions as planar `f32` in [0, 1].

use anyhow::{anyhow, bail, Context, Result};
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::model::{ModelCard, PerChannel};
use crate::runtime;

/// The normalization a model's stored latents carry, to undo before decoding.
pub struct Stored {
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// `latents_mean` and `latents_std`, for cards with per-channel statistics.
    pub per_channel: Option<(Vec<f32>, Vec<f32>)>,
}

impl Stored {
    /// `z = stored / scaling_factor + shift_factor` (undoes `(z − shift) · scale`), then
    /// `z · latents_std[c] + latents_mean[c]` per channel of the [C, h, w] latents (a clip
    /// window's [C, T', h, w]: one channel's plane is T'·h·w).
    pub fn raw_latents(&self, stored: &[f32], latent_shape: &[usize]) -> Vec<f32> {
        let mut z: Vec<f32> = stored
            .iter()
            .map(|&v| v / self.scaling_factor + self.shift_factor)
            .collect();
        if let Some((mean, std)) = &self.per_channel {
            let stats = PerChannel { mean, std };
            stats.denormalize(&mut z, latent_shape[1..].iter().product());
        }
        z
    }
}

/// The card's decoder file, or an error that says how to get one.
pub fn decoder_path(card: &ModelCard) -> Result<&std::path::Path> {
    let at = card.card_path.display();
    let path = card.decoder.as_ref().ok_or_else(|| {
        anyhow!(
            "model card {at} has no `decoder`: the report decodes the latents with it. Add \
             `decoder = \"path/to/decoder.onnx\"` to the card (`vae-pipeline export` writes both; \
             docs/models.md: \"Use your own VAE\")"
        )
    })?;
    if !path.is_file() {
        bail!(
            "model card {at}: field `decoder` names {}, which does not exist. Run `make models` \
             for the shared test models, or export the decoder with `vae-pipeline export` (docs/models.md: \
             \"Use your own VAE\")",
            path.display()
        );
    }
    Ok(path)
}

/// One model's decoder.
pub struct Decoder {
    session: Session,
    input_name: String,
    output_name: String,
    input_f16: bool,
    input_range: [f32; 2],
    spatial_factor: usize,
    latent_channels: usize,
}

impl Decoder {
    /// Opens `card.decoder` and checks it before any work: it exists, has one latent input and
    /// one output, and turns a probe latent into a 3-channel image `spatial_factor` times larger.
    pub fn open(card: &ModelCard, threads: usize) -> Result<Self> {
        let at = card.card_path.display();
        let path = decoder_path(card)?;
        let session = runtime::session(path, threads).with_context(|| {
            format!("cannot open decoder {} of model card {at}", path.display())
        })?;
        let only = |names: Vec<&str>, what: &str| -> Result<String> {
            match names.as_slice() {
                [one] => Ok(one.to_string()),
                _ => bail!(
                    "model card {at}: decoder {} has {what}s {names:?}; the report needs exactly one \
                     (the raw latent in, the image out)",
                    path.display()
                ),
            }
        };
        let input_name = only(session.inputs().iter().map(|o| o.name()).collect(), "input")?;
        let output_name = only(
            session.outputs().iter().map(|o| o.name()).collect(),
            "output",
        )?;
        let input_f16 = match session.inputs()[0].dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                ..
            } => false,
            ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => true,
            other => bail!(
                "model card {at}: decoder input {input_name:?} is {other:?}; expected a float32 or \
                 float16 [batch, latent_channels, h, w] tensor"
            ),
        };
        let mut decoder = Decoder {
            session,
            input_name,
            output_name,
            input_f16,
            input_range: card.input_range,
            spatial_factor: card.spatial_factor as usize,
            latent_channels: card.latent_channels,
        };
        let side = 8;
        let probe = vec![0.0; card.latent_channels * side * side];
        let (shape, _) = decoder
            .run(&probe, [1, card.latent_channels, side, side])
            .with_context(|| format!("model card {at}: probing the decoder with a zero latent"))?;
        let expect = side * decoder.spatial_factor;
        if shape != [1, 3, expect, expect] {
            bail!(
                "model card {at}: decoder {} turns a [1, {}, {side}, {side}] latent into {shape:?}; \
                 with `spatial_factor` = {} it should give [1, 3, {expect}, {expect}]",
                path.display(),
                card.latent_channels,
                card.spatial_factor
            );
        }
        Ok(decoder)
    }

    /// Decodes `n` raw latents of `[C, h, w]` into `n × 3 × (h·f) × (w·f)` values, mapped from the
    /// card's input range to [0, 1] and clamped. NaN stays NaN so the caller can refuse it.
    pub fn decode(&mut self, z: &[f32], n: usize, latent: [usize; 3]) -> Result<Vec<f32>> {
        let [c, h, w] = latent;
        if c != self.latent_channels {
            bail!(
                "latents have {c} channels; the decoder takes {}",
                self.latent_channels
            );
        }
        let (shape, mut image) = self.run(z, [n, c, h, w])?;
        let expect = [n, 3, h * self.spatial_factor, w * self.spatial_factor];
        if shape != expect {
            bail!("decoder output has shape {shape:?}; expected {expect:?}");
        }
        let [lo, hi] = self.input_range;
        for v in &mut image {
            *v = ((*v - lo) / (hi - lo)).clamp(0.0, 1.0);
        }
        Ok(image)
    }

    fn run(&mut self, z: &[f32], shape: [usize; 4]) -> Result<([usize; 4], Vec<f32>)> {
        runtime::run_nchw(
            &mut self.session,
            &self.input_name,
            &self.output_name,
            self.input_f16,
            z,
            shape,
        )
    }
}
