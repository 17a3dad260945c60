//! Object storage for inputs: `s3://bucket/key…` (S3 and S3-compatible stores, configured from
//! the usual `AWS_*` environment). The rest of the pipeline is synchronous, so each call blocks
//! on a small tokio runtime; bodies are streamed (tars), read by range (Parquet footers and row
//! groups) or fetched many at a time (single images).

use std::io::Read;
use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use parquet::file::reader::{ChunkReader, Length};
use tokio::runtime::Runtime;

/// Single-image objects fetched at once by the reader thread.
pub const FETCH_AHEAD: usize = 16;

/// A bucket, reached through one client and one runtime.
pub struct Bucket {
    pub url: String,
    store: Arc<dyn ObjectStore>,
    runtime: Runtime,
}

/// `s3://bucket/rest` → (`bucket`, `rest`).
pub fn split_url(url: &str) -> Result<(&str, &str)> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url}: only s3:// object storage is read"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("{url}: no bucket name");
    }
    Ok((bucket, key))
}

impl Bucket {
    /// Connects to `bucket` with the credentials, region and endpoint of the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP`, …). Nothing is requested yet.
    pub fn open(bucket: &str) -> Result<Bucket> {
        // TLS uses ring (see Cargo.toml); a provider installed earlier stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("cannot configure S3 access to bucket {bucket}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .context("cannot start the S3 client's runtime")?;
        Ok(Bucket {
            url: format!("s3://{bucket}"),
            store: Arc::new(store),
            runtime,
        })
    }

    /// Every object under `prefix` (a folder: `a/b`), in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let mut objects: Vec<(String, u64)> = self
            .runtime
            .block_on(
                self.store
                    .list(prefix.as_ref())
                    .map_ok(|m| (m.location.to_string(), m.size))
                    .try_collect(),
            )
            .with_context(|| format!("cannot list {}/{}", self.url, prefix_text(&prefix)))?;
        objects.sort();
        Ok(objects)
    }

    /// The object's size, or None when there is no such object.
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        match self
            .runtime
            .block_on(self.store.head(&ObjectPath::from(key)))
        {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}/{key}", self.url)),
        }
    }

    /// The whole objects `keys`, fetched concurrently, in order.
    pub fn get_all(&self, keys: &[String]) -> Vec<std::io::Result<Bytes>> {
        self.runtime.block_on(
            futures::stream::iter(keys.iter().map(|key| async move {
                let got = self.store.get(&ObjectPath::from(key.as_str())).await;
                match got {
                    Ok(result) => result.bytes().await.map_err(std::io::Error::other),
                    Err(e) => Err(std::io::Error::other(e)),
                }
            }))
            .buffered(FETCH_AHEAD)
            .collect(),
        )
    }

    /// The object as a stream of bytes, read as they arrive.
    pub fn reader(self: &Arc<Self>, key: &str, from: u64) -> std::io::Result<ObjectRead> {
        let options = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..Default::default()
        };
        let stream = self
            .runtime
            .block_on(self.store.get_opts(&ObjectPath::from(key), options))
            .map_err(std::io::Error::other)?
            .into_stream();
        Ok(ObjectRead {
            bucket: self.clone(),
            stream,
            chunk: Bytes::new(),
        })
    }

    fn range(&self, key: &str, range: Range<u64>) -> std::io::Result<Bytes> {
        self.runtime
            .block_on(self.store.get_range(&ObjectPath::from(key), range))
            .map_err(std::io::Error::other)
    }
}

fn prefix_text(prefix: &Option<ObjectPath>) -> String {
    prefix.as_ref().map(|p| p.to_string()).unwrap_or_default()
}

/// An object's body as `Read`.
pub struct ObjectRead {
    bucket: Arc<Bucket>,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ObjectRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.bucket.runtime.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// An object read by range, for Parquet: the footer, then only the row groups' bytes.
#[derive(Clone)]
pub struct ObjectFile {
    pub bucket: Arc<Bucket>,
    pub key: String,
    pub size: u64,
}

impl Length for ObjectFile {
    fn len(&self) -> u64 {
        self.size
    }
}

impl ChunkReader for ObjectFile {
    type T = ObjectRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<ObjectRead> {
        self.bucket
            .reader(&self.key, start)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.bucket
            .range(&self.key, start..start + length as u64)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}
