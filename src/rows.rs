//! Rows: takes a loaded `Sample`, hands on its row: the decoded, resized window (`Prepared`) and
//! what the shard records beside the latent (`RowMeta`), or a `Failure`. What `precompute` and
//! `report` both run per image; also the row's metadata digest, which tells a resuming run
//! whether a committed row's caption and metadata columns are still current.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::batch::RowMeta;
use crate::decode::{decode_sample, DecodeOptions};
use crate::failure::{Failure, FailureKind};
use crate::resize::{prepare, Framing, Prepared};
use crate::sidecar::{Scalar, SidecarSchema};
use crate::source::Sample;

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

    /// Decodes and resizes the sample into its row.
    pub fn prepare(&self, sample: Sample, text: RowText) -> Result<(Prepared, RowMeta), Failure> {
        let key = sample.key.as_str();
        let fail = |kind, message: String| Failure::new(key, kind, message);
        let hint = |w, h| self.framing.geometry(key, w, h).map(|g| g.resized);
        let decoded = decode_sample(key, &sample.bytes.bytes, &self.decode, Some(&hint))?;
        let (orig_width, orig_height) = (decoded.width, decoded.height);
        let geometry = self
            .framing
            .geometry(key, orig_width, orig_height)
            .ok_or_else(|| {
                fail(
                    FailureKind::TooSmall,
                    format!(
                        "{orig_width}x{orig_height}: no bucket fits without upscaling (--no-upscale)"
                    ),
                )
            })?;
        let (tw, th) = geometry.resized;
        if u64::from(tw) * u64::from(th) > self.decode.max_pixels {
            return Err(fail(
                FailureKind::TooLarge,
                format!(
                    "{orig_width}x{orig_height} resized for a {}x{} window is {tw}x{th}, above --max-pixels {}",
                    geometry.target.0, geometry.target.1, self.decode.max_pixels
                ),
            ));
        }
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
        };
        Ok((image, meta))
    }
}
