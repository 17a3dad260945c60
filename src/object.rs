//! Object storage: `s3://bucket/key…` (S3 and S3-compatible stores, configured from the usual
//! `AWS_*` environment), for inputs (`source`) and shard sets (`store`). The rest of the pipeline
//! is synchronous, so each call blocks on a small tokio runtime; bodies are streamed (tars), read
//! by range (Parquet footers and row groups) or fetched many at a time (single images). Transient
//! failures (5xx, throttling, resets) are retried with back-off by the client and counted here.

use std::io::Read;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, UpdateVersion,
};
use parquet::file::reader::{ChunkReader, Length};
use tokio::runtime::Runtime;

/// Single-image objects fetched at once by the reader thread.
pub const FETCH_AHEAD: usize = 16;

/// Requests that failed transiently in this process (and were retried unless retries ran out).
static TRANSIENT: AtomicU64 = AtomicU64::new(0);

/// How many S3 requests failed transiently (5xx, 429, connection errors) so far; the client
/// retried each with exponential back-off (up to 10 times or 3 minutes per request).
pub fn transient_failures() -> u64 {
    TRANSIENT.load(Ordering::Relaxed)
}

/// The object_store HTTP client, counting transient failures on their way to its retry loop.
#[derive(Debug)]
struct CountingService(HttpClient);

#[async_trait::async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = self.0.execute(req).await;
        let transient = match &response {
            Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
            Err(_) => true,
        };
        if transient {
            TRANSIENT.fetch_add(1, Ordering::Relaxed);
        }
        response
    }
}

#[derive(Debug, Default)]
struct CountingConnector;

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CountingService(inner)))
    }
}

/// The user-metadata field naming a committed object's writer: a create-only PUT that the client
/// retried after the store had already taken it is recognised as our own.
const WRITER: &str = "vae-pipeline-writer";

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
            .with_http_connector(CountingConnector)
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
            .map_err(|e| self.explain(e, &prefix_text(&prefix)))?;
        objects.sort();
        Ok(objects)
    }

    /// Checks that `prefix` can be listed (the bucket exists, the credentials are accepted, the
    /// prefix is not denied), with a message that says which when it cannot.
    pub fn check(&self, prefix: &str) -> Result<()> {
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        self.runtime
            .block_on(self.store.list_with_delimiter(prefix.as_ref()))
            .map(|_| ())
            .map_err(|e| self.explain(e, &prefix_text(&prefix)))
    }

    /// An error with what it means for the user: credentials rejected, no such bucket, or access
    /// denied (the store's own words follow; they never hold the secret).
    pub fn explain(&self, e: object_store::Error, key: &str) -> anyhow::Error {
        let text = e.to_string();
        let what = format!("{}/{key}", self.url);
        let meaning = if text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || matches!(e, object_store::Error::Unauthenticated { .. })
        {
            "the credentials were rejected: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (or the profile and session token in use)"
                .to_string()
        } else if text.contains("NoSuchBucket") {
            format!(
                "bucket {} does not exist (check the name, AWS_REGION and AWS_ENDPOINT_URL)",
                self.url
            )
        } else if matches!(e, object_store::Error::PermissionDenied { .. }) {
            "access denied: the credentials are valid but may not use this prefix".to_string()
        } else {
            "request failed".to_string()
        };
        anyhow!("{what}: {meaning}\n  the store said: {text}")
    }

    /// Stores `chunks` as `key` in one PUT: the object appears whole or not at all. With
    /// `create_only` the store refuses a key that exists (`If-None-Match: *`), so two writers
    /// never replace each other's shard.
    pub fn put(&self, key: &str, chunks: Vec<Bytes>, create_only: bool) -> Result<()> {
        let token = format!(
            "{}-{}-{}",
            crate::lock::hostname(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(WRITER.into()), token.clone().into());
        let options = PutOptions {
            mode: if create_only {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            attributes,
            ..Default::default()
        };
        let path = ObjectPath::from(key);
        let put = self.runtime.block_on(self.store.put_opts(
            &path,
            PutPayload::from_iter(chunks),
            options,
        ));
        match put {
            Ok(_) => Ok(()),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) if create_only => {
                if self.writer(key)?.as_deref() == Some(token.as_str()) {
                    return Ok(());
                }
                bail!(
                    "{}/{key} already exists: another writer committed it first (the store refused \
                     a second create). Only one run or worker may write a shard set or partition \
                     at a time",
                    self.url
                )
            }
            Err(e) => Err(self.explain(e, key)),
        }
    }

    /// A small object written only if `mode` holds (`Create`: absent; `Update`: unchanged since
    /// read). Returns its new version, or None when the condition failed (another writer).
    pub fn put_if(&self, key: &str, body: Vec<u8>, mode: PutMode) -> Result<Option<UpdateVersion>> {
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        let put = self.runtime.block_on(self.store.put_opts(
            &ObjectPath::from(key),
            PutPayload::from(body),
            options,
        ));
        match put {
            Ok(done) => Ok(Some(UpdateVersion {
                e_tag: done.e_tag,
                version: done.version,
            })),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(None),
            Err(e) => Err(self.explain(e, key)),
        }
    }

    /// A small object with its version and the store's last-modified time (Unix seconds).
    pub fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, UpdateVersion, i64)>> {
        let got = self.runtime.block_on(async {
            match self.store.get(&ObjectPath::from(key)).await {
                Ok(result) => {
                    let meta = result.meta.clone();
                    let body = result.bytes().await?;
                    let version = UpdateVersion {
                        e_tag: meta.e_tag,
                        version: meta.version,
                    };
                    Ok(Some((body, version, meta.last_modified.timestamp())))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map_err(|e| self.explain(e, key))
    }

    /// The writer token a committed object carries, if any.
    fn writer(&self, key: &str) -> Result<Option<String>> {
        let options = GetOptions {
            head: true,
            ..Default::default()
        };
        let got = self
            .runtime
            .block_on(self.store.get_opts(&ObjectPath::from(key), options))
            .map_err(|e| self.explain(e, key))?;
        Ok(got
            .attributes
            .get(&Attribute::Metadata(WRITER.into()))
            .map(|v| v.as_ref().to_string()))
    }

    /// The whole object, or None when there is no such object.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let got = self.runtime.block_on(async {
            match self.store.get(&ObjectPath::from(key)).await {
                Ok(result) => result.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map_err(|e| self.explain(e, key))
    }

    /// Removes `key`; a missing object is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        match self
            .runtime
            .block_on(self.store.delete(&ObjectPath::from(key)))
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.explain(e, key)),
        }
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
