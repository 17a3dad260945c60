//! Decode: reads one source file, hands on an upright 8-bit RGB image plus what the row records
//! about the source (hash, caption). The format comes from the content, not the extension.

use std::cell::RefCell;
use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::failure::{Failure, FailureKind};
use crate::pool;

/// Pillow's `DecompressionBombError` threshold (2 × its warning limit of 89,478,485 px).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// What happens to transparent pixels.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaPolicy {
    /// Composite on white, as viewers and most training sets show transparency.
    White,
    Black,
    /// Refuse images with an alpha channel (`unsupported`).
    Reject,
}

impl AlphaPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            AlphaPolicy::White => "white",
            AlphaPolicy::Black => "black",
            AlphaPolicy::Reject => "reject",
        }
    }
}

/// What the decode stage accepts and how it flattens transparency.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeOptions {
    /// Refuse (`too_large`) images with more pixels than this, judged from the header.
    pub max_pixels: u64,
    /// Refuse (`too_small`) images whose shorter side is below this; 0 accepts all.
    pub min_size: u32,
    pub alpha: AlphaPolicy,
    /// JPEGs decode at a reduced DCT scale (1/8 … 7/8) when the result still holds at least
    /// this many times the size the resize stage asks for (Pillow's `reducing_gap`); 0 never
    /// reduces.
    pub reducing_gap: f32,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: DEFAULT_MAX_PIXELS,
            min_size: 0,
            alpha: AlphaPolicy::White,
            reducing_gap: DEFAULT_REDUCING_GAP,
        }
    }
}

/// See `DecodeOptions::reducing_gap` and docs/images.md "How images are read" for the measurement.
pub const DEFAULT_REDUCING_GAP: f32 = 3.0;

/// The size the next stage will resize an upright `width`×`height` image to; lets a JPEG
/// decode at a reduced scale. None: the image is needed at full size.
pub type SizeHint<'a> = &'a dyn Fn(u32, u32) -> Option<(u32, u32)>;

/// A source image, upright and in 8-bit RGB.
pub struct Decoded {
    /// The pixels, possibly reduced in scale (see `SizeHint`).
    pub rgb: RgbImage,
    /// The upright size of the source, whatever scale it was decoded at.
    pub width: u32,
    pub height: u32,
}

/// Decodes a sample's bytes; any problem becomes a `Failure` for `key` with the right kind.
/// Where the bytes came from (a file, a tar member, a Parquet cell) makes no difference.
pub fn decode_sample(
    key: &str,
    bytes: &[u8],
    options: &DecodeOptions,
    hint: Option<SizeHint>,
) -> Result<Decoded, Failure> {
    let (rgb, (width, height)) = decode_bytes_toward(bytes, options, hint)
        .map_err(|(kind, msg)| Failure::new(key, kind, msg))?;
    Ok(Decoded { rgb, width, height })
}

/// Decodes image bytes to upright RGB8 at full size: EXIF orientation applied, gray
/// replicated, alpha flattened per `options.alpha`. The header's size is checked before any
/// pixel buffer exists.
pub fn decode_bytes(
    bytes: &[u8],
    options: &DecodeOptions,
) -> Result<RgbImage, (FailureKind, String)> {
    decode_bytes_toward(bytes, options, None).map(|(rgb, _)| rgb)
}

