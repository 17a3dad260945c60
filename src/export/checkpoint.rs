//! Checkpoints: reads a VAE's tensors from safetensors (never from pickles), detects whether
//! they use diffusers' or the original latent-diffusion naming, and hands on `Weights` under
//! diffusers names that the graph builder takes one by one, so that a missing, mis-shaped or
//! left-over tensor is an error naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

/// Key naming of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// diffusers' `AutoencoderKL` state dict (`encoder.down_blocks.0.resnets.0.norm1.weight`).
    Diffusers,
    /// The original latent-diffusion / single-file naming (`encoder.down.0.block.0.norm1.weight`),
    /// as in `sdxl_vae.safetensors`, `vae-ft-mse-840000-ema-pruned.safetensors` and BFL's `ae`.
    Original,
    /// The original Wan 2.1 naming (`encoder.downsamples.0.residual.0.gamma`), as in
    /// `Wan2.1_VAE.pth` and ComfyUI's `wan_2.1_vae.safetensors` / `qwen_image_vae.safetensors`.
    WanOriginal,
}

/// What the original namings need to know of the architecture to number blocks as diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// AutoencoderKL: its decoder up blocks, which the original naming numbers in reverse.
    Kl { up_blocks: usize },
    /// Wan 2.1 / Qwen-Image: entries per decoder block in the flat `decoder.upsamples.N` list
    /// (its resnets, then its upsampler).
    Wan { decoder_group: usize },
    /// Families read in diffusers naming only.
    DiffusersOnly,
}

impl std::fmt::Display for Naming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Naming::Diffusers => "diffusers naming",
            Naming::Original => "original latent-diffusion naming",
            Naming::WanOriginal => "original Wan naming",
        })
    }
}

/// File extensions of PyTorch pickles.
const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

/// A pickle refused, with the reason and the way out.
fn pickle_refusal(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is a PyTorch pickle, which vae-pipeline does not read: unpickling runs whatever code \
         the file carries, so an untrusted .ckpt/.pt/.bin can take over the machine. Use the \
         .safetensors version of this VAE (model hubs publish one for almost every VAE), or \
         convert it on a machine you trust: `safetensors.torch.save_file(torch.load(path, \
         weights_only=True)[\"state_dict\"], \"vae.safetensors\")`",
        path.display()
    )
}

/// One tensor, converted to f32 (checkpoints come in f32, f16 or bf16).
#[derive(Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A checkpoint's tensors under diffusers names, taken one by one by the graph builder.
#[derive(Clone)]
pub struct Weights {
    path: PathBuf,
    pub naming: Naming,
    tensors: BTreeMap<String, Tensor>,
    /// diffusers name → the checkpoint's own name, for error messages.
    original: BTreeMap<String, String>,
}

impl Weights {
    /// Reads `path` (a `.safetensors` file) and renames its tensors to diffusers names;
    /// `layout` says how the original namings number the blocks.
    pub fn load(path: &Path, layout: Layout) -> Result<Self> {
        let is_pickle = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_pickle {
            return Err(pickle_refusal(path));
        }
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let file = match SafeTensors::deserialize(&bytes) {
            Ok(file) => file,
            // A renamed pickle: protocol 2+ starts with 0x80, torch's zip format with "PK".
            Err(_) if bytes.first() == Some(&0x80) || bytes.starts_with(b"PK\x03\x04") => {
                return Err(pickle_refusal(path));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{} is not a valid safetensors file", path.display()))
            }
        };
        let mut raw = BTreeMap::new();
        for (name, view) in file.iter() {
            raw.insert(name.to_string(), to_f32(name, &view, path)?);
        }
        Self::from_tensors(path, raw, layout)
    }

