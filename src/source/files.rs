//! A list of inputs: images, WebDataset tars and Parquet files, local or in object storage, read
//! in the listed order by one reader thread that streams the containers' samples (and fetches
//! single-image objects many at a time) ahead of the decode pool.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::bounded;

use super::parquet::{self, Beside, ParquetColumns};
use super::webdataset::{self, TarInput};
use super::{
    json_object, load_file, metadata_of, path_of, source_bytes, Location, MetadataRead, SourceBytes,
};
use super::{Sample, SampleRef, Source, DECODED};
use crate::failure::{Failure, FailureKind};
use crate::object::{Bucket, ObjectFile, FETCH_AHEAD};
use crate::pool;

/// Samples read ahead of the decode pool: enough to keep it fed while a container is read, few
/// enough that memory does not depend on a container's size.
const READ_AHEAD: usize = 64;

/// What an input holds, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Image,
    /// Plain or gzip-compressed (told apart by content, whatever the name says).
    Tar,
    Parquet,
}

impl FileKind {
    pub fn of(name: &str) -> Option<FileKind> {
        let name = name.rsplit('/').next()?.to_ascii_lowercase();
        if name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Some(FileKind::Tar)
        } else if name.ends_with(".parquet") {
            Some(FileKind::Parquet)
        } else {
            let ext = name.rsplit_once('.')?.1;
            DECODED.contains(&ext).then_some(FileKind::Image)
        }
    }

    pub fn of_path(path: &Path) -> Option<FileKind> {
        FileKind::of(&path.file_name()?.to_string_lossy())
    }
}

/// Where an input's bytes are.
#[derive(Debug, Clone)]
pub enum Place {
    Local(PathBuf),
    /// An object of the source's bucket, with its sidecar objects (single images only).
    Object {
        key: String,
        size: u64,
        caption: Option<String>,
        json: Option<String>,
    },
}

/// One input: the key its samples' keys start with, what it holds and where.
#[derive(Debug, Clone)]
pub struct Unit {
    pub key: String,
    pub kind: FileKind,
    pub place: Place,
}

/// Inputs named by a list, a glob or a brace range, or an object-storage prefix.
pub struct FilesSource {
    /// The local folder keys are relative to (for `locate`), if local.
    root: Option<PathBuf>,
    bucket: Option<Arc<Bucket>>,
    units: Vec<Unit>,
    /// Inputs refused while listing (object keys that are not plain relative paths).
    refused: Vec<Failure>,
    columns: ParquetColumns,
}

impl FilesSource {
    pub fn new(
        root: Option<PathBuf>,
        bucket: Option<Arc<Bucket>>,
        units: Vec<Unit>,
        refused: Vec<Failure>,
        columns: ParquetColumns,
    ) -> Self {
        FilesSource {
            root,
            bucket,
            units,
            refused,
            columns,
        }
    }
}

pub(super) type Send_<'a> = &'a mut dyn FnMut(Result<SampleRef, Failure>) -> bool;

/// Runs `job` on a reader thread that hands its items to the returned iterator, at most
/// `READ_AHEAD` ahead; `send` fails once the consumer stopped (a limit, a signal): then the job
/// stops reading.
pub(super) fn reader(
    job: impl FnOnce(Send_) + Send + 'static,
) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send> {
    let (tx, rx) = bounded(READ_AHEAD);
    let spawned = std::thread::Builder::new()
        .name("read".into())
        .spawn(move || job(&mut |item| tx.send(item).is_ok()));
    match spawned {
        Ok(_) => Box::new(rx.into_iter()),
        Err(e) => Box::new(std::iter::once(Err(Failure::new(
            "<input>",
            FailureKind::Io,
            format!("cannot start the reader thread: {e}"),
        )))),
    }
}

impl FilesSource {
    /// The reader thread's items; without `images`, samples carry their metadata alone.
    fn read(&self, images: bool) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send> {
        let units = self.units.clone();
        let (bucket, columns) = (self.bucket.clone(), self.columns.clone());
        let refused = self.refused.clone();
        reader(move |send| {
            for failure in refused {
                if !send(Err(failure)) {
                    return;
                }
            }
            read_units(&units, bucket.as_ref(), &columns, images, send);
        })
    }
}

impl Source for FilesSource {
    fn list(&self) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send + '_> {
        self.read(true)
    }

    /// Tars are walked without reading their images (local ones seek past them), Parquet files
    /// without their image column, and image objects are not fetched, only their `.json`.
    fn metadata_pass(&self) -> Box<dyn Iterator<Item = MetadataRead> + Send + '_> {
        Box::new(self.read(false).map(|item| match item {
            Ok(sample) => metadata_of(&sample),
            Err(_) => MetadataRead::Absent,
        }))
    }

    fn load(&self, sample: SampleRef) -> Result<Sample, Failure> {
        load_file(sample)
    }

    fn units(&self) -> Vec<String> {
        self.units.iter().map(|u| u.key.clone()).collect()
    }

    /// Inputs refused while listing go with the first partition.
    fn restrict(&mut self, range: Range<usize>) {
        if range.start > 0 {
            self.refused.clear();
        }
        let end = range.end.min(self.units.len());
        self.units = self.units.drain(range.start.min(end)..end).collect();
    }

    fn metadata(&self, sample: &SampleRef) -> MetadataRead {
        metadata_of(sample)
    }

    /// Local image files only: a container's sample is found by reading the container again.
    fn locate(&self, key: &str) -> Option<SampleRef> {
        let path = path_of(self.root.as_ref()?, key)?;
        (FileKind::of_path(&path) == Some(FileKind::Image) && path.is_file()).then(|| SampleRef {
            key: key.to_string(),
            at: Location::File(path),
        })
    }
}

