//! vae-pipeline: image folders → normalized VAE latents in Parquet shards.
//!
//! The stages are the modules, in flow order: [`source`] → [`decode`] → [`resize`] →
//! [`batch`] → [`encode`] → [`write`] (through a [`store`]), checked by [`plan`] and wired by
//! [`pipeline`], run once per scope (the whole set or each partition) by [`set`]. [`format`]
//! is the shard contract every reader and writer shares, [`identity`]
//! what decides the latents, [`config`] the run's settings, [`model`] the VAE's card,
//! [`runtime`] the ONNX Runtime library, [`failure`] the kinds of input that cannot be used. [`report`] measures how well a VAE reconstructs the
//! images (PSNR, SSIM, latent statistics, an HTML page). [`export`] turns VAE checkpoints into
//! the ONNX files and cards the rest reads. See ARCHITECTURE.md.

pub mod batch;
pub mod bucket;
pub mod captions;
pub mod config;
pub mod convert;
pub mod decode;
pub mod doctor;
pub mod encode;
pub mod export;
pub mod failure;
pub mod format;
pub mod frames;
pub mod hex;
pub mod host;
pub mod identity;
pub mod layout;
pub mod lease;
pub mod lock;
pub mod model;
pub mod object;
pub mod partition_files;
pub mod pipeline;
pub mod plan;
pub mod pool;
pub mod progress;
pub mod report;
pub mod resize;
pub mod resume;
pub mod rows;
pub mod runtime;
pub mod set;
pub mod shard_file;
pub mod shards;
pub mod sidecar;
pub mod source;
pub mod store;
pub mod summary;
pub mod temporal;
pub mod throughput;
pub mod verify;
pub mod video;
pub mod write;
