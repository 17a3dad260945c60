//! Store: where a shard set's files are committed. Takes relative names and bytes, hands on
//! files that appear whole or not at all. The local folder is the first implementation (temporary
//! name, fsync, rename); an object store is another (single PUT or multipart completion,
//! create-only), so the writer and the side files never touch the file system directly.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::format;

/// A file being written: invisible under its final name until `commit`.
pub trait PendingFile: Write + Send {
    /// Makes the file visible, whole and durable, under its final name.
    fn commit(self: Box<Self>) -> Result<()>;
    /// Drops what was written; nothing is left behind.
    fn abort(self: Box<Self>);
    /// Where it is being written, for messages.
    fn describe(&self) -> String;
}

/// A place shard sets are written to; names are relative to the set's root, `/`-separated.
pub trait ShardStore: Send + Sync {
    /// Starts `rel`; nothing appears under that name until the file is committed.
    fn create(&self, rel: &str) -> Result<Box<dyn PendingFile>>;
}

/// A shard set in a local folder.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: &Path) -> Self {
        LocalStore {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        rel.split('/').fold(self.root.clone(), |p, c| p.join(c))
    }
}

impl ShardStore for LocalStore {
    fn create(&self, rel: &str) -> Result<Box<dyn PendingFile>> {
        let path = self.path(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = format::tmp_name(&path);
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(Box::new(LocalPending { file, tmp, path }))
    }
}

struct LocalPending {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
}

impl Write for LocalPending {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl PendingFile for LocalPending {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.tmp.display()))?;
        rename_durably(&self.tmp, &self.path)?;
        self.tmp = PathBuf::new();
        Ok(())
    }

    fn abort(self: Box<Self>) {}

    fn describe(&self) -> String {
        self.tmp.display().to_string()
    }
}

/// An uncommitted file (aborted, failed, or dropped on an error path) leaves nothing behind.
impl Drop for LocalPending {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` whole or not at all: temporary name, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = format::tmp_name(path);
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    rename_durably(&tmp, path)
}

/// Renames a finished temporary file into place and makes the rename durable.
pub fn rename_durably(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

pub fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
