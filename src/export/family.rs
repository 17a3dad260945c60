//! VAE configs: a diffusers `config.json` (`AutoencoderKL`, `AutoencoderKLFlux2`) or a
//! family's defaults for single-file checkpoints, and each family's latent normalization.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::dcae::DcConfig;
use super::hunyuan::HunyuanConfig;
use super::wan::WanConfig;

/// The VAE families whose latent normalization is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// Stable Diffusion 1.x (and 2.x): z × 0.18215.
    Sd15,
    /// Stable Diffusion 2.x: the SD 1.x VAE architecture and scale.
    Sd2,
    /// SDXL: z × 0.13025; the original VAE overflows in fp16.
    Sdxl,
    /// Stable Diffusion 3: (z − 0.0609) × 1.5305, 16 channels, no quant convs.
    Sd3,
    /// FLUX.1: (z − 0.1159) × 0.3611, 16 channels, no quant convs.
    Flux1,
    /// FLUX.2 (`AutoencoderKLFlux2`): 32 channels, 2×2 patchify and batch-norm statistics.
    Flux2,
    /// Qwen-Image (`AutoencoderKLQwenImage`): 16 channels, per-channel statistics.
    QwenImage,
    /// Wan 2.1 (`AutoencoderKLWan`): the Qwen-Image architecture and statistics.
    #[value(name = "wan2.1")]
    Wan21,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
            Family::Sd3 => "sd3",
            Family::Flux1 => "flux1",
            Family::Flux2 => "flux2",
            Family::QwenImage => "qwen-image",
            Family::Wan21 => "wan2.1",
        }
    }

    /// Whether the family is a Wan / Qwen-Image VAE rather than an AutoencoderKL.
    pub fn is_wan(self) -> bool {
        matches!(self, Family::QwenImage | Family::Wan21)
    }

    /// The family's published config (the `vae/config.json` of its reference repository), for
    /// a single file that carries none.
    pub fn architecture(self) -> Architecture {
        let kl = |latent_channels, quant, scaling_factor, shift_factor, force_upcast| VaeConfig {
            class_name: "AutoencoderKL".into(),
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels,
            norm_num_groups: 32,
            use_quant_conv: quant,
            use_post_quant_conv: quant,
            mid_block_add_attention: true,
            scaling_factor,
            shift_factor,
            force_upcast,
            batch_norm_eps: 1e-4,
            patch_size: vec![2, 2],
        };
        Architecture::Kl(match self {
            Family::Sd15 | Family::Sd2 => kl(4, true, 0.18215, None, true),
            Family::Sdxl => kl(4, true, 0.13025, None, true),
            Family::Sd3 => kl(16, false, 1.5305, Some(0.0609), true),
            Family::Flux1 => kl(16, false, 0.3611, Some(0.1159), true),
            Family::Flux2 => VaeConfig {
                class_name: "AutoencoderKLFlux2".into(),
                ..kl(32, true, 1.0, None, true)
            },
            Family::QwenImage => {
                return Architecture::Wan(WanConfig::published("AutoencoderKLQwenImage"))
            }
            Family::Wan21 => return Architecture::Wan(WanConfig::published("AutoencoderKLWan")),
        })
    }

    /// The family a config most likely belongs to, from its class, channels and normalization.
    pub fn guess(config: &VaeConfig) -> Option<Family> {
        if config.is_flux2() {
            return Some(Family::Flux2);
        }
        let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
        let shift = config.shift_factor.unwrap_or(0.0);
        match config.latent_channels {
            4 if close(config.scaling_factor, 0.13025) => Some(Family::Sdxl),
            4 if close(config.scaling_factor, 0.18215) => Some(Family::Sd15),
            16 if close(shift, 0.0609) => Some(Family::Sd3),
            16 if close(shift, 0.1159) => Some(Family::Flux1),
            _ => None,
        }
    }
}