    fn from_tensors(
        path: &Path,
        mut raw: BTreeMap<String, Tensor>,
        layout: Layout,
    ) -> Result<Self> {
        // A whole Stable Diffusion checkpoint: its VAE is `first_stage_model.*`.
        const FULL_SD: &str = "first_stage_model.";
        if raw.keys().any(|k| k.starts_with(FULL_SD)) {
            raw = raw
                .into_iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(FULL_SD)?.to_string(), t)))
                .collect();
        }
        // Training-only modules of latent-diffusion VAE checkpoints (LPIPS, discriminator).
        raw.retain(|k, _| !k.starts_with("loss."));
        let naming = detect(raw.keys().map(String::as_str)).with_context(|| {
            format!(
                "{}: cannot tell the key naming of this checkpoint",
                path.display()
            )
        })?;
        let rename = |name: &str| match (naming, layout) {
            (Naming::Diffusers, _) => Ok(legacy_attention(name)),
            (Naming::Original, Layout::Kl { up_blocks }) => {
                Ok(original_to_diffusers(name, up_blocks))
            }
            (Naming::WanOriginal, Layout::Wan { decoder_group }) => {
                Ok(wan_original_to_diffusers(name, decoder_group))
            }
            _ => Err(anyhow::anyhow!(
                "{}: the checkpoint is in {naming}, which this config's architecture does not \
                 come in; export its diffusers folder",
                path.display()
            )),
        };
        let mut tensors = BTreeMap::new();
        let mut original = BTreeMap::new();
        for (name, mut tensor) in raw {
            let renamed = rename(&name)?;
            if renamed.contains(".attentions.0.to_") && tensor.shape.len() == 4 {
                // 1×1 conv [C, C, 1, 1] in the original naming; a linear [C, C] in diffusers.
                tensor.shape.truncate(2);
            }
            original.insert(renamed.clone(), name);
            tensors.insert(renamed, tensor);
        }
        Ok(Weights {
            path: path.to_path_buf(),
            naming,
            tensors,
            original,
        })
    }

    /// Takes tensor `name` (diffusers naming), which must have `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(tensor) = self.tensors.remove(name) else {
            bail!(
                "checkpoint {} ({}) has no tensor {}: it is not the VAE the config describes \
                 (or not a VAE)",
                self.path.display(),
                self.naming,
                self.display_name(name)
            );
        };
        if tensor.shape != shape {
            bail!(
                "checkpoint {}: tensor {} has shape {:?}, but the config needs {:?}",
                self.path.display(),
                self.display_name(name),
                tensor.shape,
                shape
            );
        }
        Ok(tensor.values)
    }

    /// Drops `name` if present: buffers the export does not need (`bn.num_batches_tracked`).
    pub fn skip(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Every tensor must have been taken: a left-over one means the config does not describe
    /// this checkpoint.
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self.tensors.keys().map(|k| self.display_name(k)).collect();
        let shown = names.len().min(8);
        bail!(
            "checkpoint {} ({}) has {} tensor(s) that the config does not use: {}{}. Is the \
             config (block_out_channels, layers_per_block, quant convs) the one of this VAE?",
            self.path.display(),
            self.naming,
            names.len(),
            names[..shown].join(", "),
            if names.len() > shown { ", …" } else { "" }
        )
    }

    /// `name`, plus the checkpoint's own name when it differs.
    fn display_name(&self, name: &str) -> String {
        match self.original.get(name) {
            Some(o) if o != name => format!("{name} (`{o}` in the checkpoint)"),
            _ => name.to_string(),
        }
    }
}

fn to_f32(name: &str, view: &safetensors::tensor::TensorView, path: &Path) -> Result<Tensor> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        // Batch-norm's `num_batches_tracked` counter; never used by the graphs.
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!(
            "checkpoint {}: tensor {name} has element type {other:?}; VAE weights are F32, F16 or BF16",
            path.display()
        ),
    };
    Ok(Tensor {
        shape: view.shape().to_vec(),
        values,
    })
}