/// Reads every unit in order into `send` (without image bytes unless `images`); false once
/// `send` refused an item.
pub(super) fn read_units(
    units: &[Unit],
    bucket: Option<&Arc<Bucket>>,
    columns: &ParquetColumns,
    images: bool,
    send: Send_,
) -> bool {
    let mut objects: Vec<&Unit> = Vec::new();
    for unit in units {
        let is_object_image =
            unit.kind == FileKind::Image && matches!(unit.place, Place::Object { .. });
        if !is_object_image
            && !objects.is_empty()
            && !fetch_images(&std::mem::take(&mut objects), bucket, images, send)
        {
            return false;
        }
        let more = match (&unit.place, unit.kind) {
            (Place::Local(path), FileKind::Image) => send(Ok(SampleRef {
                key: unit.key.clone(),
                at: Location::File(path.clone()),
            })),
            (Place::Object { .. }, FileKind::Image) => {
                objects.push(unit);
                objects.len() < FETCH_AHEAD
                    || fetch_images(&std::mem::take(&mut objects), bucket, images, send)
            }
            (place, FileKind::Tar) => {
                let input = match place {
                    Place::Local(path) => File::open(path).map(TarInput::File),
                    Place::Object { key, .. } => bucket
                        .expect("objects have a bucket")
                        .reader(key, 0)
                        .map(|r| TarInput::Stream(Box::new(r))),
                };
                webdataset::stream(&unit.key, input, images, send)
            }
            (Place::Local(path), FileKind::Parquet) => {
                let open = || File::open(path);
                let beside = Beside::Folder(path.parent().unwrap_or(Path::new("")));
                parquet::stream(&unit.key, &open, beside, columns, images, send)
            }
            (Place::Object { key, size, .. }, FileKind::Parquet) => {
                let bucket = bucket.expect("objects have a bucket");
                let file = ObjectFile {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    size: *size,
                };
                let folder = key.rsplit_once('/').map_or("", |(folder, _)| folder);
                let beside = Beside::Objects(bucket, folder);
                parquet::stream(
                    &unit.key,
                    &|| Ok(file.clone()),
                    beside,
                    columns,
                    images,
                    send,
                )
            }
        };
        if !more {
            return false;
        }
    }
    objects.is_empty() || fetch_images(&objects, bucket, images, send)
}

/// Fetches single-image objects and their sidecars concurrently (only the `.json` sidecars
/// without `images`); a missing or unreadable object is an `io` line.
fn fetch_images(units: &[&Unit], bucket: Option<&Arc<Bucket>>, images: bool, send: Send_) -> bool {
    let bucket = bucket.expect("objects have a bucket");
    let mut keys = Vec::new();
    for unit in units {
        if let Place::Object {
            key, caption, json, ..
        } = &unit.place
        {
            if images {
                keys.push(key.clone());
                keys.extend(caption.clone());
            }
            keys.extend(json.clone());
        }
    }
    let mut fetched = bucket.get_all(&keys).into_iter();
    let mut next = || fetched.next().expect("one result per key");
    for unit in units {
        let Place::Object { caption, json, .. } = &unit.place else {
            continue;
        };
        let image = images.then(&mut next);
        let caption = caption.as_ref().filter(|_| images).map(|_| next());
        let json = json.as_ref().map(|_| next());
        let bytes = match image {
            None => Ok(SourceBytes::none()),
            Some(got) => got
                .map_err(|e| Failure::new(&unit.key, FailureKind::Io, format!("cannot fetch: {e}")))
                .and_then(|body| {
                    let mut bytes = pool::BYTES.take(body.len());
                    bytes.extend_from_slice(&body);
                    source_bytes(&unit.key, bytes)
                }),
        };
        let item = bytes.map(|bytes| SampleRef {
            key: unit.key.clone(),
            at: Location::Read(Box::new(Sample {
                key: unit.key.clone(),
                bytes,
                caption: caption
                    .and_then(|c| c.ok())
                    .map(|c| String::from_utf8_lossy(&c).trim().to_string()),
                metadata: json
                    .and_then(|j| j.ok())
                    .map_or(MetadataRead::Absent, |j| json_object(&j)),
            })),
        });
        if !send(item) {
            return false;
        }
    }
    true
}
