//! A list of input files: images, WebDataset tars and Parquet files, read in the listed order by
//! one reader thread that streams the containers' samples ahead of the decode pool.

use std::path::{Path, PathBuf};

use crossbeam_channel::bounded;

use super::parquet::{self, ParquetColumns};
use super::webdataset;
use super::{key_of, load_file, metadata_of, path_of, Location, MetadataRead, Sample, SampleRef};
use super::{Source, DECODED};
use crate::failure::{Failure, FailureKind};

/// Samples read ahead of the decode pool: enough to keep it fed while a container is read, few
/// enough that memory does not depend on a container's size.
const READ_AHEAD: usize = 64;

/// What an input file holds, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Image,
    Tar { gzip: bool },
    Parquet,
}

impl FileKind {
    pub fn of(path: &Path) -> Option<FileKind> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".tar") {
            Some(FileKind::Tar { gzip: false })
        } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Some(FileKind::Tar { gzip: true })
        } else if name.ends_with(".parquet") {
            Some(FileKind::Parquet)
        } else {
            let ext = name.rsplit_once('.')?.1;
            DECODED.contains(&ext).then_some(FileKind::Image)
        }
    }
}

/// Files under `root` (keys are relative to it), each an image or a container of samples.
pub struct FilesSource {
    root: PathBuf,
    files: Vec<(PathBuf, FileKind)>,
    columns: ParquetColumns,
}

impl FilesSource {
    pub fn new(root: PathBuf, files: Vec<(PathBuf, FileKind)>, columns: ParquetColumns) -> Self {
        FilesSource {
            root,
            files,
            columns,
        }
    }
}

impl Source for FilesSource {
    fn list(&self) -> Box<dyn Iterator<Item = Result<SampleRef, Failure>> + Send + '_> {
        let (tx, rx) = bounded(READ_AHEAD);
        let (root, files, columns) = (self.root.clone(), self.files.clone(), self.columns.clone());
        std::thread::Builder::new()
            .name("read".into())
            .spawn(move || {
                // A send fails once the consumer stopped (a limit, a signal): then stop reading.
                let mut send = |item| tx.send(item).is_ok();
                for (path, kind) in files {
                    let unit = key_of(&root, &path);
                    let more = match kind {
                        FileKind::Image => send(Ok(SampleRef {
                            key: unit,
                            at: Location::File(path),
                        })),
                        FileKind::Tar { gzip } => webdataset::stream(&unit, &path, gzip, &mut send),
                        FileKind::Parquet => parquet::stream(&unit, &path, &columns, &mut send),
                    };
                    if !more {
                        return;
                    }
                }
            })
            .map_or_else(
                |e| {
                    let failure = Failure::new(
                        "<input>",
                        FailureKind::Io,
                        format!("cannot start the reader thread: {e}"),
                    );
                    Box::new(std::iter::once(Err(failure))) as Box<dyn Iterator<Item = _> + Send>
                },
                |_| Box::new(rx.into_iter()),
            )
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
        (FileKind::of(&path) == Some(FileKind::Image) && path.is_file()).then(|| SampleRef {
            key: key.to_string(),
            at: Location::File(path),
        })
    }
}