/// The fields of a diffusers VAE `config.json` that the export reads; others are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default = "autoencoder_kl")]
    pub class_name: String,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// `AutoencoderKLFlux2` only.
    #[serde(default = "bn_eps")]
    pub batch_norm_eps: f32,
    #[serde(default = "two_by_two")]
    pub patch_size: Vec<usize>,
}

fn autoencoder_kl() -> String {
    "AutoencoderKL".into()
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn yes() -> bool {
    true
}
fn sd_scale() -> f32 {
    0.18215
}
fn bn_eps() -> f32 {
    1e-4
}
fn two_by_two() -> Vec<usize> {
    vec![2, 2]
}

/// A diffusers VAE config, by the architecture its `_class_name` names.
pub enum Architecture {
    /// `AutoencoderKL`, `AutoencoderKLFlux2`.
    Kl(VaeConfig),
    /// `AutoencoderKLWan` (Wan 2.1, Wan 2.2), `AutoencoderKLQwenImage`.
    Wan(WanConfig),
    /// `AutoencoderDC` (Sana's DC-AE and its `-in` / `-mix` variants).
    Dc(DcConfig),
    /// `AutoencoderKLHunyuanImage` (HunyuanImage 2.1).
    Hunyuan(HunyuanConfig),
}

/// The one field that picks the architecture.
#[derive(Deserialize)]
struct ClassName {
    #[serde(rename = "_class_name", default = "autoencoder_kl")]
    class_name: String,
}

impl Architecture {
    /// Reads a diffusers `config.json` and parses it as its `_class_name` says.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read VAE config {}", path.display()))?;
        let not_config = || format!("{} is not a diffusers VAE config.json", path.display());
        let class: ClassName = serde_json::from_str(&text).with_context(not_config)?;
        let at = || format!("VAE config {}", path.display());
        match class.class_name.as_str() {
            "AutoencoderKLWan" | "AutoencoderKLQwenImage" => {
                Ok(Architecture::Wan(WanConfig::parse(&text).with_context(at)?))
            }
            "AutoencoderDC" => Ok(Architecture::Dc(DcConfig::parse(&text).with_context(at)?)),
            "AutoencoderKLHunyuanImage" => Ok(Architecture::Hunyuan(
                HunyuanConfig::parse(&text).with_context(at)?,
            )),
            _ => {
                let config: VaeConfig = serde_json::from_str(&text).with_context(not_config)?;
                config.check().with_context(at)?;
                Ok(Architecture::Kl(config))
            }
        }
    }
}

impl VaeConfig {
    pub fn is_flux2(&self) -> bool {
        self.class_name == "AutoencoderKLFlux2"
    }

    /// Pixels per latent along each side: every down block but the last halves the image.
    pub fn spatial_factor(&self) -> u32 {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The architecture the graph builder implements, or what is not supported.
    fn check(&self) -> Result<()> {
        if !matches!(
            self.class_name.as_str(),
            "AutoencoderKL" | "AutoencoderKLFlux2"
        ) {
            bail!(
                "_class_name {:?}: export builds AutoencoderKL, AutoencoderKLFlux2, \
                 AutoencoderKLWan, AutoencoderKLQwenImage, AutoencoderDC and \
                 AutoencoderKLHunyuanImage",
                self.class_name
            );
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("down block type {t:?}: export builds DownEncoderBlock2D");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("up block type {t:?}: export builds UpDecoderBlock2D");
        }
        if self.act_fn != "silu" {
            bail!("act_fn {:?}: export builds silu", self.act_fn);
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            bail!(
                "block_out_channels {c} is not a multiple of norm_num_groups {}",
                self.norm_num_groups
            );
        }
        if self.is_flux2() && self.patch_size != [2, 2] {
            bail!(
                "patch_size {:?}: FLUX.2 latents are patchified 2×2",
                self.patch_size
            );
        }
        Ok(())
    }
}
