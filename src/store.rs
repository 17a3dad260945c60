//! Store: where a shard set lives. Takes relative names (`/`-separated) and bytes, hands on files
//! that appear whole or not at all, and reads them back (listing, whole side files, shards by
//! range). Two implementations: a local folder (temporary name, fsync, then a create-only link or
//! a rename) and an `s3://` prefix (one PUT per file, create-only with `If-None-Match: *` for
//! shards). The writer, resume, verify and the shard readers never touch a file system directly.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use parquet::file::reader::{ChunkReader, Length};

use crate::layout;
use crate::lock::{Lease, OutputLock};
use crate::object::{self, Bucket, ObjectFile, Refused};

/// A file being written: invisible under its final name until `commit`.
pub trait PendingFile: Write + Send {
    /// Makes the file visible, whole and durable, under its final name.
    fn commit(self: Box<Self>) -> Result<()>;
    /// Drops what was written; nothing is left behind.
    fn abort(self: Box<Self>);
    /// Where it is being written, for messages.
    fn describe(&self) -> String;
}

/// How a commit treats a name that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Refused: shards are never replaced by another writer.
    CreateOnly,
    /// Replaced whole: side files, and a shard rewritten by prune.
    Replace,
}

/// A place a shard set is written to and read from.
pub trait ShardStore: Send + Sync {
    /// The set's root as the user named it (a path or an `s3://` URL), for messages.
    fn describe(&self) -> String;
    /// The local folder, when the set is one (locks and temporaries are local matters).
    fn local_root(&self) -> Option<&Path>;
    /// Starts `rel`; nothing appears under that name until the file is committed.
    fn create(&self, rel: &str, commit: Commit) -> Result<Box<dyn PendingFile>>;
    /// Every file one or two levels down (`_config.toml`, `256x256/part-00000.parquet`), sorted;
    /// temporaries are left out. Empty when the set does not exist yet.
    fn list(&self) -> Result<Vec<String>>;
    /// A whole (small) file, or None when there is none.
    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>>;
    /// Removes `rel`; a missing file is not an error.
    fn remove(&self, rel: &str) -> Result<()>;
    /// A file for reading by range (Parquet).
    fn open(&self, rel: &str) -> Result<StoreFile>;
    /// Takes the writer's lock `name` (see `lock`), or refuses naming the holder.
    fn lock(&self, name: &str) -> Result<OutputLock>;
    /// Whether a live writer holds the lock `name` (for `status`).
    fn is_locked(&self, name: &str) -> Result<bool>;

    /// Writes a whole file, replacing any.
    fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let mut file = self.create(rel, Commit::Replace)?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", file.describe()))?;
        file.commit()
    }

    /// `rel` under the set's root, for messages.
    fn name(&self, rel: &str) -> String {
        format!("{}/{rel}", self.describe().trim_end_matches('/'))
    }
}

/// Opens the shard set at `root`: `s3://bucket/prefix` or a local folder. Nothing is created;
/// for an object store the prefix is listed once, so that rejected credentials, a missing bucket
/// or a denied prefix fail here, before any work.
pub fn open(root: &Path) -> Result<Arc<dyn ShardStore>> {
    let text = root.to_string_lossy();
    if text.starts_with("s3://") {
        let (bucket, prefix) = object::split_url(&text)?;
        let prefix = prefix.trim_end_matches('/').to_string();
        let bucket = Arc::new(Bucket::open(bucket)?);
        bucket.check(&prefix)?;
        return Ok(Arc::new(BucketStore { bucket, prefix }));
    }
    if let Some((scheme, _)) = text.split_once("://") {
        bail!("{text}: {scheme}:// is not supported; shard sets are written to a folder or s3://");
    }
    if root.exists() && !root.is_dir() {
        bail!("{} exists and is not a folder", root.display());
    }
    Ok(Arc::new(LocalStore::new(root)))
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

    /// Temporary files a killed run of `scope` left one or two levels down.
    pub fn remove_temporaries(&self, scope: layout::Scope) -> Result<()> {
        for (path, name) in walk2(&self.root)? {
            if layout::is_tmp_of(&name, scope) {
                remove_if_present(&path)?;
            }
        }
        Ok(())
    }
}

/// Files and folders one and two levels under `root`, with their names.
fn walk2(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", root.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            for inner in std::fs::read_dir(entry.path())
                .with_context(|| format!("cannot read {}", entry.path().display()))?
                .flatten()
            {
                let inner_name = inner.file_name().to_string_lossy().into_owned();
                found.push((inner.path(), inner_name));
            }
        } else {
            found.push((entry.path(), name));
        }
    }
    Ok(found)
}

impl ShardStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn create(&self, rel: &str, commit: Commit) -> Result<Box<dyn PendingFile>> {
        let path = self.path(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        pending_at(path, commit)
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = walk2(&self.root)?
            .into_iter()
            .filter(|(_, name)| !layout::is_tmp_name(name))
            .map(|(path, _)| layout::relative(&self.root, &path))
            .collect();
        names.sort();
        Ok(names)
    }

    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(rel);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn remove(&self, rel: &str) -> Result<()> {
        remove_if_present(&self.path(rel))
    }

    fn open(&self, rel: &str) -> Result<StoreFile> {
        let path = self.path(rel);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(StoreFile::Local(file))
    }

