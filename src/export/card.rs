//! Model cards for ONNX files: the card `export` writes beside its graphs, and the draft card
//! `export --inspect` prints for an ONNX encoder made by other tools (Hugging Face Optimum's
//! `vae_encoder/model.onnx`, ONNX Runtime's Stable Diffusion exports).

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use prost::Message;

use super::checkpoint::Naming;
use super::family::Family;
use super::graph::ExportDType;
use super::onnx_pb::{tensor_shape_proto::dimension, type_proto, ModelProto, ValueInfoProto};
use crate::model::EncoderOutput;
use crate::runtime;

/// What the exported card describes.
pub struct Exported<'a> {
    pub name: &'a str,
    /// The config's `_class_name`.
    pub class_name: &'a str,
    pub family: Option<Family>,
    pub dtype: ExportDType,
    pub source: &'a Path,
    pub naming: Naming,
    pub latent_channels: usize,
    pub spatial_factor: u32,
    pub output: EncoderOutput,
    pub normalization: Normalization<'a>,
    /// Whether `export` wrote the clip graphs (`wan_clip::FILES`) beside the image graphs.
    pub temporal: bool,
}

/// How the family's pipelines normalize the latent, as the card states it.
pub enum Normalization<'a> {
    /// `(z − shift) · scale`.
    ScaleShift { scaling: f32, shift: f32 },
    /// FLUX.2: 2×2 patchify, then the checkpoint's `bn.running_mean` / `bn.running_var`.
    BatchNorm {
        mean: &'a [f32],
        var: &'a [f32],
        eps: f32,
    },
    /// Qwen-Image / Wan: `(z − latents_mean[c]) / latents_std[c]`, from the config.
    PerChannel { mean: &'a [f32], std: &'a [f32] },
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(values: &[f32]) -> String {
    let items: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    format!("[{}]", items.join(", "))
}

/// The card for an export: relative paths to `encoder.onnx` and `decoder.onnx`, the config's
/// channels and spatial factor, and the family's normalization.
pub fn exported(e: &Exported) -> String {
    let mut s = String::new();
    let what = format!(
        "{}, {} latent channels{}",
        e.class_name,
        e.latent_channels,
        e.family
            .map(|f| format!(" ({} family)", f.name()))
            .unwrap_or_default()
    );
    let dtype = match e.dtype {
        ExportDType::F32 => "fp32",
        ExportDType::F16 => "fp16 weights and I/O",
    };
    let _ = writeln!(
        s,
        "# {what}, exported by `vae-pipeline export` ({dtype}) from\n# {} ({}).",
        e.source.display(),
        e.naming
    );
    let (c, f) = (e.latent_channels, e.spatial_factor);
    let (scaling, shift) = match e.normalization {
        Normalization::BatchNorm { .. } => {
            let _ = writeln!(
                s,
                "# Normalization: 2x2 patchify, then (z - running_mean) / sqrt(running_var + eps) per channel;\n\
                 # stored latents are [{}, H/{}, W/{}].",
                4 * c,
                2 * f,
                2 * f
            );
            (1.0, 0.0)
        }
        Normalization::PerChannel { .. } => {
            let _ = writeln!(
                s,
                "# Normalization: (z - latents_mean[c]) / latents_std[c] per channel; stored latents are \
                 [{c}, H/{f}, W/{f}]."
            );
            (1.0, 0.0)
        }
        Normalization::ScaleShift { scaling, shift } => {
            let _ = writeln!(
                s,
                "# Normalization: (z - {shift:?}) * {scaling:?}; stored latents are [{c}, H/{f}, W/{f}]."
            );
            (scaling, shift)
        }
    };
    let output = match e.output {
        EncoderOutput::Moments => "moments",
        EncoderOutput::Latent => "latent",
    };
    let _ = writeln!(s, "name = {}", quoted(e.name));
    s.push_str("encoder = \"encoder.onnx\"\ndecoder = \"decoder.onnx\"\n");
    let _ = writeln!(s, "input_range = [-1.0, 1.0]\noutput = \"{output}\"");
    let _ = writeln!(s, "latent_channels = {c}");
    let _ = writeln!(s, "spatial_factor = {f}");
    let _ = writeln!(s, "scaling_factor = {scaling:?}");
    let _ = writeln!(s, "shift_factor = {shift:?}");
    if let Normalization::PerChannel { mean, std } = e.normalization {
        let _ = writeln!(
            s,
            "latents_mean = {}\nlatents_std = {}",
            list(mean),
            list(std)
        );
    }
    let _ = writeln!(s, "input_name = \"image\"\noutput_name = \"{output}\"");
    let _ = writeln!(
        s,
        "source = {}",
        quoted(&format!(
            "vae-pipeline export --checkpoint {}",
            e.source.display()
        ))
    );
    if let Normalization::BatchNorm { mean, var, eps } = e.normalization {
        let _ = writeln!(
            s,
            "\n# bn.running_mean / bn.running_var of the checkpoint, channel 4c + 2dy + dx.\n\
             [batch_norm]\npatch_size = 2\neps = {eps:?}\nrunning_mean = {}\nrunning_var = {}",
            list(mean),
            list(var)
        );
    }
    if e.temporal {
        let [encoder_first, encoder_chunk, decoder_first, decoder_chunk] = super::wan_clip::FILES;
        let _ = writeln!(
            s,
            "\n# Clips: the first frame alone, then chunks of {f} frames carrying each causal conv's\n\
             # last frames (diffusers' AutoencoderKLWan._encode / _decode); T = 1 + {f}k frames.\n\
             [temporal]\nframe_factor = {f}\nencoder_first = \"{encoder_first}\"\n\
             encoder_chunk = \"{encoder_chunk}\"\ndecoder_first = \"{decoder_first}\"\n\
             decoder_chunk = \"{decoder_chunk}\"",
            f = super::wan_clip::FRAME_FACTOR
        );
    }
    s
}