/// Which naming `keys` use: original latent-diffusion names have `encoder.down.N` /
/// `encoder.mid.` / `decoder.up.N`; diffusers names have `down_blocks` / `mid_block`.
fn detect<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Result<Naming> {
    let any = |pat: &[&str]| keys.clone().any(|k| pat.iter().any(|p| k.contains(p)));
    let original = any(&[
        "encoder.down.",
        "encoder.mid.",
        "decoder.up.",
        "decoder.mid.",
    ]);
    let diffusers = any(&[".down_blocks.", ".mid_block.", ".up_blocks."]);
    let wan = any(&[
        "encoder.downsamples.",
        "decoder.upsamples.",
        "encoder.middle.",
    ]);
    if wan {
        if original || diffusers {
            bail!("it mixes original Wan (`encoder.downsamples.N`) names with other namings");
        }
        return Ok(Naming::WanOriginal);
    }
    match (original, diffusers) {
        (true, false) => Ok(Naming::Original),
        (false, true) => Ok(Naming::Diffusers),
        (true, true) => bail!(
            "it mixes original (`encoder.down.N`) and diffusers (`encoder.down_blocks.N`) names"
        ),
        (false, false) => bail!(
            "it has neither `encoder.down_blocks.*` (diffusers) nor `encoder.down.*` (original) \
             tensors; is it a VAE? First keys: {}",
            keys.take(5).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// diffusers before 0.14 saved the mid-block attention as `query`/`key`/`value`/`proj_attn`
/// (e.g. stabilityai/sd-vae-ft-mse); diffusers itself still renames them on load.
fn legacy_attention(name: &str) -> String {
    const RENAMES: [(&str, &str); 4] = [
        (".attentions.0.query.", ".attentions.0.to_q."),
        (".attentions.0.key.", ".attentions.0.to_k."),
        (".attentions.0.value.", ".attentions.0.to_v."),
        (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
    ];
    for (old, new) in RENAMES {
        if name.contains(old) {
            return name.replacen(old, new, 1);
        }
    }
    name.to_string()
}

/// The original Wan 2.1 → diffusers rename, the table of diffusers'
/// `scripts/convert_wan_to_diffusers.py` (`convert_vae`) for any block count:
///
/// | original | diffusers |
/// |---|---|
/// | `conv1.*`, `conv2.*` | `quant_conv.*`, `post_quant_conv.*` |
/// | `{encoder,decoder}.conv1.*` | `….conv_in.*` |
/// | `{encoder,decoder}.head.0.gamma`, `….head.2.*` | `….norm_out.gamma`, `….conv_out.*` |
/// | `….middle.0.*`, `….middle.2.*` | `….mid_block.resnets.0.*`, `….mid_block.resnets.1.*` |
/// | `….middle.1.*` | `….mid_block.attentions.0.*` |
/// | `encoder.downsamples.K.*` | `encoder.down_blocks.K.*` |
/// | `decoder.upsamples.K.*` (G entries per block) | `decoder.up_blocks.(K/G).resnets.(K%G).*`, the last of each block `….upsamplers.0.*` |
/// | in resnets: `residual.{0,2,3,6}.*`, `shortcut.*` | `norm1`, `conv1`, `norm2`, `conv2`, `conv_shortcut` |
pub fn wan_original_to_diffusers(name: &str, decoder_group: usize) -> String {
    const PREFIXES: [(&str, &str); 8] = [
        ("conv1.", "quant_conv."),
        ("conv2.", "post_quant_conv."),
        ("encoder.conv1.", "encoder.conv_in."),
        ("decoder.conv1.", "decoder.conv_in."),
        ("encoder.head.0.", "encoder.norm_out."),
        ("encoder.head.2.", "encoder.conv_out."),
        ("decoder.head.0.", "decoder.norm_out."),
        ("decoder.head.2.", "decoder.conv_out."),
    ];
    for (old, new) in PREFIXES {
        if let Some(rest) = name.strip_prefix(old) {
            return format!("{new}{rest}");
        }
    }
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        [side, "middle", i, rest @ ..] => {
            let rest = rest.join(".");
            match *i {
                "0" => format!("{side}.mid_block.resnets.0.{}", wan_residual(&rest)),
                "1" => format!("{side}.mid_block.attentions.0.{rest}"),
                "2" => format!("{side}.mid_block.resnets.1.{}", wan_residual(&rest)),
                _ => name.to_string(),
            }
        }
        ["encoder", "downsamples", k, rest @ ..] => {
            format!("encoder.down_blocks.{k}.{}", wan_residual(&rest.join(".")))
        }
        ["decoder", "upsamples", k, rest @ ..] if decoder_group > 0 => {
            let Ok(k) = k.parse::<usize>() else {
                return name.to_string();
            };
            let (block, entry) = (k / decoder_group, k % decoder_group);
            let rest = rest.join(".");
            if entry + 1 < decoder_group {
                format!(
                    "decoder.up_blocks.{block}.resnets.{entry}.{}",
                    wan_residual(&rest)
                )
            } else {
                format!("decoder.up_blocks.{block}.upsamplers.0.{rest}")
            }
        }
        _ => name.to_string(),
    }
}

/// A Wan resnet's `nn.Sequential` indices → diffusers' names.
fn wan_residual(rest: &str) -> String {
    const RENAMES: [(&str, &str); 5] = [
        ("residual.0.", "norm1."),
        ("residual.2.", "conv1."),
        ("residual.3.", "norm2."),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ];
    for (old, new) in RENAMES {
        if let Some(tail) = rest.strip_prefix(old) {
            return format!("{new}{tail}");
        }
    }
    rest.to_string()
}

/// The original → diffusers rename, the same table as diffusers' `convert_ldm_vae_checkpoint`
/// and `convert_flux2_vae_checkpoint_to_diffusers`:
///
/// | original | diffusers |
/// |---|---|
/// | `encoder.down.I.block.J.*` | `encoder.down_blocks.I.resnets.J.*` |
/// | `encoder.down.I.downsample.conv.*` | `encoder.down_blocks.I.downsamplers.0.conv.*` |
/// | `decoder.up.K.block.J.*` | `decoder.up_blocks.(N-1-K).resnets.J.*` (N up blocks, numbered in reverse) |
/// | `decoder.up.K.upsample.conv.*` | `decoder.up_blocks.(N-1-K).upsamplers.0.conv.*` |
/// | `*.mid.block_1.*`, `*.mid.block_2.*` | `*.mid_block.resnets.0.*`, `*.mid_block.resnets.1.*` |
/// | `*.mid.attn_1.norm.*` | `*.mid_block.attentions.0.group_norm.*` |
/// | `*.mid.attn_1.{q,k,v}.*` (1×1 conv) | `*.mid_block.attentions.0.to_{q,k,v}.*` (linear) |
/// | `*.mid.attn_1.proj_out.*` (1×1 conv) | `*.mid_block.attentions.0.to_out.0.*` (linear) |
/// | `*.nin_shortcut.*` | `*.conv_shortcut.*` |
/// | `*.norm_out.*` | `*.conv_norm_out.*` |
/// | `encoder.quant_conv.*`, `decoder.post_quant_conv.*` (FLUX.2) | `quant_conv.*`, `post_quant_conv.*` |
/// | `conv_in`, `conv_out`, `quant_conv`, `post_quant_conv`, `bn.*` | unchanged |
pub fn original_to_diffusers(name: &str, up_blocks: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out: Vec<String> = Vec::with_capacity(parts.len() + 2);
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let next = parts.get(i + 1).copied();
        let index = next.and_then(|n| n.parse::<usize>().ok());
        match (p, next, index) {
            ("encoder", Some("quant_conv"), _) | ("decoder", Some("post_quant_conv"), _)
                if i == 0 => {}
            ("down", _, Some(n)) => {
                out.push("down_blocks".into());
                out.push(n.to_string());
                i += 1;
            }
            ("up", _, Some(n)) if n < up_blocks => {
                out.push("up_blocks".into());
                out.push((up_blocks - 1 - n).to_string());
                i += 1;
            }
            ("block", _, Some(n)) => {
                out.push("resnets".into());
                out.push(n.to_string());
                i += 1;
            }
            ("downsample", _, _) => out.extend(["downsamplers".into(), "0".into()]),
            ("upsample", _, _) => out.extend(["upsamplers".into(), "0".into()]),
            ("mid", _, _) => out.push("mid_block".into()),
            ("block_1", _, _) => out.extend(["resnets".into(), "0".into()]),
            ("block_2", _, _) => out.extend(["resnets".into(), "1".into()]),
            ("attn_1", _, _) => out.extend(["attentions".into(), "0".into()]),
            ("nin_shortcut", _, _) => out.push("conv_shortcut".into()),
            ("norm_out", _, _) => out.push("conv_norm_out".into()),
            _ if i > 0 && parts[i - 1] == "attn_1" => out.push(
                match p {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    other => other,
                }
                .into(),
            ),
            _ => out.push(p.into()),
        }
        i += 1;
    }
    out.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_map_like_diffusers_converter() {
        let cases = [
            (
                "encoder.down.0.block.1.norm1.weight",
                "encoder.down_blocks.0.resnets.1.norm1.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "decoder.up.3.block.2.conv2.weight",
                "decoder.up_blocks.0.resnets.2.conv2.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "encoder.mid.block_2.norm2.bias",
                "encoder.mid_block.resnets.1.norm2.bias",
            ),
            (
                "decoder.mid.attn_1.norm.weight",
                "decoder.mid_block.attentions.0.group_norm.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
            ),
            (
                "encoder.mid.attn_1.k.weight",
                "encoder.mid_block.attentions.0.to_k.weight",
            ),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
            ("encoder.quant_conv.weight", "quant_conv.weight"),
            ("decoder.post_quant_conv.bias", "post_quant_conv.bias"),
            ("quant_conv.weight", "quant_conv.weight"),
            ("bn.running_var", "bn.running_var"),
            ("decoder.conv_in.weight", "decoder.conv_in.weight"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(original_to_diffusers(original, 4), diffusers, "{original}");
        }
    }

    #[test]
    fn legacy_diffusers_attention_is_renamed() {
        assert_eq!(
            legacy_attention("encoder.mid_block.attentions.0.proj_attn.weight"),
            "encoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            legacy_attention("decoder.mid_block.attentions.0.query.bias"),
            "decoder.mid_block.attentions.0.to_q.bias"
        );
    }

    #[test]
    fn naming_is_detected_from_keys() {
        let original = ["encoder.down.0.block.0.conv1.weight", "quant_conv.weight"];
        assert_eq!(detect(original.into_iter()).unwrap(), Naming::Original);
        let diffusers = ["encoder.down_blocks.0.resnets.0.conv1.weight"];
        assert_eq!(detect(diffusers.into_iter()).unwrap(), Naming::Diffusers);
        assert!(detect(["model.diffusion_model.x"].into_iter()).is_err());
        let wan = ["encoder.downsamples.0.residual.0.gamma", "conv1.weight"];
        assert_eq!(detect(wan.into_iter()).unwrap(), Naming::WanOriginal);
    }

    #[test]
    fn wan_names_map_like_diffusers_converter() {
        // Entries of `convert_vae` in diffusers' scripts/convert_wan_to_diffusers.py (2 resnets
        // per encoder block, 3 + an upsampler per decoder block: group 4).
        let cases = [
            ("conv1.weight", "quant_conv.weight"),
            ("conv2.bias", "post_quant_conv.bias"),
            ("encoder.conv1.weight", "encoder.conv_in.weight"),
            ("decoder.head.0.gamma", "decoder.norm_out.gamma"),
            ("encoder.head.2.bias", "encoder.conv_out.bias"),
            (
                "encoder.middle.2.residual.6.weight",
                "encoder.mid_block.resnets.1.conv2.weight",
            ),
            (
                "decoder.middle.1.to_qkv.weight",
                "decoder.mid_block.attentions.0.to_qkv.weight",
            ),
            (
                "encoder.downsamples.3.residual.3.gamma",
                "encoder.down_blocks.3.norm2.gamma",
            ),
            (
                "encoder.downsamples.5.time_conv.bias",
                "encoder.down_blocks.5.time_conv.bias",
            ),
            (
                "decoder.upsamples.5.residual.2.bias",
                "decoder.up_blocks.1.resnets.1.conv1.bias",
            ),
            (
                "decoder.upsamples.4.shortcut.weight",
                "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "decoder.upsamples.7.resample.1.weight",
                "decoder.up_blocks.1.upsamplers.0.resample.1.weight",
            ),
            (
                "decoder.upsamples.3.time_conv.weight",
                "decoder.up_blocks.0.upsamplers.0.time_conv.weight",
            ),
            (
                "decoder.upsamples.14.residual.0.gamma",
                "decoder.up_blocks.3.resnets.2.norm1.gamma",
            ),
        ];
        for (original, diffusers) in cases {
            assert_eq!(
                wan_original_to_diffusers(original, 4),
                diffusers,
                "{original}"
            );
        }
    }
}
