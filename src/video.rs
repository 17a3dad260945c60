//! Video clips: recognising them, probing them and streaming their frames as upright RGB images.
//!
//! FFmpeg's libraries are not linked into this binary: the pip wheel has to install and encode
//! images where they are missing. Decoding lives in a small plugin library
//! (`libvae_pipeline_ffmpeg.so`, the `ffmpeg/` workspace member, which links FFmpeg) that is
//! loaded here at the first use; without it, or without the FFmpeg libraries it needs, clips fail
//! with what to install and everything else works. The plugin reads clips from bytes in memory,
//! so clips from folders, tars, Parquet and S3 go the same way.
//!
//! Times come from the container's timestamps (variable frame rates are right), rotation from the
//! display matrix (frames come out upright), audio is ignored, and frames are decoded one at a
//! time (memory does not grow with a clip's length).

use std::ffi::CStr;
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use image::RgbImage;

use crate::failure::FailureKind;

/// File extensions taken as clips.
pub const VIDEO_EXTENSIONS: &[&str] = &["mp4", "mov", "mkv", "webm", "avi"];

/// The plugin's file name, and the environment variable that points to it.
pub const PLUGIN_FILE: &str = "libvae_pipeline_ffmpeg.so";
pub const PLUGIN_ENV: &str = "VAE_PIPELINE_FFMPEG";

/// What to install for the plugin that `cargo build` makes here (linked against Debian
/// 12's FFmpeg 5.1).
const INSTALL: &str = "the FFmpeg plugin was built against FFmpeg 5.1 (Debian 12): `apt install \
     libavcodec59 libavformat59 libswscale6`; elsewhere build it against your FFmpeg's libraries \
     (`cargo build --release -p vae-pipeline-ffmpeg` with its -dev packages, clang and pkg-config \
     installed) and set VAE_PIPELINE_FFMPEG to the libvae_pipeline_ffmpeg.so it makes";

/// ISO-BMFF major brands of still images (HEIF, AVIF): `ftyp` but not a clip.
const IMAGE_BRANDS: &[&[u8; 4]] = &[
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis",
];

/// Container signature (ISO-BMFF `ftyp`, or an old QuickTime file's first `moov`/`mdat`/`wide`
/// atom; Matroska/WebM EBML; RIFF AVI), for bytes from tars and Parquet that come without a file
/// name to go by. HEIF/AVIF still images (ISO-BMFF too) are not clips.
pub fn is_video(head: &[u8]) -> bool {
    let bmff = head.len() >= 12
        && &head[4..8] == b"ftyp"
        && !IMAGE_BRANDS.iter().any(|b| &head[8..12] == *b);
    let quicktime = head.len() >= 8 && matches!(&head[4..8], b"moov" | b"mdat" | b"wide");
    let matroska = head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]);
    let avi = head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"AVI ";
    bmff || quicktime || matroska || avi
}

/// Why a clip cannot be used, in the vocabulary of `_errors.jsonl`: `corrupt` (truncated,
/// undecodable), `unsupported` (no video stream, a codec FFmpeg lacks, FFmpeg missing), `empty`
/// (zero bytes, zero frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipError {
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for ClipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for ClipError {}

/// A clip's stream, from a demux pass (no decoding).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClipInfo {
    /// Upright size (rotation applied).
    pub width: u32,
    pub height: u32,
    /// Degrees clockwise that were applied to the stored picture: 0, 90, 180 or 270.
    pub rotation: u32,
    /// Presentation time (s) of every frame, in display order, as the container stores it (the
    /// first frame's need not be 0).
    pub times: Vec<f64>,
    /// The stream's average frame rate.
    pub fps: f64,
    /// FFmpeg's codec name (`h264`, `vp9`, `av1`, `hevc`, `ffv1`, …).
    pub codec: String,
}

/// One decoded frame, upright.
pub struct Frame {
    /// Position in display order (0-based).
    pub index: usize,
    /// Presentation time (s), from the frame's timestamp.
    pub time: f64,
    pub image: RgbImage,
}

// The plugin's C ABI (ffmpeg/src/lib.rs), mirrored.
const ABI_VERSION: u32 = 2;
const KIND_CORRUPT: u32 = 1;
const KIND_UNSUPPORTED: u32 = 2;
const KIND_EMPTY: u32 = 3;

#[repr(C)]
struct VpfError {
    kind: u32,
    message: [u8; 512],
}

#[repr(C)]
struct VpfInfo {
    width: u32,
    height: u32,
    rotation: u32,
    fps: f64,
    codec: [u8; 32],
}

