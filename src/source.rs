//! Source: where samples come from. A `Source` lists keyed samples in a fixed order and loads
//! each one's bytes and metadata (caption, JSON fields); the decode stage takes the bytes and
//! never learns where they came from. `open` turns `--input` into one: a folder walker (keys are
//! paths relative to the folder, escaped so that any file name gives a unique, reversible key), or
//! a list of files (named, globbed or brace-expanded) of images, WebDataset tars and Parquet files,
//! whose samples are streamed by one reader thread ahead of the decode pool.

mod files;
mod parquet;
mod spec;
mod webdataset;

pub use files::FilesSource;
use files::{FileKind, Place, Unit};
pub use parquet::ParquetColumns;
pub use spec::open;

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use walkdir::WalkDir;

use crate::failure::{Failure, FailureKind};
use crate::pool;

/// Extensions this tool decodes (matched case-insensitively): images, and clips
/// (`video::VIDEO_EXTENSIONS`, decoded through FFmpeg in a clip run).
pub(crate) const DECODED: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff", "mp4", "mov", "mkv",
    "webm", "avi",
];
/// Image formats users have that this tool does not decode: reported, never ignored.
pub(crate) const NOT_DECODED: &[&str] = &[
    "heic", "heif", "avif", "jxl", "svg", "psd", "cr2", "cr3", "nef", "arw", "dng", "raf", "orf",
    "exr",
];

/// One listed sample: its key and where its bytes are.
pub struct SampleRef {
    /// The row's identity: unique in the source, stable across runs.
    pub key: String,
    pub at: Location,
}

/// Where a listed sample's bytes are.
pub enum Location {
    /// A file, read on the decode pool.
    File(PathBuf),
    /// Already read by a streaming reader (a tar member, a Parquet cell).
    Read(Box<Sample>),
}

impl SampleRef {
    /// Where the sample came from, for messages.
    pub fn describe(&self) -> String {
        match &self.at {
            Location::File(path) => path.display().to_string(),
            Location::Read(_) => self.key.clone(),
        }
    }
}

/// A source's bytes and their sha256 (in a pooled buffer).
pub struct SourceBytes {
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
}

impl SourceBytes {
    /// No bytes: a sample listed for its metadata alone (`Source::metadata_pass`).
    pub(crate) fn none() -> Self {
        SourceBytes {
            bytes: Vec::new(),
            sha256: [0; 32],
        }
    }
}

impl Drop for SourceBytes {
    fn drop(&mut self) {
        pool::BYTES.give(std::mem::take(&mut self.bytes));
    }
}

/// A loaded sample: what the decode stage and the row's metadata columns need.
pub struct Sample {
    pub key: String,
    pub bytes: SourceBytes,
    pub caption: Option<String>,
    /// The sample's JSON metadata (unreadable metadata is counted by the schema inference).
    pub metadata: MetadataRead,
}

/// A sample's JSON metadata as the schema inference sees it.
#[derive(Debug, Clone)]
pub enum MetadataRead {
    Absent,
    /// Present but not a JSON object: counted, contributes nothing.
    Unreadable,
    Object(Map<String, Value>),
}

impl MetadataRead {
    /// The metadata object, if the sample has a readable one.
    pub fn object(&self) -> Option<&Map<String, Value>> {
        match self {
            MetadataRead::Object(map) => Some(map),
            _ => None,
        }
    }
}

/// Where samples come from.
pub trait Source: Sync {
    /// Every sample in key order, or a `Failure` for what cannot be one. Streams.
    fn list(&self) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send + '_>;
    /// Reads one sample (bytes, hash, caption, metadata); runs on the decode pool.
    fn load(&self, sample: SampleRef) -> Result<Sample, Failure>;
    /// The sample's JSON metadata alone, for the run-wide column schema inferred before work.
    fn metadata(&self, sample: &SampleRef) -> MetadataRead;
    /// The sample a key names, to read it again (`report --shards`); None for a key this
    /// source cannot hold.
    fn locate(&self, key: &str) -> Option<SampleRef>;
    /// What a many-worker run splits into partitions (`partition`), in `list` order: each listed
    /// item of a folder, each named file (image, tar, Parquet file) otherwise.
    fn units(&self) -> Vec<String>;
    /// From now on, lists only the units at `range` (indices into `units`).
    fn restrict(&mut self, range: Range<usize>);
    /// One item per `list` item, with the JSON metadata alone (failures: absent), for the
    /// column schema inferred before work; a source may skip the image bytes here.
    fn metadata_pass(&self) -> Box<dyn Iterator<Item = MetadataRead> + Send + '_> {
        Box::new(self.list().map(|item| match item {
            Ok(sample) => self.metadata(&sample),
            Err(_) => MetadataRead::Absent,
        }))
    }
}

