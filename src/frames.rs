//! STUB (lead's, replaced by the frames helper's module at merge).
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FrameExtraction {
    #[default]
    Head,
    Chunk,
    Slide,
    Uniform,
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameOptions {
    pub target_frames: Vec<usize>,
    pub frame_extraction: FrameExtraction,
    pub frame_stride: usize,
    pub frame_sample: usize,
    pub max_frames: usize,
    pub source_fps: Option<f64>,
    pub target_fps: f64,
}

impl Default for FrameOptions {
    fn default() -> Self {
        FrameOptions {
            target_frames: vec![1],
            frame_extraction: FrameExtraction::Head,
            frame_stride: 1,
            frame_sample: 1,
            max_frames: 129,
            source_fps: None,
            target_fps: 16.0,
        }
    }
}

impl FrameOptions {
    pub fn check(&self) -> Result<()> {
        Ok(())
    }
}

pub struct Window {
    pub start: usize,
    pub indices: Vec<usize>,
}

pub fn windows(options: &FrameOptions, times: &[f64], _fps: f64) -> Vec<Window> {
    options
        .target_frames
        .iter()
        .filter(|&&t| t <= times.len())
        .map(|&t| Window {
            start: 0,
            indices: (0..t).collect(),
        })
        .collect()
}