#[repr(C)]
struct VpfFrame {
    width: u32,
    height: u32,
    stride: usize,
    data: *const u8,
    time: f64,
}

type OpenFn =
    unsafe extern "C" fn(*const u8, usize, u32, *mut VpfInfo, *mut VpfError) -> *mut c_void;
type TimesFn =
    unsafe extern "C" fn(*mut c_void, *mut *const f64, *mut usize, *mut VpfError) -> c_int;
type NextFn = unsafe extern "C" fn(*mut c_void, *mut VpfFrame, *mut VpfError) -> c_int;
type CloseFn = unsafe extern "C" fn(*mut c_void);

struct Plugin {
    path: PathBuf,
    versions: String,
    open: OpenFn,
    times: TimesFn,
    next: NextFn,
    close: CloseFn,
    /// Kept loaded for the process's life (the function pointers above point into it).
    _library: libloading::Library,
}

/// Where the plugin is looked for: `$VAE_PIPELINE_FFMPEG` (only it, when set), else beside the
/// executable (a `cargo build`; its parent for cargo's test binaries in `deps/`). The pip wheel
/// does not ship it: it links FFmpeg's libraries, which a manylinux wheel may not need.
pub fn plugin_candidates() -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os(PLUGIN_ENV).filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(path)];
    }
    let mut out = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(PLUGIN_FILE));
        if dir.file_name().is_some_and(|n| n == "deps") {
            out.extend(dir.parent().map(|p| p.join(PLUGIN_FILE)));
        }
    }
    out
}

fn load() -> Result<Plugin> {
    let candidates = plugin_candidates();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "the FFmpeg plugin {PLUGIN_FILE} was not found (looked at {}): `cargo build --release` \
             builds it beside the binary; the pip wheel does not ship it (it links FFmpeg): in a \
             checkout, with FFmpeg's -dev packages, clang and pkg-config installed (Debian 12: \
             `apt install libavcodec-dev libavformat-dev libswscale-dev clang libclang-dev \
             pkg-config`), run `cargo build --release -p vae-pipeline-ffmpeg` and set {PLUGIN_ENV} \
             to target/release/{PLUGIN_FILE}",
            looked.join(", ")
        );
    };
    // SAFETY: the plugin is our own library; its initialisers only register FFmpeg's.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| {
        // libloading's message is "dlopen failed"; its source names the missing library.
        let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        anyhow::anyhow!(
            "cannot load the FFmpeg plugin {} ({why}); {INSTALL}",
            path.display()
        )
    })?;
    // SAFETY: the symbols are the plugin's C ABI, with the types mirrored above; the ABI version
    // is checked before any other is used.
    unsafe {
        let version: libloading::Symbol<unsafe extern "C" fn() -> u32> = library
            .get(b"vpf_abi_version")
            .with_context(|| format!("{} is not the FFmpeg plugin", path.display()))?;
        if version() != ABI_VERSION {
            bail!(
                "the FFmpeg plugin {} speaks ABI {}, this binary {ABI_VERSION}: use the plugin \
                 built with this binary (the same `cargo build`)",
                path.display(),
                version()
            );
        }
        let versions: libloading::Symbol<unsafe extern "C" fn() -> *const c_char> =
            library.get(b"vpf_ffmpeg_versions")?;
        let versions = CStr::from_ptr(versions()).to_string_lossy().into_owned();
        Ok(Plugin {
            path: path.clone(),
            versions,
            open: *library.get::<OpenFn>(b"vpf_open")?,
            times: *library.get::<TimesFn>(b"vpf_times")?,
            next: *library.get::<NextFn>(b"vpf_next_frame")?,
            close: *library.get::<CloseFn>(b"vpf_close")?,
            _library: library,
        })
    }
}

fn plugin() -> Result<&'static Plugin, ClipError> {
    static PLUGIN: OnceLock<Result<Plugin, String>> = OnceLock::new();
    PLUGIN
        .get_or_init(|| load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|message| ClipError {
            kind: FailureKind::Unsupported,
            message: format!("clips need FFmpeg: {message}"),
        })
}

/// FFmpeg usable? The error says what to install; checked before any work when the input holds
/// clips.
pub fn available() -> Result<()> {
    plugin().map(|_| ()).map_err(|e| anyhow::anyhow!(e.message))
}

/// For `doctor`: the plugin's path and the FFmpeg libraries it loaded.
pub fn describe() -> Result<String> {
    let p = plugin().map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(format!("{} ({})", p.path.display(), p.versions))
}