/// A folder of image files with sidecars: `NAME.txt` / `NAME.caption` (caption), `NAME.json`
/// (metadata), and of containers (tars, Parquet files) read as a list of files reads them.
/// Walked recursively in name order; symlinks followed, loops reported.
#[derive(Clone)]
pub struct FolderSource {
    root: PathBuf,
    /// The listed items kept (`restrict`), by index.
    only: Option<Range<usize>>,
    columns: ParquetColumns,
}

impl FolderSource {
    pub fn new(root: &Path) -> Self {
        FolderSource {
            root: root.to_path_buf(),
            only: None,
            columns: ParquetColumns::default(),
        }
    }

    /// The same folder with its Parquet files' columns named (`--image-column` and the others).
    pub fn with_columns(self, columns: ParquetColumns) -> Self {
        FolderSource { columns, ..self }
    }

    /// Every item of the walk, restricted or not: an image or a container, or why an entry
    /// cannot be one.
    fn walk(&self) -> impl Iterator<Item = Result<Unit, Failure>> + Send + '_ {
        WalkDir::new(&self.root)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter()
            .filter_map(move |entry| match entry {
                Ok(e) if e.file_type().is_file() => self.classify(e.path()),
                Ok(_) => None,
                Err(err) => {
                    let key = err
                        .path()
                        .map_or_else(|| "<input>".into(), |p| key_of(&self.root, p));
                    let message = match err.loop_ancestor() {
                        Some(a) => format!("symlink loop back to {}: not followed", a.display()),
                        None => err.to_string(),
                    };
                    Some(Err(Failure::new(key, FailureKind::Io, message)))
                }
            })
    }

    /// The walk's items that `restrict` kept.
    fn items(&self) -> Box<dyn Iterator<Item = Result<Unit, Failure>> + Send + '_> {
        match self.only.clone() {
            None => Box::new(self.walk()),
            Some(range) => Box::new(
                self.walk()
                    .enumerate()
                    .skip(range.start)
                    .take_while(move |(i, _)| range.contains(i))
                    .map(|(_, item)| item),
            ),
        }
    }

    /// The Parquet files in the folder, to check their columns before any work.
    pub(crate) fn parquet_files(&self) -> Vec<PathBuf> {
        self.walk()
            .filter_map(|item| match item {
                Ok(Unit {
                    kind: FileKind::Parquet,
                    place: Place::Local(path),
                    ..
                }) => Some(path),
                _ => None,
            })
            .collect()
    }

    fn classify(&self, path: &Path) -> Option<Result<Unit, Failure>> {
        let key = key_of(&self.root, path);
        if let Some(kind) = FileKind::of_path(path) {
            return Some(Ok(Unit {
                key,
                kind,
                place: Place::Local(path.to_path_buf()),
            }));
        }
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        NOT_DECODED.contains(&ext.as_str()).then(|| {
            Err(Failure::new(
                key,
                FailureKind::Unsupported,
                format!(
                    ".{ext} images are not decoded by vae-pipeline; convert them to PNG or JPEG"
                ),
            ))
        })
    }

    /// The reader thread's items: images as files, containers' samples as read (without image
    /// bytes unless `images`).
    fn read(&self, images: bool) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send> {
        let folder = self.clone();
        files::reader(move |send| {
            for item in folder.items() {
                let more = match item {
                    Ok(unit) => files::read_units(
                        std::slice::from_ref(&unit),
                        None,
                        &folder.columns,
                        images,
                        send,
                    ),
                    Err(failure) => send(Err(failure)),
                };
                if !more {
                    return;
                }
            }
        })
    }
}

