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
}

impl std::fmt::Display for Naming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Naming::Diffusers => "diffusers naming",
            Naming::Original => "original latent-diffusion naming",
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
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A checkpoint's tensors under diffusers names, taken one by one by the graph builder.
pub struct Weights {
    path: PathBuf,
    pub naming: Naming,
    tensors: BTreeMap<String, Tensor>,
    /// diffusers name → the checkpoint's own name, for error messages.
    original: BTreeMap<String, String>,
}

impl Weights {
    /// Reads `path` (a `.safetensors` file) and renames its tensors to diffusers names.
    /// `up_blocks` is the number of decoder up blocks, which the original naming numbers in
    /// reverse.
    pub fn load(path: &Path, up_blocks: usize) -> Result<Self> {
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
        Self::from_tensors(path, raw, up_blocks)
    }

    fn from_tensors(
        path: &Path,
        mut raw: BTreeMap<String, Tensor>,
        up_blocks: usize,
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
        let mut tensors = BTreeMap::new();
        let mut original = BTreeMap::new();
        for (name, mut tensor) in raw {
            let renamed = match naming {
                Naming::Diffusers => legacy_attention(&name),
                Naming::Original => original_to_diffusers(&name, up_blocks),
            };
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
    }
}