fn clip_error(err: &VpfError) -> ClipError {
    let end = err
        .message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(err.message.len());
    let kind = match err.kind {
        KIND_EMPTY => FailureKind::Empty,
        KIND_UNSUPPORTED => FailureKind::Unsupported,
        KIND_CORRUPT => FailureKind::Corrupt,
        _ => FailureKind::Corrupt,
    };
    ClipError {
        kind,
        message: String::from_utf8_lossy(&err.message[..end]).into_owned(),
    }
}

fn new_error() -> VpfError {
    VpfError {
        kind: 0,
        message: [0; 512],
    }
}

/// An open clip in the plugin, closed on drop; borrows the bytes it reads.
struct Handle<'a> {
    plugin: &'static Plugin,
    clip: *mut c_void,
    info: VpfInfo,
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> Handle<'a> {
    fn open(bytes: &'a [u8], threads: usize) -> Result<Self, ClipError> {
        if bytes.is_empty() {
            return Err(ClipError {
                kind: FailureKind::Empty,
                message: "zero-byte file".into(),
            });
        }
        let plugin = plugin()?;
        let mut info = VpfInfo {
            width: 0,
            height: 0,
            rotation: 0,
            fps: 0.0,
            codec: [0; 32],
        };
        let mut err = new_error();
        let threads = u32::try_from(threads).unwrap_or(u32::MAX);
        // SAFETY: the plugin reads `bytes` only while the handle (which borrows them) lives.
        let clip =
            unsafe { (plugin.open)(bytes.as_ptr(), bytes.len(), threads, &mut info, &mut err) };
        if clip.is_null() {
            return Err(clip_error(&err));
        }
        Ok(Handle {
            plugin,
            clip,
            info,
            _bytes: PhantomData,
        })
    }

    /// Upright size.
    fn size(&self) -> (u32, u32) {
        match self.info.rotation {
            90 | 270 => (self.info.height, self.info.width),
            _ => (self.info.width, self.info.height),
        }
    }
}

// SAFETY: a clip's FFmpeg contexts may move between threads; the handle uses them from one
// thread at a time (`&mut self` for every call but the drop).
unsafe impl Send for Handle<'_> {}

impl Drop for Handle<'_> {
    fn drop(&mut self) {
        // SAFETY: `clip` came from this plugin's open and is closed once.
        unsafe { (self.plugin.close)(self.clip) }
    }
}

/// The clip's size, rotation, frame rate, codec and every frame's time (a demux pass: no frame
/// is decoded).
pub fn probe(bytes: &[u8]) -> Result<ClipInfo, ClipError> {
    let handle = Handle::open(bytes, 1)?;
    let mut times: *const f64 = std::ptr::null();
    let mut n = 0usize;
    let mut err = new_error();
    // SAFETY: the plugin fills `times`/`n` with an array it owns until the handle closes.
    let ok = unsafe { (handle.plugin.times)(handle.clip, &mut times, &mut n, &mut err) };
    if ok != 0 {
        return Err(clip_error(&err));
    }
    // SAFETY: `times` points to `n` f64 values, valid while `handle` lives.
    let times = unsafe { std::slice::from_raw_parts(times, n) }.to_vec();
    let end = handle.info.codec.iter().position(|&b| b == 0).unwrap_or(32);
    let (width, height) = handle.size();
    Ok(ClipInfo {
        width,
        height,
        rotation: handle.info.rotation,
        times,
        fps: handle.info.fps,
        codec: String::from_utf8_lossy(&handle.info.codec[..end]).into_owned(),
    })
}

/// Decoded frames, one at a time, upright; memory does not depend on the clip's length. A
/// damaged clip yields its frames up to the damage, then one error.
pub struct Frames<'a> {
    handle: Handle<'a>,
    index: usize,
    done: bool,
}

/// Streams the clip's frames (the decoder picks its thread count).
pub fn frames(bytes: &[u8]) -> Result<Frames<'_>, ClipError> {
    frames_with_threads(bytes, 0)
}

/// [`frames`] with `threads` decoder threads (0: FFmpeg's choice, one per core): 1 when many
/// clips are decoded side by side.
pub fn frames_with_threads(bytes: &[u8], threads: usize) -> Result<Frames<'_>, ClipError> {
    Ok(Frames {
        handle: Handle::open(bytes, threads)?,
        index: 0,
        done: false,
    })
}

