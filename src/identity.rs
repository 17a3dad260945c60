//! A run's identity: exactly what decides the latents, as one struct. Its hash is what a rerun
//! compares with an output folder; run settings (threads, batch size, shard size, device, the
//! paths of `--input` and `--out`) and the data (images, captions, JSON metadata) are not in it.
//! `RunIdentity::new` names every field of `PrecomputeConfig`, so a new field does not compile
//! until it is sorted into the identity or the run settings.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{LatentMode, PrecomputeConfig};
use crate::decode::DecodeOptions;
use crate::format::{StorageDType, FORMAT_VERSION};
use crate::frames::FrameOptions;
use crate::hex::hex;
use crate::model::{BatchNorm, EncoderOutput, ModelCard};
use crate::resize::Framing;

/// The model as far as it decides latents: the card's values and the encoder's bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    pub name: String,
    pub encoder_sha256: String,
    pub input_range: [f32; 2],
    pub output: EncoderOutput,
    pub latent_channels: usize,
    pub spatial_factor: u32,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_norm: Option<BatchNorm>,
    /// Per-channel statistics (Qwen-Image / Wan cards); absent in older identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents_mean: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents_std: Option<Vec<f32>>,
}

impl ModelIdentity {
    pub fn of(card: &ModelCard, encoder_sha256: String) -> Self {
        ModelIdentity {
            name: card.name.clone(),
            encoder_sha256,
            input_range: card.input_range,
            output: card.output,
            latent_channels: card.latent_channels,
            spatial_factor: card.spatial_factor,
            scaling_factor: card.scaling_factor,
            shift_factor: card.shift_factor,
            batch_norm: card.batch_norm.clone(),
            latents_mean: card.latents_mean.clone(),
            latents_std: card.latents_std.clone(),
        }
    }
}

/// Everything that decides a run's rows and latents. Recorded in every shard
/// (`vae_pipeline.identity`) and in `_config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunIdentity {
    pub format_version: u32,
    pub latent_mode: LatentMode,
    pub dtype: StorageDType,
    /// Seeds `sample` mode's noise (and random crops, inside `framing`).
    pub seed: u64,
    pub flip: bool,
    pub dedupe: bool,
    pub model: ModelIdentity,
    /// Size, policy and the resolved bucket list (its contents, not a file name).
    pub framing: Framing,
    pub decode: DecodeOptions,
    /// Clips: the frame windows (absent for images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<FrameOptions>,
}

impl RunIdentity {
    /// The identity of `config` run with `model` and the resolved `framing`.
    pub fn new(config: &PrecomputeConfig, model: ModelIdentity, framing: Framing) -> Self {
        // Every field is named: the identity or the run settings, never forgotten.
        let PrecomputeConfig {
            input: _,
            image_column: _,
            key_column: _,
            caption_column: _,
            out: _,
            model: _,
            size: _,
            resize: _,
            buckets: _,
            min_bucket_reso: _,
            max_bucket_reso: _,
            bucket_res: _,
            bucket_step: _,
            max_aspect: _,
            crop: _,
            no_upscale: _,
            alpha: _,
            min_size: _,
            max_pixels: _,
            reducing_gap: _,
            batch_size: _,
            shard_rows: _,
            threads: _,
            device: _,
            latent_compression: _,
            max_failures: _,
            limit: _,
            captions: _,
            partitions: _,
            partition: _,
            partition_offset: _,
            overwrite: _,
            origin: _,
            latent_mode,
            dtype,
            seed,
            flip,
            dedupe,
            video,
        } = config;
        // model, size, resize and the bucket settings are in `model` and `framing`; alpha and
        // the size limits in `decode`; captions are data (each row's digest), the rest run settings
        // (the Parquet columns pick bytes and keys, which each committed row's sha256 and key check).
        RunIdentity {
            format_version: FORMAT_VERSION,
            latent_mode: *latent_mode,
            dtype: *dtype,
            seed: *seed,
            flip: *flip,
            dedupe: *dedupe,
            model,
            framing,
            decode: config.decode_options(),
            video: video.clone(),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("identity serializes to TOML")
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// sha256 of the TOML form.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.to_toml().as_bytes()))
    }

    /// The settings that differ between two identities, as `name: theirs → ours` lines.
    pub fn differences(&self, theirs: &RunIdentity) -> Vec<String> {
        let flat = |id: &RunIdentity| {
            let value = toml::Value::try_from(id).expect("identity is TOML");
            let mut out = std::collections::BTreeMap::new();
            flatten("", &value, &mut out);
            out
        };
        let (ours, old) = (flat(self), flat(theirs));
        let mut names: Vec<&String> = ours.keys().chain(old.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| ours.get(*n) != old.get(*n))
            .map(|n| {
                let show = |v: Option<&String>| {
                    v.map_or("(none)".to_string(), |v| {
                        if v.len() > 60 {
                            format!("{}…", &v[..v.floor_char_boundary(60)])
                        } else {
                            v.clone()
                        }
                    })
                };
                format!("{n}: {} there, {} now", show(old.get(n)), show(ours.get(n)))
            })
            .collect()
    }
}

fn flatten(
    prefix: &str,
    value: &toml::Value,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}
