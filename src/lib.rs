//! vae-pipeline: image folders → normalized VAE latents in Parquet shards.
//!
//! The stages are the modules, in flow order: [`discover`] → [`decode`] → [`resize`] →
//! [`batch`] → [`encode`] → [`write`], wired by [`pipeline`]. [`config`] holds the run's
//! settings, [`model`] the VAE's card, [`runtime`] the ONNX Runtime library, [`failure`] the
//! kinds of input that cannot be used. [`report`] measures how well a VAE reconstructs the
//! images (PSNR, SSIM, latent statistics, an HTML page). [`export`] turns VAE checkpoints into
//! the ONNX files and cards the rest reads. See ARCHITECTURE.md.

pub mod batch;
pub mod bucket;
pub mod captions;
pub mod config;
pub mod decode;
pub mod discover;
pub mod encode;
pub mod export;
pub mod failure;
pub mod model;
pub mod pipeline;
pub mod pool;
pub mod report;
pub mod resize;
pub mod resume;
pub mod runtime;
pub mod sidecar;
pub mod throughput;
pub mod verify;
pub mod write;