impl Source for FolderSource {
    fn list(&self) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send + '_> {
        self.read(true)
    }

    /// Containers are walked without reading their images (as for a list of files).
    fn metadata_pass(&self) -> Box<dyn Iterator<Item = MetadataRead> + Send + '_> {
        Box::new(self.read(false).map(|item| match item {
            Ok(sample) => metadata_of(&sample),
            Err(_) => MetadataRead::Absent,
        }))
    }

    /// Each image file and each container is one unit.
    fn units(&self) -> Vec<String> {
        self.walk()
            .map(|item| match item {
                Ok(unit) => unit.key,
                Err(failure) => failure.key,
            })
            .collect()
    }

    fn restrict(&mut self, range: Range<usize>) {
        self.only = Some(range);
    }

    fn load(&self, sample: SampleRef) -> Result<Sample, Failure> {
        load_file(sample)
    }

    fn metadata(&self, sample: &SampleRef) -> MetadataRead {
        metadata_of(sample)
    }

    /// Image files only: a container's sample is found by reading the container again.
    fn locate(&self, key: &str) -> Option<SampleRef> {
        let path = path_of(&self.root, key)?;
        (FileKind::of_path(&path) == Some(FileKind::Image)).then(|| SampleRef {
            key: key.to_string(),
            at: Location::File(path),
        })
    }
}

/// Loads a listed sample: an image file with its sidecars, or what a reader already read.
pub(crate) fn load_file(sample: SampleRef) -> Result<Sample, Failure> {
    let path = match sample.at {
        Location::Read(sample) => return Ok(*sample),
        Location::File(path) => path,
    };
    let bytes = read_file(&sample.key, &path)?;
    Ok(Sample {
        bytes,
        caption: read_caption(&path),
        metadata: json_sidecar(&path),
        key: sample.key,
    })
}

/// A listed sample's JSON metadata: its `.json` sidecar, or what a reader read.
pub(crate) fn metadata_of(sample: &SampleRef) -> MetadataRead {
    match &sample.at {
        Location::File(path) => json_sidecar(path),
        Location::Read(read) => read.metadata.clone(),
    }
}

fn json_sidecar(image: &Path) -> MetadataRead {
    let Ok(text) = std::fs::read_to_string(image.with_extension("json")) else {
        return MetadataRead::Absent;
    };
    json_object(text.as_bytes())
}

/// A JSON document that should be an object.
pub(crate) fn json_object(bytes: &[u8]) -> MetadataRead {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => MetadataRead::Object(map),
        _ => MetadataRead::Unreadable,
    }
}

/// Hashes bytes read by a streaming reader (in a pooled buffer); zero bytes are a failure.
pub(crate) fn source_bytes(key: &str, bytes: Vec<u8>) -> Result<SourceBytes, Failure> {
    if bytes.is_empty() {
        return Err(Failure::new(key, FailureKind::Empty, "zero-byte image"));
    }
    let sha256 = Sha256::digest(&bytes).into();
    Ok(SourceBytes { bytes, sha256 })
}

/// Reads a file whole (into a pooled buffer) and hashes it; unreadable and zero-byte files are
/// failures.
pub fn read_file(key: &str, path: &Path) -> Result<SourceBytes, Failure> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata().map_or(0, |m| m.len() as usize);
        let mut bytes = pool::BYTES.take(len + 1);
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes =
        read().map_err(|e| Failure::new(key, FailureKind::Io, format!("cannot read: {e}")))?;
    if bytes.is_empty() {
        return Err(Failure::new(key, FailureKind::Empty, "zero-byte file"));
    }
    let sha256 = Sha256::digest(&bytes).into();
    Ok(SourceBytes { bytes, sha256 })
}

/// The caption sidecar beside an image: `NAME.txt`, else `NAME.caption`, trimmed.
fn read_caption(path: &Path) -> Option<String> {
    ["txt", "caption"].iter().find_map(|ext| {
        let text = std::fs::read_to_string(path.with_extension(ext)).ok()?;
        Some(text.trim().to_string())
    })
}

/// The key of `path` under `root`: its components joined by `/`. A component's UTF-8 text is
/// kept as it is, except `%`, which becomes `%25`; every byte that is not part of valid UTF-8
/// becomes `%XX` (upper-case hex). So every file name gives its own key, and `path_of` undoes it.
pub fn key_of(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| escape(c.as_os_str()))
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(unix)]
fn os_bytes(name: &std::ffi::OsStr) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Borrowed(std::os::unix::ffi::OsStrExt::as_bytes(name))
}

