//! Discover: walks `--input`, hands on image files as `Source`s (key + path) in a deterministic
//! order, and files it cannot use as `Failure`s. Streams: memory does not grow with the tree.

use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use crate::failure::{Failure, FailureKind};

/// Extensions this tool decodes (matched case-insensitively).
const DECODED: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff",
];
/// Image formats users have that this tool does not decode: reported, never ignored.
const NOT_DECODED: &[&str] = &[
    "heic", "heif", "avif", "jxl", "svg", "psd", "cr2", "cr3", "nef", "arw", "dng", "raf", "orf",
    "exr",
];

/// One image to encode.
#[derive(Debug, Clone)]
pub struct Source {
    /// Path relative to the input root, `/`-separated: the row's identity.
    pub key: String,
    pub path: PathBuf,
}

/// Every image under `root`, sorted by name at each level so runs are reproducible.
/// Symlinks are followed; loops come out as `io` failures instead of being walked forever.
pub fn walk(root: &Path) -> impl Iterator<Item = Result<Source, Failure>> + '_ {
    WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_map(move |entry| match entry {
            Ok(e) if e.file_type().is_file() => classify(root, e.path()),
            Ok(_) => None,
            Err(err) => {
                let key = err
                    .path()
                    .map_or_else(|| "<input>".into(), |p| key_of(root, p));
                let message = match err.loop_ancestor() {
                    Some(a) => format!("symlink loop back to {}: not followed", a.display()),
                    None => err.to_string(),
                };
                Some(Err(Failure::new(key, FailureKind::Io, message)))
            }
        })
}

fn classify(root: &Path, path: &Path) -> Option<Result<Source, Failure>> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    let key = key_of(root, path);
    if DECODED.contains(&ext.as_str()) {
        Some(Ok(Source {
            key,
            path: path.to_path_buf(),
        }))
    } else if NOT_DECODED.contains(&ext.as_str()) {
        Some(Err(Failure::new(
            key,
            FailureKind::Unsupported,
            format!(".{ext} images are not decoded by vae-pipeline; convert them to PNG or JPEG"),
        )))
    } else {
        None
    }
}

/// `path` relative to `root`, with `/` separators on every platform.
pub fn key_of(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}