impl Frames<'_> {
    /// The upright size of the frames.
    pub fn size(&self) -> (u32, u32) {
        self.handle.size()
    }

    /// Degrees clockwise applied to each stored frame.
    pub fn rotation(&self) -> u32 {
        self.handle.info.rotation
    }
}

impl Iterator for Frames<'_> {
    type Item = Result<Frame, ClipError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut frame = VpfFrame {
            width: 0,
            height: 0,
            stride: 0,
            data: std::ptr::null(),
            time: 0.0,
        };
        let mut err = new_error();
        // SAFETY: the plugin fills `frame` with a buffer it owns until the next call.
        let more = unsafe { (self.handle.plugin.next)(self.handle.clip, &mut frame, &mut err) };
        if more != 1 {
            self.done = true;
            if more == 0 && self.index == 0 {
                return Some(Err(ClipError {
                    kind: FailureKind::Empty,
                    message: "no frame decodes".into(),
                }));
            }
            return (more != 0).then(|| Err(clip_error(&err)));
        }
        let (w, h) = (frame.width as usize, frame.height as usize);
        let mut pixels = Vec::with_capacity(w * h * 3);
        for row in 0..h {
            // SAFETY: the frame holds `h` rows of `stride` bytes, each with `w` RGB pixels.
            let line =
                unsafe { std::slice::from_raw_parts(frame.data.add(row * frame.stride), w * 3) };
            pixels.extend_from_slice(line);
        }
        let stored = RgbImage::from_raw(frame.width, frame.height, pixels)
            .expect("w*h*3 bytes make a w x h RGB image");
        let image = match self.handle.info.rotation {
            90 => image::imageops::rotate90(&stored),
            180 => image::imageops::rotate180(&stored),
            270 => image::imageops::rotate270(&stored),
            _ => stored,
        };
        let index = self.index;
        self.index += 1;
        Some(Ok(Frame {
            index,
            time: frame.time,
            image,
        }))
    }
}

/// `vae-pipeline probe-clip`: what this binary sees in a clip, as one JSON object on stdout —
/// the probe (size, rotation, fps, codec, times) and, with `frames_out`, every decoded frame's
/// time, its upright RGB bytes appended to that file. A clip that fails prints
/// `{"error": {"kind", "message"}}` and exits non-zero.
pub fn probe_clip(path: &Path, frames_out: Option<&Path>) -> Result<()> {
    available()?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let result = (|| -> Result<serde_json::Value, ClipError> {
        let info = probe(&bytes)?;
        let mut value = serde_json::to_value(&info).expect("ClipInfo serializes");
        if let Some(out) = frames_out {
            let file = std::fs::File::create(out).map_err(|e| ClipError {
                kind: FailureKind::Io,
                message: format!("cannot create {}: {e}", out.display()),
            })?;
            let mut file = std::io::BufWriter::new(file);
            let mut times = Vec::new();
            for frame in frames(&bytes)? {
                let frame = frame?;
                std::io::Write::write_all(&mut file, frame.image.as_raw()).map_err(|e| {
                    ClipError {
                        kind: FailureKind::Io,
                        message: format!("cannot write {}: {e}", out.display()),
                    }
                })?;
                times.push(frame.time);
            }
            value["frame_times"] = serde_json::json!(times);
        }
        Ok(value)
    })();
    match result {
        Ok(value) => {
            println!("{value}");
            Ok(())
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"error": {"kind": e.kind.as_str(), "message": e.message}})
            );
            bail!("{}: {e}", path.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let mp4 = b"\0\0\0\x20ftypisom\0\0\x02\0";
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0";
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0";
        let webm = [0x1A, 0x45, 0xDF, 0xA3, 0x9F];
        let avi = b"RIFF\x10\0\0\0AVI LIST";
        let quicktime = b"\0\0\0\x08wide\0\0\0\0mdat";
        let webp = b"RIFF\x10\0\0\0WEBPVP8 ";
        assert!(is_video(mp4));
        assert!(is_video(&webm));
        assert!(is_video(avi));
        assert!(is_video(quicktime));
        assert!(!is_video(heic));
        assert!(!is_video(avif));
        assert!(!is_video(webp));
        assert!(!is_video(b"\xff\xd8\xff\xe0"));
        assert!(!is_video(b""));
    }

    #[test]
    fn zero_bytes_are_empty_before_ffmpeg_is_needed() {
        let err = probe(b"").unwrap_err();
        assert_eq!(err.kind, FailureKind::Empty);
        assert_eq!(frames(b"").err().map(|e| e.kind), Some(FailureKind::Empty));
    }
}