/// `decode_bytes`, but a JPEG may come out reduced toward what `hint` asks for. Also hands
/// on the upright full size.
pub fn decode_bytes_toward(
    bytes: &[u8],
    options: &DecodeOptions,
    hint: Option<SizeHint>,
) -> Result<(RgbImage, (u32, u32)), (FailureKind, String)> {
    if let Some(format) = undecoded_format(bytes) {
        return Err((
            FailureKind::Unsupported,
            format!("{format} images are not decoded; convert them to PNG or JPEG"),
        ));
    }
    if crate::video::is_video(bytes) {
        return Err((
            FailureKind::Unsupported,
            "a video clip, not an image: clips are encoded by a clip run (--target-frames, \
             docs/video.md), with a video VAE's card"
                .into(),
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| (FailureKind::Io, e.to_string()))?;
    let format = reader.format();
    match format {
        None => {
            return Err((
                FailureKind::Corrupt,
                "not a recognized image format (unknown signature)".into(),
            ))
        }
        Some(ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err((
                FailureKind::Corrupt,
                "truncated JPEG: no end-of-image marker after the last scan".into(),
            ))
        }
        Some(_) => {}
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(options.max_pixels.saturating_mul(8));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > options.max_pixels {
        return Err((
            FailureKind::TooLarge,
            format!(
                "{w}x{h} = {pixels} pixels is above --max-pixels {}",
                options.max_pixels
            ),
        ));
    }
    if w.min(h) < options.min_size {
        return Err((
            FailureKind::TooSmall,
            format!(
                "{w}x{h}: the shorter side is below --min-size {}",
                options.min_size
            ),
        ));
    }
    let orientation = decoder.orientation().map_err(classify)?;
    let turned = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let upright = if turned { (h, w) } else { (w, h) };
    // JPEGs go through libjpeg-turbo, Pillow's decoder (same IDCT and upsampling, so the same
    // pixels), which can also scale in the DCT domain. What it refuses (CMYK, or a warning
    // such as extraneous bytes) falls back to the `image` crate.
    let scaled = (format == Some(ImageFormat::Jpeg))
        .then(|| {
            let needed = hint.and_then(|hint| hint(upright.0, upright.1));
            let needed = needed.map(|(nw, nh)| if turned { (nh, nw) } else { (nw, nh) });
            decode_jpeg_scaled(bytes, needed, options.reducing_gap)
        })
        .flatten();
    let mut image = match scaled {
        Some(rgb) => DynamicImage::ImageRgb8(rgb),
        None => DynamicImage::from_decoder(decoder).map_err(classify)?,
    };
    image.apply_orientation(orientation);
    Ok((flatten(image, options.alpha)?, upright))
}

thread_local! {
    /// One libjpeg-turbo handle per decode thread, reused from image to image.
    static TURBO: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

/// Decodes a YCbCr or gray JPEG with libjpeg-turbo at the smallest scale M/8 that keeps at
/// least `gap` × `needed` pixels on both axes (stored orientation); full size without
/// `needed`. None when libjpeg-turbo cannot or will not decode it.
fn decode_jpeg_scaled(bytes: &[u8], needed: Option<(u32, u32)>, gap: f32) -> Option<RgbImage> {
    TURBO.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = turbojpeg::Decompressor::new().ok();
        }
        let turbo = cell.as_mut()?;
        let header = turbo.read_header(bytes).ok()?;
        if !matches!(
            header.colorspace,
            turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::Gray | turbojpeg::Colorspace::RGB
        ) {
            return None;
        }
        let factor = match needed {
            Some((nw, nh)) if gap > 0.0 && !header.is_lossless => {
                let enough = |eighths: usize| {
                    let s = turbojpeg::ScalingFactor::new(eighths, 8);
                    s.scale(header.width) as f32 >= gap * nw as f32
                        && s.scale(header.height) as f32 >= gap * nh as f32
                };
                let eighths = (1..=8).find(|&e| enough(e)).unwrap_or(8);
                turbojpeg::ScalingFactor::new(eighths, 8)
            }
            _ => turbojpeg::ScalingFactor::ONE,
        };
        turbo.set_scaling_factor(factor).ok()?;
        let out = header.scaled(factor);
        let pixels = pool::BYTES.take_len(3 * out.width * out.height);
        let mut image = turbojpeg::Image {
            pixels,
            width: out.width,
            pitch: 3 * out.width,
            height: out.height,
            format: turbojpeg::PixelFormat::RGB,
        };
        if turbo.decompress(bytes, image.as_deref_mut()).is_err() {
            pool::BYTES.give(image.pixels);
            return None;
        }
        RgbImage::from_raw(out.width as u32, out.height as u32, image.pixels)
    })
}

/// The JPEG decoder fills missing scan data with gray instead of failing, so completeness is
/// checked here: an end-of-image marker must follow the last start-of-scan. Neither marker can
/// occur inside entropy-coded data (0xFF is byte-stuffed there), and an EXIF thumbnail's markers
/// all come before the main image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    matches!((last(0xDA), last(0xD9)), (Some(sos), Some(eoi)) if eoi > sos)
}

/// Formats users have that this tool recognizes by signature but does not decode.
fn undecoded_format(bytes: &[u8]) -> Option<&'static str> {
    let ftyp = |brands: &[&[u8]]| {
        bytes.len() >= 12 && &bytes[4..8] == b"ftyp" && brands.contains(&&bytes[8..12])
    };
    if ftyp(&[
        b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1",
    ]) {
        Some("HEIC/HEIF")
    } else if ftyp(&[b"avif", b"avis"]) {
        Some("AVIF")
    } else if bytes.starts_with(b"8BPS") {
        Some("PSD")
    } else if bytes.starts_with(b"\xff\x0a") || bytes.starts_with(b"\0\0\0\x0cJXL ") {
        Some("JPEG XL")
    } else if is_svg(bytes) {
        Some("SVG")
    } else {
        None
    }
}

fn is_svg(bytes: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(1024)]).to_ascii_lowercase();
    let head = head.trim_start();
    (head.starts_with("<?xml") || head.starts_with("<svg") || head.starts_with("<!doctype svg"))
        && head.contains("<svg")
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

/// 8-bit RGB; transparent pixels are blended onto white or black, as a viewer shows them, or
/// the image is refused.
fn flatten(image: DynamicImage, alpha: AlphaPolicy) -> Result<RgbImage, (FailureKind, String)> {
    if !image.color().has_alpha() {
        return Ok(image.into_rgb8());
    }
    let background: u32 = match alpha {
        AlphaPolicy::White => 255,
        AlphaPolicy::Black => 0,
        AlphaPolicy::Reject => {
            return Err((
                FailureKind::Unsupported,
                "image has an alpha channel and --alpha is reject".into(),
            ))
        }
    };
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.pixels() {
        let a = u32::from(px[3]);
        for c in 0..3 {
            out.push(((u32::from(px[c]) * a + background * (255 - a) + 127) / 255) as u8);
        }
    }
    Ok(RgbImage::from_raw(w, h, out).expect("buffer sized to the image"))
}