    fn lock(&self, name: &str) -> Result<OutputLock> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create --out {}", self.root.display()))?;
        OutputLock::acquire(&self.root, name)
    }

    fn is_locked(&self, name: &str) -> Result<bool> {
        crate::lock::is_held(&self.path(name))
    }
}

struct LocalPending {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    commit: Commit,
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
        match self.commit {
            Commit::Replace => rename_durably(&self.tmp, &self.path)?,
            // A hard link fails when the name exists: create-only, like the object store's.
            Commit::CreateOnly => {
                match std::fs::hard_link(&self.tmp, &self.path) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(Refused(format!(
                            "{} already exists: another writer committed it first. Only one run \
                             or worker may write a shard set or partition at a time",
                            self.path.display()
                        ))
                        .into())
                    }
                    other => other.with_context(|| {
                        format!(
                            "cannot commit {} as {}",
                            self.tmp.display(),
                            self.path.display()
                        )
                    })?,
                }
                remove_if_present(&self.tmp)?;
                sync_parent(&self.path);
            }
        }
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

/// A shard set under an `s3://bucket/prefix`.
pub struct BucketStore {
    bucket: Arc<Bucket>,
    prefix: String,
}

impl BucketStore {
    fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }
}

impl ShardStore for BucketStore {
    fn describe(&self) -> String {
        self.bucket.url.clone() + "/" + &self.prefix
    }

    fn local_root(&self) -> Option<&Path> {
        None
    }

    fn create(&self, rel: &str, commit: Commit) -> Result<Box<dyn PendingFile>> {
        Ok(Box::new(ObjectPending {
            bucket: self.bucket.clone(),
            key: self.key(rel),
            commit,
            chunks: Vec::new(),
            current: Vec::new(),
        }))
    }

    fn list(&self) -> Result<Vec<String>> {
        let start = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        Ok(self
            .bucket
            .list(&self.prefix)?
            .into_iter()
            .map(|(key, _)| key[start..].to_string())
            .filter(|rel| rel.matches('/').count() <= 1)
            .collect())
    }

    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.bucket.get(&self.key(rel))?.map(|b| b.to_vec()))
    }

    fn remove(&self, rel: &str) -> Result<()> {
        self.bucket.delete(&self.key(rel))
    }

    fn open(&self, rel: &str) -> Result<StoreFile> {
        let key = self.key(rel);
        let size = self
            .bucket
            .size(&key)?
            .with_context(|| format!("{} does not exist", self.name(rel)))?;
        Ok(StoreFile::Object(ObjectFile {
            bucket: self.bucket.clone(),
            key,
            size,
        }))
    }

    fn lock(&self, name: &str) -> Result<OutputLock> {
        Lease::acquire(self.bucket.clone(), &self.key(name), &self.describe())
    }

    fn is_locked(&self, name: &str) -> Result<bool> {
        Lease::is_live(&self.bucket, &self.key(name))
    }
}

/// Bytes gathered in chunks of this size (no reallocation of a whole shard).
const CHUNK: usize = 8 << 20;

/// An object being written: held in memory (a shard's size: `--shard-rows` bounds it) and sent in
/// one PUT on commit, so nothing partial is ever visible.
struct ObjectPending {
    bucket: Arc<Bucket>,
    key: String,
    commit: Commit,
    chunks: Vec<Bytes>,
    current: Vec<u8>,
}

impl Write for ObjectPending {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.current.len() + buf.len() > CHUNK && !self.current.is_empty() {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK));
            self.chunks.push(Bytes::from(full));
        }
        self.current.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PendingFile for ObjectPending {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let mut chunks = std::mem::take(&mut self.chunks);
        chunks.push(Bytes::from(std::mem::take(&mut self.current)));
        self.bucket
            .put(&self.key, chunks, self.commit == Commit::CreateOnly)
    }

    fn abort(self: Box<Self>) {}

    fn describe(&self) -> String {
        format!("{}/{}", self.bucket.url, self.key)
    }
}

/// A stored file read by range: local, or an object fetched a range at a time.
pub enum StoreFile {
    Local(File),
    Object(ObjectFile),
}

impl Length for StoreFile {
    fn len(&self) -> u64 {
        match self {
            StoreFile::Local(f) => f.len(),
            StoreFile::Object(o) => o.len(),
        }
    }
}

impl ChunkReader for StoreFile {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(match self {
            StoreFile::Local(f) => Box::new(f.get_read(start)?),
            StoreFile::Object(o) => Box::new(o.get_read(start)?),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        match self {
            StoreFile::Local(f) => f.get_bytes(start, length),
            StoreFile::Object(o) => o.get_bytes(start, length),
        }
    }
}

/// A local file at `path`, written under a temporary name until committed.
fn pending_at(path: PathBuf, commit: Commit) -> Result<Box<dyn PendingFile>> {
    let tmp = layout::tmp_name(&path);
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(Box::new(LocalPending {
        file,
        tmp,
        path,
        commit,
    }))
}

/// Writes `bytes` to `path` whole or not at all (a file outside any shard set: reports, trainer
/// caches, exports), the way a local set commits a side file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = pending_at(path.to_path_buf(), Commit::Replace)?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", file.describe()))?;
    file.commit()
}

/// Renames a finished temporary file into place and makes the rename durable.
fn rename_durably(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    sync_parent(path);
    Ok(())
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).ok();
    }
}

pub fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