/// One graph input or output: name, element type, dims (None = dynamic).
struct Port {
    name: String,
    elem: &'static str,
    dims: Vec<Option<i64>>,
}

fn port(v: &ValueInfoProto) -> Port {
    let (elem, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => (
            match t.elem_type {
                Some(1) => "float32",
                Some(10) => "float16",
                Some(16) => "bfloat16",
                _ => "other",
            },
            t.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(dimension::Value::DimValue(n)) => Some(n),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => ("other", Vec::new()),
    };
    Port {
        name: v.name.clone().unwrap_or_default(),
        elem,
        dims,
    }
}

fn dims_text(dims: &[Option<i64>]) -> String {
    let items: Vec<String> = dims
        .iter()
        .map(|d| d.map_or("?".into(), |n| n.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

/// A draft card for an ONNX encoder made elsewhere: its input and output names, and the output
/// channels and spatial factor measured by running it once on a small gray image. What cannot
/// be read from the graph (input range, normalization) is marked CHECK.
pub fn draft(onnx: &Path) -> Result<String> {
    let bytes = std::fs::read(onnx).with_context(|| format!("cannot read {}", onnx.display()))?;
    let model = ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("{} is not an ONNX model", onnx.display()))?;
    let graph = model
        .graph
        .as_ref()
        .with_context(|| format!("{} has no graph", onnx.display()))?;
    // Old IR versions list initializers among the inputs.
    let initializers: Vec<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let inputs: Vec<Port> = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(&v.name.as_deref().unwrap_or_default()))
        .map(port)
        .collect();
    let outputs: Vec<Port> = graph.output.iter().map(port).collect();
    let image = inputs
        .iter()
        .find(|p| p.dims.len() == 4 && matches!(p.dims[1], Some(3) | None))
        .with_context(|| {
            format!(
                "{}: no input looks like an NCHW RGB image; inputs are {}. A decoder's card entry \
                 is `decoder = \"…\"` in its encoder's card",
                onnx.display(),
                inputs
                    .iter()
                    .map(|p| format!("{} {} {}", p.name, p.elem, dims_text(&p.dims)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    if inputs.len() > 1 {
        bail!(
            "{}: the encoder has {} inputs; vae-pipeline feeds exactly one image tensor",
            onnx.display(),
            inputs.len()
        );
    }
    // Optimum names the moments `latent_parameters`; its older exports and ONNX Runtime's
    // tools output `latent_sample` (one random draw from the posterior).
    let rank = |name: &str| match name {
        "latent_parameters" | "moments" => 0,
        "latent" | "latent_sample" | "latent_dist" => 1,
        _ => 2,
    };
    let output = outputs
        .iter()
        .filter(|p| p.dims.len() == 4 || p.dims.is_empty())
        .min_by_key(|p| rank(&p.name))
        .with_context(|| format!("{}: no 4-D output", onnx.display()))?;

    let f16 = image.elem == "float16";
    let side = image.dims[2].filter(|&n| n > 0).unwrap_or(64) as usize;
    let width = image.dims[3].filter(|&n| n > 0).unwrap_or(side as i64) as usize;
    let mut session = runtime::session(onnx, 1)
        .with_context(|| format!("ONNX Runtime cannot open {}", onnx.display()))?;
    let pixels = vec![0.0; 3 * side * width];
    let (shape, _) = runtime::run_nchw(
        &mut session,
        &image.name,
        &output.name,
        f16,
        &pixels,
        [1, 3, side, width],
    )
    .with_context(|| format!("probing {} with a 1x3x{side}x{width} image", onnx.display()))?;
    let channels = shape[1];
    let factor = side / shape[2].max(1);
    // Only a name says an output is mean ‖ logvar: a `latent` output with an even channel count
    // (TAEF2's 32) is all latent. An unknown name is drafted as latents and marked CHECK.
    let moments = rank(&output.name) == 0;
    let ambiguous = rank(&output.name) == 2 && channels % 2 == 0;
    let latent_channels = if moments { channels / 2 } else { channels };
    let (scale, shift, family) = match latent_channels {
        4 => (0.18215, 0.0, "SD 1.x/2.x (SDXL: scaling_factor = 0.13025)"),
        16 => (1.5305, 0.0609, "SD3 (FLUX.1: scaling 0.3611, shift 0.1159)"),
        _ => (1.0, 0.0, "unknown: measure it with `vae-pipeline report`"),
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Draft card from `vae-pipeline export --inspect {}`.\n\
         # Inputs:  {}\n# Outputs: {}\n\
         # A 1x3x{side}x{width} probe gave {} = {:?}. Check every line marked CHECK.",
        onnx.display(),
        inputs
            .iter()
            .map(|p| format!("{} {} {}", p.name, p.elem, dims_text(&p.dims)))
            .collect::<Vec<_>>()
            .join(", "),
        outputs
            .iter()
            .map(|p| format!("{} {} {}", p.name, p.elem, dims_text(&p.dims)))
            .collect::<Vec<_>>()
            .join(", "),
        output.name,
        shape
    );
    let stem = onnx
        .parent()
        .and_then(|p| p.file_name())
        .or(onnx.file_stem())
        .map_or("vae".into(), |n| n.to_string_lossy().into_owned());
    let _ = writeln!(s, "name = {}", quoted(&stem));
    let _ = writeln!(
        s,
        "encoder = {}",
        quoted(
            &onnx
                .canonicalize()
                .unwrap_or(onnx.to_path_buf())
                .display()
                .to_string()
        )
    );
    s.push_str(
        "input_range = [-1.0, 1.0]  # CHECK: AutoencoderKL exports take [-1, 1]; TAESD-family encoders [0, 1]\n",
    );
    if moments {
        let _ = writeln!(
            s,
            "output = \"moments\"  # {channels} channels: mean and logvar of {latent_channels}"
        );
    } else {
        let note = if output.name == "latent_sample" {
            "  # CHECK: `latent_sample` is one random draw from the posterior, different on \
             every run; `vae-pipeline export` of the checkpoint gives the moments"
                .to_string()
        } else if ambiguous {
            format!(
                "  # CHECK: output {:?} has {channels} channels; if they are mean and logvar, \
                 use output = \"moments\" and latent_channels = {}",
                output.name,
                channels / 2
            )
        } else {
            String::new()
        };
        let _ = writeln!(s, "output = \"latent\"{note}");
    }
    let _ = writeln!(s, "latent_channels = {latent_channels}");
    let _ = writeln!(s, "spatial_factor = {factor}");
    let _ = writeln!(
        s,
        "scaling_factor = {scale:?}  # CHECK: family guess {family}"
    );
    let _ = writeln!(s, "shift_factor = {shift:?}  # CHECK");
    let _ = writeln!(s, "input_name = {}", quoted(&image.name));
    let _ = writeln!(s, "output_name = {}", quoted(&output.name));
    let _ = writeln!(
        s,
        "source = {}",
        quoted(&format!("ONNX file {}", onnx.display()))
    );
    Ok(s)
}
