//! `export`: a VAE checkpoint (safetensors, diffusers or original naming) → encoder and decoder
//! ONNX graphs built here, op for op, plus the model card that goes with them; no PyTorch.
//! `--inspect` drafts a card for an ONNX encoder someone else exported.
//!
//! [`checkpoint`] reads and renames tensors, [`family`] holds configs and normalizations,
//! [`vae`] (AutoencoderKL), [`wan`] (Wan / Qwen-Image; [`wan_clip`] their clip graphs), [`dcae`] (DC-AE) and [`hunyuan`]
//! (HunyuanImage 2.1) build the graphs on
//! [`graph`] (with [`ops`]' layout helpers), [`card`] writes and drafts cards. [`onnx_pb`] is the
//! ONNX protobuf schema as Rust types.

pub mod card;
pub mod checkpoint;
pub mod dcae;
pub mod family;
pub mod graph;
pub mod hunyuan;
#[allow(clippy::all, missing_docs)]
pub mod onnx_pb;
mod ops;
pub mod vae;
pub mod wan;
pub mod wan_clip;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use checkpoint::{Layout, Naming, Weights};
use dcae::DcConfig;
use family::{Architecture, Family, VaeConfig};
use graph::ExportDType;
use hunyuan::HunyuanConfig;
use onnx_pb::ModelProto;
use wan::WanConfig;

use crate::model::EncoderOutput;
use crate::store::write_atomic;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors, or a pipeline
    /// folder with vae/), or a single .safetensors file in diffusers or original naming.
    #[arg(long, required_unless_present = "inspect")]
    pub checkpoint: Option<PathBuf>,
    /// The VAE's diffusers config.json, for a single-file checkpoint (or use --family).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Folder for encoder.onnx, decoder.onnx and card.toml (created if missing).
    #[arg(long, required_unless_present = "inspect")]
    pub out: Option<PathBuf>,
    /// Weights and I/O of the ONNX files.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ExportDType,
    /// The VAE family: its config defaults (single files) and latent normalization.
    #[arg(long, value_enum)]
    pub family: Option<Family>,
    /// Name in the model card [default: the family (--family, or the one the config's scaling
    /// and shift factors identify), else the --out folder's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Print a draft model card for an ONNX encoder exported elsewhere (Optimum, ONNX Runtime's
    /// Stable Diffusion tools) instead of exporting.
    #[arg(long, value_name = "FILE.onnx", conflicts_with_all = ["checkpoint", "out", "config", "family"])]
    pub inspect: Option<PathBuf>,
}

