//! STUB (lead's, replaced by the ffmpeg helper's module at merge).
use anyhow::Result;

pub const VIDEO_EXTENSIONS: &[&str] = &["mp4", "mov", "mkv", "webm", "avi"];

pub fn is_video(head: &[u8]) -> bool {
    head.len() > 8 && &head[4..8] == b"ftyp"
}

pub fn available() -> Result<()> {
    Ok(())
}

pub struct ClipInfo {
    pub width: u32,
    pub height: u32,
    pub rotation: u32,
    pub times: Vec<f64>,
    pub fps: f64,
    pub codec: String,
}

#[derive(Debug)]
pub struct ClipError {
    pub kind: crate::failure::FailureKind,
    pub message: String,
}

pub fn probe(_bytes: &[u8]) -> Result<ClipInfo, ClipError> {
    unimplemented!()
}

pub struct Frame {
    pub index: usize,
    pub time: f64,
    pub image: image::RgbImage,
}

pub struct Frames<'a> {
    _bytes: &'a [u8],
}

impl Iterator for Frames<'_> {
    type Item = Result<Frame, ClipError>;
    fn next(&mut self) -> Option<Self::Item> {
        None
    }
}

pub fn frames(bytes: &[u8]) -> Result<Frames<'_>, ClipError> {
    Ok(Frames { _bytes: bytes })
}
