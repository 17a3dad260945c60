//! Rows: takes a loaded `Sample`, hands on its row: the decoded, resized window (`Prepared`) and
//! what the shard records beside the latent (`RowMeta`), or a `Failure`. What `precompute` and
//! `report` both run per image; also the row's metadata digest, which tells a resuming run
//! whether a committed row's caption and metadata columns are still current.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::batch::{RowMeta, RowPixels};
use crate::decode::{decode_sample, DecodeOptions};
use crate::failure::{Failure, FailureKind};
use crate::format::WindowMeta;
use crate::frames::{self, FrameOptions};
use crate::resize::{prepare, Framing, Geometry, Prepared};
use crate::sidecar::{Scalar, SidecarSchema};
use crate::source::Sample;
use crate::video::{self, ClipError, ClipInfo};

/// Identifies a row's caption and metadata columns (names, types and values): 16 bytes of
/// sha256. A committed row is current when its source hash and this digest both match.
pub type MetadataDigest = [u8; 16];

/// The digest of a caption and named metadata values.
pub fn metadata_digest<'a>(
    caption: Option<&str>,
    columns: impl Iterator<Item = (&'a str, Option<&'a Scalar>)>,
) -> MetadataDigest {
    let mut h = Sha256::new();
    let mut text = |tag: u8, bytes: &[u8]| {
        h.update([tag]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    match caption {
        Some(c) => text(1, c.as_bytes()),
        None => text(0, b""),
    }
    for (name, value) in columns {
        text(2, name.as_bytes());
        match value {
            None => text(0, b""),
            Some(Scalar::Bool(b)) => text(3, &[u8::from(*b)]),
            Some(Scalar::Int(v)) => text(4, &v.to_le_bytes()),
            Some(Scalar::Float(v)) => text(5, &v.to_bits().to_le_bytes()),
            Some(Scalar::Text(s)) => text(6, s.as_bytes()),
        }
    }
    let full: [u8; 32] = h.finalize().into();
    full[..16].try_into().expect("16 bytes")
}

/// What turns a sample into a row, built once per run.
pub struct RowMaker {
    pub framing: Framing,
    pub decode: DecodeOptions,
    /// `--captions`: overrides the samples' own captions.
    pub captions: HashMap<String, String>,
    /// The run's metadata columns.
    pub sidecars: SidecarSchema,
    /// A clip run's frame windows (None: images).
    pub video: Option<FrameOptions>,
}

/// One window a clip gives, before any frame is decoded: its row key and what it holds.
pub struct PlannedWindow {
    pub key: String,
    pub window: WindowMeta,
}

/// A row's caption and metadata values, before decoding.
pub struct RowText {
    pub caption: Option<String>,
    pub extra: Vec<Option<Scalar>>,
}

impl RowMaker {
    /// A maker with no captions file and no metadata columns (`report`).
    pub fn plain(framing: Framing, decode: DecodeOptions) -> Self {
        RowMaker {
            framing,
            decode,
            captions: HashMap::new(),
            sidecars: SidecarSchema::default(),
            video: None,
        }
    }

    /// The sample's caption (the captions file wins) and metadata values in column order.
    pub fn text(&self, sample: &Sample) -> RowText {
        RowText {
            caption: self
                .captions
                .get(&sample.key)
                .cloned()
                .or_else(|| sample.caption.clone()),
            extra: self.sidecars.values(sample.metadata.object()),
        }
    }

    pub fn digest(&self, text: &RowText) -> MetadataDigest {
        metadata_digest(
            text.caption.as_deref(),
            self.sidecars
                .fields
                .iter()
                .map(|(c, _, _)| c.as_str())
                .zip(text.extra.iter().map(Option::as_ref)),
        )
    }

    /// Where a `w`×`h` image (or clip) goes: its window, or `too_small` when no bucket fits
    /// without upscaling, `too_large` when the resized size is above `--max-pixels`.
    fn geometry(&self, key: &str, w: u32, h: u32) -> Result<Geometry, Failure> {
        let fail = |kind, message: String| Failure::new(key, kind, message);
        let geometry = self.framing.geometry(key, w, h).ok_or_else(|| {
            fail(
                FailureKind::TooSmall,
                format!("{w}x{h}: no bucket fits without upscaling (--no-upscale)"),
            )
        })?;
        let (tw, th) = geometry.resized;
        if u64::from(tw) * u64::from(th) > self.decode.max_pixels {
            return Err(fail(
                FailureKind::TooLarge,
                format!(
                    "{w}x{h} resized for a {}x{} window is {tw}x{th}, above --max-pixels {}",
                    geometry.target.0, geometry.target.1, self.decode.max_pixels
                ),
            ));
        }
        Ok(geometry)
    }

    /// Decodes and resizes the sample into its row.
    pub fn prepare(&self, sample: Sample, text: RowText) -> Result<(Prepared, RowMeta), Failure> {
        let key = sample.key.as_str();
        let fail = |kind, message: String| Failure::new(key, kind, message);
        let hint = |w, h| self.framing.geometry(key, w, h).map(|g| g.resized);
        let decoded = decode_sample(key, &sample.bytes.bytes, &self.decode, Some(&hint))?;
        let (orig_width, orig_height) = (decoded.width, decoded.height);
        let geometry = self.geometry(key, orig_width, orig_height)?;
        let image = prepare(decoded.rgb, geometry)
            .map_err(|e| fail(FailureKind::Corrupt, format!("{e:#}")))?;
        let meta = RowMeta {
            key: sample.key.clone(),
            source_sha256: sample.bytes.sha256,
            orig_width: orig_width as i32,
            orig_height: orig_height as i32,
            crop_top: geometry.offset.1,
            crop_left: geometry.offset.0,
            width: image.crop_width as i32,
            height: image.crop_height as i32,
            caption: text.caption,
            extra: text.extra,
            window: None,
        };
        Ok((image, meta))
    }

    /// A clip's windows (`frames::windows` over its frame times, from a demux pass without
    /// decoding), each keyed `<clip key>/<start:05>-<count:03>`: what a resuming run checks
    /// before it decodes anything.
    pub fn clip_windows(&self, sample: &Sample) -> Result<(ClipInfo, Vec<PlannedWindow>), Failure> {
        let options = self.video.as_ref().expect("a clip run has frame options");
        let key = sample.key.as_str();
        if sample.bytes.bytes.is_empty() {
            return Err(Failure::new(key, FailureKind::Empty, "zero-byte file"));
        }
        if !video::is_video(&sample.bytes.bytes) {
            return Err(Failure::new(
                key,
                FailureKind::Unsupported,
                "not a video clip (MP4, MOV, Matroska/WebM or AVI); a clip run encodes clips only, \
                 run images separately",
            ));
        }
        let info = video::probe(&sample.bytes.bytes).map_err(|e| clip_failure(key, e))?;
        let windows = frames::windows(options, info.times.len());
        if windows.is_empty() {
            return Err(Failure::new(
                key,
                FailureKind::TooSmall,
                format!(
                    "{} frames give no window of {:?} frames ({} extraction)",
                    info.times.len(),
                    options.target_frames,
                    options.extraction.as_str()
                ),
            ));
        }
        let fps = options.window_fps(info.fps);
        let planned = windows
            .into_iter()
            .map(|w| PlannedWindow {
                key: format!("{key}/{}", w.suffix()),
                window: WindowMeta {
                    start: w.start as i32,
                    count: w.indices.len() as i32,
                    indices: w.indices.iter().map(|&i| i as i32).collect(),
                    source_fps: info.fps,
                    fps,
                },
            })
            .collect();
        Ok((info, planned))
    }

    /// Decodes the frames `windows` need (streamed: a frame no window needs is dropped at
    /// once, decoding stops after the last needed one), resizes each once into the clip's
    /// window (one geometry for the whole clip: the same bucket and crop for every frame), and
    /// hands on one row per window; overlapping windows share their frames.
    pub fn prepare_clip(
        &self,
        sample: &Sample,
        text: &RowText,
        info: &ClipInfo,
        windows: Vec<PlannedWindow>,
    ) -> Result<Vec<(RowPixels, RowMeta)>, Failure> {
        let key = sample.key.as_str();
        let fail = |kind, message: String| Failure::new(key, kind, message);
        let (width, height) = (info.width, info.height);
        let geometry = self.geometry(key, width, height)?;
        let needed: BTreeSet<usize> = windows
            .iter()
            .flat_map(|w| w.window.indices.iter().map(|&i| i as usize))
            .collect();
        let last = *needed.last().expect("a window holds frames");
        let mut resized: HashMap<usize, Arc<Prepared>> = HashMap::with_capacity(needed.len());
        for frame in video::frames(&sample.bytes.bytes).map_err(|e| clip_failure(key, e))? {
            let frame = frame.map_err(|e| clip_failure(key, e))?;
            if needed.contains(&frame.index) {
                let image = prepare(frame.image, geometry).map_err(|e| {
                    fail(
                        FailureKind::Corrupt,
                        format!("frame {}: {e:#}", frame.index),
                    )
                })?;
                resized.insert(frame.index, Arc::new(image));
            }
            if frame.index >= last {
                break;
            }
        }
        if let Some(missing) = needed.iter().find(|i| !resized.contains_key(i)) {
            return Err(fail(
                FailureKind::Corrupt,
                format!(
                    "frame {missing} of {} listed could not be decoded (truncated?)",
                    info.times.len()
                ),
            ));
        }
        let first = resized.values().next().expect("frames decoded");
        let (crop_width, crop_height) = (first.crop_width as i32, first.crop_height as i32);
        Ok(windows
            .into_iter()
            .map(|planned| {
                let frames = planned
                    .window
                    .indices
                    .iter()
                    .map(|&i| resized[&(i as usize)].clone())
                    .collect();
                let meta = RowMeta {
                    key: planned.key,
                    source_sha256: sample.bytes.sha256,
                    orig_width: width as i32,
                    orig_height: height as i32,
                    crop_top: geometry.offset.1,
                    crop_left: geometry.offset.0,
                    width: crop_width,
                    height: crop_height,
                    caption: text.caption.clone(),
                    extra: text.extra.clone(),
                    window: Some(planned.window),
                };
                (RowPixels::Frames(frames), meta)
            })
            .collect())
    }
}

/// A clip that could not be probed or decoded, as an error line of its kind.
fn clip_failure(key: &str, error: ClipError) -> Failure {
    Failure::new(key, error.kind, error.message)
}