/// What an export wrote.
pub struct ExportSummary {
    pub checkpoint: PathBuf,
    pub naming: checkpoint::Naming,
    pub family: Option<Family>,
    pub encoder: PathBuf,
    pub decoder: PathBuf,
    /// The Wan family's clip graphs (`wan_clip::FILES`), empty for image-only families.
    pub temporal: Vec<PathBuf>,
    pub card: PathBuf,
    pub encoder_parameters: usize,
    pub decoder_parameters: usize,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

impl ExportSummary {
    pub fn print(&self) {
        for w in &self.warnings {
            eprintln!("warning: {w}");
        }
        println!(
            "exported {} ({}{}) in {:.1} s\n  encoder {} ({} parameters)\n  decoder {} ({} parameters)\n  card    {}  (use: --model {})",
            self.checkpoint.display(),
            self.naming,
            self.family
                .map(|f| format!(", family {}", f.name()))
                .unwrap_or_default(),
            self.seconds,
            self.encoder.display(),
            self.encoder_parameters,
            self.decoder.display(),
            self.decoder_parameters,
            self.card.display(),
            self.card.display(),
        );
        for path in &self.temporal {
            println!("  clips   {}", path.display());
        }
    }
}

/// Runs `export` (or `--inspect`, which prints a draft card).
pub fn run(args: &ExportArgs) -> Result<Option<ExportSummary>> {
    if let Some(onnx) = &args.inspect {
        print!("{}", card::draft(onnx)?);
        return Ok(None);
    }
    let (Some(source), Some(out)) = (&args.checkpoint, &args.out) else {
        bail!("export needs --checkpoint and --out (or --inspect FILE.onnx)");
    };
    export(source, out, args).map(Some)
}

fn export(source: &Path, out: &Path, args: &ExportArgs) -> Result<ExportSummary> {
    let start = Instant::now();
    let (weights_path, folder_config) = locate(source)?;
    let architecture = match (
        args.config.as_deref().or(folder_config.as_deref()),
        args.family,
    ) {
        (Some(path), _) => Architecture::load(path)?,
        (None, Some(family)) => family.architecture(),
        (None, None) => bail!(
            "{} is a single file and carries no config: pass --config (the VAE's diffusers \
             config.json) or --family ({})",
            source.display(),
            family_names()
        ),
    };
    let built = match &architecture {
        Architecture::Kl(config) => build_kl(config, &weights_path, args)?,
        Architecture::Wan(config) => build_wan(config, &weights_path, args)?,
        Architecture::Dc(config) => build_dc(config, &weights_path, args)?,
        Architecture::Hunyuan(config) => build_hunyuan(config, &weights_path, args)?,
    };

    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create --out {}", out.display()))?;
    let encoder_path = out.join("encoder.onnx");
    let decoder_path = out.join("decoder.onnx");
    write_atomic(&encoder_path, &graph::encode(&built.encoder))?;
    write_atomic(&decoder_path, &graph::encode(&built.decoder))?;
    let mut temporal = Vec::new();
    for (file, model) in wan_clip::FILES.iter().zip(&built.temporal) {
        let path = out.join(file);
        write_atomic(&path, &graph::encode(model))?;
        temporal.push(path);
    }
    let name = args.name.clone().unwrap_or_else(|| match built.family {
        Some(f) => f.name().to_string(),
        None => out
            .file_name()
            .map_or("vae".into(), |n| n.to_string_lossy().into_owned()),
    });
    let card_path = out.join("card.toml");
    let (class_name, latent_channels, spatial_factor, output, normalization) = match &architecture {
        Architecture::Kl(c) => (
            c.class_name.as_str(),
            c.latent_channels,
            c.spatial_factor(),
            EncoderOutput::Moments,
            match &built.batch_norm {
                Some((mean, var)) => card::Normalization::BatchNorm {
                    mean,
                    var,
                    eps: c.batch_norm_eps,
                },
                None => card::Normalization::ScaleShift {
                    scaling: c.scaling_factor,
                    shift: c.shift_factor.unwrap_or(0.0),
                },
            },
        ),
        Architecture::Wan(c) => (
            c.class_name.as_str(),
            c.z_dim,
            c.spatial_factor(),
            EncoderOutput::Moments,
            card::Normalization::PerChannel {
                mean: &c.latents_mean,
                std: &c.latents_std,
            },
        ),
        Architecture::Dc(c) => (
            c.class_name.as_str(),
            c.latent_channels,
            c.spatial_factor(),
            EncoderOutput::Latent,
            card::Normalization::ScaleShift {
                scaling: c.scaling_factor,
                shift: 0.0,
            },
        ),
        Architecture::Hunyuan(c) => (
            c.class_name.as_str(),
            c.latent_channels,
            c.spatial_factor(),
            EncoderOutput::Moments,
            card::Normalization::ScaleShift {
                scaling: c.scaling_factor,
                shift: 0.0,
            },
        ),
    };
    let text = card::exported(&card::Exported {
        name: &name,
        class_name,
        family: built.family,
        dtype: args.dtype,
        source: &weights_path,
        naming: built.naming,
        latent_channels,
        spatial_factor,
        output,
        normalization,
        temporal: !built.temporal.is_empty(),
    });
    write_atomic(&card_path, text.as_bytes())?;
    Ok(ExportSummary {
        checkpoint: weights_path,
        naming: built.naming,
        family: built.family,
        encoder: encoder_path,
        decoder: decoder_path,
        temporal,
        card: card_path,
        encoder_parameters: vae::parameters(&built.encoder),
        decoder_parameters: vae::parameters(&built.decoder),
        seconds: start.elapsed().as_secs_f64(),
        warnings: built.warnings,
    })
}

/// Both graphs of one checkpoint, and what the card and summary need from the build.
struct Built {
    encoder: ModelProto,
    decoder: ModelProto,
    naming: checkpoint::Naming,
    family: Option<Family>,
    /// FLUX.2: `bn.running_mean` and `bn.running_var`.
    batch_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Wan family: the clip graphs, in `wan_clip::FILES` order.
    temporal: Vec<ModelProto>,
    warnings: Vec<String>,
}

/// `AutoencoderKL` and `AutoencoderKLFlux2`.
fn build_kl(config: &VaeConfig, weights_path: &Path, args: &ExportArgs) -> Result<Built> {
    let family = args.family.or_else(|| Family::guess(config));
    if let Some(f) = args.family {
        if f.is_wan() || (f == Family::Flux2) != config.is_flux2() {
            bail!(
                "--family {} does not match the config's _class_name {}",
                f.name(),
                config.class_name
            );
        }
    }
    let mut warnings = Vec::new();
    if args.dtype == ExportDType::F16 && config.force_upcast {
        warnings.push(if family == Some(Family::Sdxl) {
            "SDXL's original VAE overflows in fp16 (its activations pass 65504, latents turn NaN): \
             export madebyollin/sdxl-vae-fp16-fix instead, or keep --dtype f32. Images that \
             still overflow are reported as `nonfinite` in _errors.jsonl."
                .to_string()
        } else {
            "the config sets force_upcast (diffusers runs this VAE in fp32): fp16 latents may \
             lose precision or overflow; overflowing images are reported as `nonfinite` in \
             _errors.jsonl."
                .to_string()
        });
    }

    let layout = Layout::Kl {
        up_blocks: config.block_out_channels.len(),
    };
    let mut weights = Weights::load(weights_path, layout)?;
    let encoder = vae::encoder(config, &mut weights, args.dtype)?;
    let decoder = vae::decoder(config, &mut weights, args.dtype)?;
    let batch_norm = if config.is_flux2() {
        let channels = config.latent_channels * 4;
        let mean = weights.take("bn.running_mean", &[channels])?;
        let var = weights.take("bn.running_var", &[channels])?;
        weights.skip("bn.num_batches_tracked");
        Some((mean, var))
    } else {
        None
    };
    let naming = weights.naming;
    weights.finish()?;
    Ok(Built {
        encoder,
        decoder,
        naming,
        family,
        batch_norm,
        temporal: Vec::new(),
        warnings,
    })
}

/// `--family` names AutoencoderKL and Wan families only.
fn no_family(args: &ExportArgs, class_name: &str) -> Result<()> {
    match args.family {
        Some(f) => bail!(
            "--family {} does not match the config's _class_name {class_name}",
            f.name()
        ),
        None => Ok(()),
    }
}

/// `AutoencoderKLWan` (Wan 2.1, Wan 2.2) and `AutoencoderKLQwenImage`.
fn build_wan(config: &WanConfig, weights_path: &Path, args: &ExportArgs) -> Result<Built> {
    if args.family.is_some_and(|f| !f.is_wan()) {
        no_family(args, &config.class_name)?;
    }
    let layout = Layout::Wan {
        decoder_group: config.num_res_blocks + 2,
    };
    let weights = Weights::load(weights_path, layout)?;
    if weights.naming == Naming::WanOriginal && config.is_residual {
        bail!(
            "{}: export reads Wan 2.2 checkpoints in diffusers naming only; convert the original \
             file with diffusers' scripts/convert_wan_to_diffusers.py (convert_vae_22), or export \
             the vae/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            weights_path.display()
        );
    }
    let temporal = wan_clip::graphs(config, &weights, args.dtype)?;
    let mut built = build_graphs(
        config,
        weights,
        args,
        args.family,
        wan::encoder,
        wan::decoder,
    )?;
    built.temporal = temporal;
    Ok(built)
}

/// `AutoencoderDC`.
fn build_dc(config: &DcConfig, weights_path: &Path, args: &ExportArgs) -> Result<Built> {
    no_family(args, &config.class_name)?;
    let weights = Weights::load(weights_path, Layout::DiffusersOnly)?;
    build_graphs(config, weights, args, None, dcae::encoder, dcae::decoder)
}

/// `AutoencoderKLHunyuanImage`.
fn build_hunyuan(config: &HunyuanConfig, weights_path: &Path, args: &ExportArgs) -> Result<Built> {
    no_family(args, &config.class_name)?;
    let weights = Weights::load(weights_path, Layout::DiffusersOnly)?;
    build_graphs(
        config,
        weights,
        args,
        None,
        hunyuan::encoder,
        hunyuan::decoder,
    )
}

/// A family's graph builder: config and weights to one ONNX graph.
type GraphBuilder<C> = fn(&C, &mut Weights, ExportDType) -> Result<ModelProto>;

/// Builds both graphs of a family without extra statistics, then checks that every tensor of
/// the checkpoint was used.
fn build_graphs<C>(
    config: &C,
    mut weights: Weights,
    args: &ExportArgs,
    family: Option<Family>,
    encoder: GraphBuilder<C>,
    decoder: GraphBuilder<C>,
) -> Result<Built> {
    let encoder = encoder(config, &mut weights, args.dtype)?;
    let decoder = decoder(config, &mut weights, args.dtype)?;
    let naming = weights.naming;
    weights.finish()?;
    Ok(Built {
        encoder,
        decoder,
        naming,
        family,
        batch_norm: None,
        temporal: Vec::new(),
        warnings: Vec::new(),
    })
}

fn family_names() -> String {
    use clap::ValueEnum;
    Family::value_variants()
        .iter()
        .filter_map(|f| f.to_possible_value())
        .map(|v| v.get_name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The weights file and, for a diffusers folder, its config.json.
fn locate(source: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if source.is_file() {
        return Ok((source.to_path_buf(), None));
    }
    if !source.is_dir() {
        bail!("--checkpoint {} does not exist", source.display());
    }
    // A whole diffusers pipeline folder: its VAE is in vae/.
    let dir = if !source.join("config.json").is_file() && source.join("vae").is_dir() {
        source.join("vae")
    } else {
        source.to_path_buf()
    };
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!(
            "{} has no config.json: pass a diffusers VAE folder, or a .safetensors file with --config or --family",
            dir.display()
        );
    }
    for name in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ] {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok((candidate, Some(config)));
        }
    }
    for name in [
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ] {
        let candidate = dir.join(name);
        if candidate.is_file() {
            // Refused with the reason.
            return Ok((candidate, Some(config)));
        }
    }
    bail!(
        "{} has no diffusion_pytorch_model.safetensors",
        dir.display()
    )
}
