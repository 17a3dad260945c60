//! Decode: reads one source file, hands on an upright 8-bit RGB image plus what the row records
//! about the source (hash, caption). The format comes from the content, not the extension.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits, RgbImage};
use sha2::{Digest, Sha256};

use crate::discover::Source;
use crate::failure::{Failure, FailureKind};

/// Pillow's `DecompressionBombError` threshold (2 × its warning limit of 89,478,485 px).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// A source image, upright and in 8-bit RGB.
pub struct Decoded {
    pub rgb: RgbImage,
    pub source_sha256: [u8; 32],
    pub caption: Option<String>,
}

/// Reads and decodes `source`; any problem becomes a `Failure` with the right kind.
pub fn decode(source: &Source, max_pixels: u64) -> Result<Decoded, Failure> {
    let fail = |kind, msg: String| Failure::new(source.key.clone(), kind, msg);
    let bytes = std::fs::read(&source.path)
        .map_err(|e| fail(FailureKind::Io, format!("cannot read: {e}")))?;
    if bytes.is_empty() {
        return Err(fail(FailureKind::Empty, "zero-byte file".into()));
    }
    let rgb = decode_bytes(&bytes, max_pixels).map_err(|(kind, msg)| fail(kind, msg))?;
    Ok(Decoded {
        rgb,
        source_sha256: Sha256::digest(&bytes).into(),
        caption: read_caption(&source.path),
    })
}

/// Decodes image bytes to upright RGB8: EXIF orientation applied, gray replicated, alpha
/// composited on white. The header's size is checked before any pixel buffer exists.
pub fn decode_bytes(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, (FailureKind, String)> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| (FailureKind::Io, e.to_string()))?;
    if reader.format().is_none() {
        return Err((
            FailureKind::Corrupt,
            "not a recognized image format (unknown signature)".into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err((
            FailureKind::TooLarge,
            format!(
                "{w}x{h} = {} pixels is above the limit of {max_pixels}",
                u64::from(w) * u64::from(h)
            ),
        ));
    }
    let orientation = decoder.orientation().map_err(classify)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(classify)?;
    image.apply_orientation(orientation);
    Ok(to_rgb_on_white(image))
}

fn classify(err: ImageError) -> (FailureKind, String) {
    let kind = match &err {
        ImageError::Unsupported(_) => FailureKind::Unsupported,
        ImageError::Limits(_) => FailureKind::TooLarge,
        ImageError::IoError(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => FailureKind::Io,
        _ => FailureKind::Corrupt,
    };
    (kind, err.to_string())
}

/// 8-bit RGB; transparent pixels are blended onto white, as a viewer shows them.
fn to_rgb_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.pixels() {
        let a = u32::from(px[3]);
        for c in 0..3 {
            out.push(((u32::from(px[c]) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer sized to the image")
}

/// Caption from a sidecar `NAME.txt` or `NAME.caption` beside `NAME.ext`, trimmed.
fn read_caption(path: &Path) -> Option<String> {
    ["txt", "caption"].iter().find_map(|ext| {
        let text = std::fs::read_to_string(path.with_extension(ext)).ok()?;
        Some(text.trim().to_string())
    })
}