#[cfg(not(unix))]
fn os_bytes(name: &std::ffi::OsStr) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(name.to_string_lossy().into_owned().into_bytes())
}

fn escape(name: &std::ffi::OsStr) -> String {
    escape_bytes(&os_bytes(name))
}

/// A key component for arbitrary bytes (a tar member's name, a Parquet key cell): as `key_of`.
pub(crate) fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why `key` breaks FORMAT.md's key rule, or None when it obeys it: every component is
/// non-empty, not `.` or `..`, its escapes are well-formed, and it is written exactly as
/// `escape_bytes` writes its bytes (so `%2F`, `%41` or a bare `%` are refused: such a key came
/// from no source, and decoding it could reintroduce a `/`).
pub fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        return Some("the key is empty");
    }
    if key.starts_with('/') {
        return Some("the key starts with `/`");
    }
    for component in key.split('/') {
        let Some(bytes) = unescape(component) else {
            return Some("a component has a malformed `%` escape");
        };
        if bytes.is_empty() {
            return Some("the key has an empty component (`//` or a trailing `/`)");
        }
        if bytes == b"." || bytes == b".." {
            return Some("the key has a `.` or `..` component");
        }
        if bytes.contains(&0) {
            return Some("a component holds a NUL byte");
        }
        if escape_bytes(&bytes) != component {
            return Some("a component is not escaped as FORMAT.md says (e.g. `%2F` for `/`)");
        }
    }
    None
}

/// The path a key names under `root`; None for keys that break the key rule (`key_problem`).
/// Each component is decoded, then checked again, so no decoded byte can leave `root`.
pub fn path_of(root: &Path, key: &str) -> Option<PathBuf> {
    if key_problem(key).is_some() {
        return None;
    }
    let mut path = root.to_path_buf();
    for component in key.split('/') {
        let bytes = unescape(component)?;
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return None;
        }
        let name = os_string(bytes)?;
        let mut parts = Path::new(&name).components();
        match (parts.next(), parts.next()) {
            (Some(std::path::Component::Normal(_)), None) => path.push(name),
            _ => return None,
        }
    }
    path.starts_with(root).then_some(path)
}

fn unescape(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

#[cfg(unix)]
fn os_string(bytes: Vec<u8>) -> Option<std::ffi::OsString> {
    Some(std::os::unix::ffi::OsStringExt::from_vec(bytes))
}

#[cfg(not(unix))]
fn os_string(bytes: Vec<u8>) -> Option<std::ffi::OsString> {
    String::from_utf8(bytes).ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn keys_are_unique_and_reversible_for_any_file_name() {
        use std::os::unix::ffi::OsStrExt;
        let root = Path::new("/data");
        let names: [&[u8]; 6] = [
            b"x\xff.png",
            b"x\xfe.png",
            "x\u{fffd}.png".as_bytes(),
            b"x%FF.png",
            b"caf\xc3\xa9 50%.png",
            b"plain.png",
        ];
        let mut keys = std::collections::HashSet::new();
        for name in names {
            let path = root.join("sub").join(std::ffi::OsStr::from_bytes(name));
            let key = key_of(root, &path);
            assert!(keys.insert(key.clone()), "two names gave the key {key}");
            assert_eq!(
                path_of(root, &key).as_deref(),
                Some(path.as_path()),
                "{key}"
            );
        }
        assert!(keys.contains("sub/x%FF.png"));
        assert!(keys.contains("sub/x%25FF.png"));
        assert!(keys.contains("sub/café 50%25.png"));
        assert!(keys.contains("sub/plain.png"));
        for bad in [
            "../x.png",
            "a//b.png",
            "a/./b.png",
            "%zz.png",
            "%4",
            "..%2Fzone%2Fx.png",
            "%2Ftmp%2Fx.png",
            "%2E%2E/x.png",
            "a%2F..%2F..%2Fb",
            "/abs.png",
            "",
            "x/",
            "%41.png",
        ] {
            assert_eq!(path_of(root, bad), None, "{bad}");
            assert!(key_problem(bad).is_some(), "{bad}");
        }
    }
}
