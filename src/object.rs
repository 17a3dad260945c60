//! Object storage: `s3://bucket/key…` (S3 and S3-compatible stores, configured from the usual
//! `AWS_*` environment), for inputs (`source`) and shard sets (`store`). The rest of the pipeline
//! is synchronous, so each call blocks on a small tokio runtime; bodies are streamed (tars), read
//! by range (Parquet footers and row groups) or fetched many at a time (single images). Transient
//! failures (5xx, throttling, resets) are retried with back-off by the client and counted here.

use std::io::Read;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
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

/// A create-only commit refused because the name exists: another writer committed it first. Not
/// a full disk: the writer that gets this stops, and the message says who took over.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Single-image objects fetched at once by the reader thread.
pub const FETCH_AHEAD: usize = 16;

/// Requests that failed transiently in this process (and were retried unless retries ran out).
static TRANSIENT: AtomicU64 = AtomicU64::new(0);

/// Objects that were listed or named but could not be read: how many, and the first one's error.
static UNREADABLE: Mutex<(u64, Option<String>)> = Mutex::new((0, None));

/// Reads of input objects that failed in this process (each also an `io` line where a sample
/// was lost): how many, and the first one's error. A run that had any does not end as complete,
/// whatever `--max-failures` allows: the bucket, not the image, was at fault.
pub fn unreadable_objects() -> (u64, Option<String>) {
    UNREADABLE
        .lock()
        .map_or((0, None), |seen| (seen.0, seen.1.clone()))
}

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
            .map_err(|e| {
                anyhow!(
                    "cannot configure S3 access to bucket {bucket}: {}",
                    redact(&e.to_string())
                )
            })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .context("cannot start the S3 client's runtime")?;
        check_credentials(&store, &runtime, bucket)?;
        Ok(Bucket {
            url: format!("s3://{bucket}"),
            store: Arc::new(store),
            runtime,
        })
    }

    /// Every object under `prefix` (a folder: `a/b`), in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let prefix = self.prefix_path(prefix)?;
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
        let prefix = self.prefix_path(prefix)?;
        self.runtime
            .block_on(self.store.list_with_delimiter(prefix.as_ref()))
            .map(|_| ())
            .map_err(|e| self.explain(e, &prefix_text(&prefix)))
    }

    /// The object key `key` as object_store's `Path`, byte for byte. `Path::from` would
    /// percent-encode `%`, `#`, `?`, `~` and every non-ASCII byte, and so name another object
    /// (the client encodes the key for the URL once more); `Path::parse` keeps the key, and
    /// refuses what a `Path` cannot hold.
    fn path(&self, key: &str) -> Result<ObjectPath> {
        match ObjectPath::parse(key) {
            Ok(path) if path.as_ref() == key => Ok(path),
            _ => bail!(
                "{}/{key}: this object key cannot be addressed (an empty, `.` or `..` segment, a \
                 leading or trailing `/`, or a control character); rename the object",
                self.url
            ),
        }
    }

    /// `path` for a prefix to list under; the empty prefix is the whole bucket.
    fn prefix_path(&self, prefix: &str) -> Result<Option<ObjectPath>> {
        (!prefix.is_empty()).then(|| self.path(prefix)).transpose()
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
        anyhow!("{what}: {meaning}\n  the store said: {}", redact(&text))
    }

    /// Stores `chunks` as `key` in one PUT: the object appears whole or not at all. With
    /// `create_only` the store refuses a key that exists (`If-None-Match: *`), so two writers
    /// never replace each other's shard.
    pub fn put(&self, key: &str, chunks: Vec<Bytes>, create_only: bool) -> Result<()> {
        let token = format!(
            "{}-{}-{}",
            crate::host::hostname(),
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
        let path = self.path(key)?;
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
                let why = match crate::lease::taken_over(&self.url, |key| {
                    self.get_versioned(key)
                        .ok()
                        .map(|got| got.map(|(body, _, _)| body.to_vec()))
                }) {
                    Some(taken) => format!(
                        "{taken}, and committed this name first. This run stops; the other run \
                         goes on writing the set"
                    ),
                    None => "another writer committed it first (the store refused a second \
                             create). Only one run or worker may write a shard set or partition at \
                             a time"
                        .to_string(),
                };
                Err(Refused(format!("{}/{key} already exists: {why}", self.url)).into())
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
        let path = self.path(key)?;
        let put =
            self.runtime
                .block_on(self.store.put_opts(&path, PutPayload::from(body), options));
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
        let path = self.path(key)?;
        let got = self.runtime.block_on(async {
            match self.store.get(&path).await {
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
            .block_on(self.store.get_opts(&self.path(key)?, options))
            .map_err(|e| self.explain(e, key))?;
        Ok(got
            .attributes
            .get(&Attribute::Metadata(WRITER.into()))
            .map(|v| v.as_ref().to_string()))
    }

    /// The whole object, or None when there is no such object.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        let got = self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(result) => result.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map_err(|e| self.explain(e, key))
    }

    /// Removes `key`; a missing object is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        match self.runtime.block_on(self.store.delete(&self.path(key)?)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.explain(e, key)),
        }
    }

    /// The object's size, or None when there is no such object.
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.runtime.block_on(self.store.head(&self.path(key)?)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.explain(e, key)),
        }
    }

    /// The whole objects `keys`, fetched concurrently, in order.
    pub fn get_all(&self, keys: &[String]) -> Vec<std::io::Result<Bytes>> {
        self.runtime.block_on(
            futures::stream::iter(keys.iter().map(|key| async move {
                let path = self.path(key).map_err(io_error)?;
                match self.store.get(&path).await {
                    Ok(result) => result.bytes().await.map_err(|e| self.io_error(e, key)),
                    Err(e) => Err(self.io_error(e, key)),
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
        let path = self.path(key).map_err(io_error)?;
        let stream = self
            .runtime
            .block_on(self.store.get_opts(&path, options))
            .map_err(|e| self.io_error(e, key))?
            .into_stream();
        Ok(ObjectRead {
            bucket: self.clone(),
            key: key.to_string(),
            stream,
            chunk: Bytes::new(),
        })
    }

    fn range(&self, key: &str, range: Range<u64>) -> std::io::Result<Bytes> {
        let path = self.path(key).map_err(io_error)?;
        self.runtime
            .block_on(self.store.get_range(&path, range))
            .map_err(|e| self.io_error(e, key))
    }

    /// A failed read as an I/O error: a missing object says so plainly (it was listed, so it
    /// vanished or cannot be read as listed), anything else is `explain`ed.
    fn io_error(&self, e: object_store::Error, key: &str) -> std::io::Error {
        let error = match e {
            object_store::Error::NotFound { .. } => std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{}/{key}: no such object (it was listed or named; did it change since?)",
                    self.url
                ),
            ),
            e => io_error(self.explain(e, key)),
        };
        if let Ok(mut seen) = UNREADABLE.lock() {
            seen.0 += 1;
            seen.1.get_or_insert_with(|| error.to_string());
        }
        error
    }
}

fn io_error(e: anyhow::Error) -> std::io::Error {
    std::io::Error::other(format!("{e:#}"))
}

/// The environment variables that configure credentials, for messages.
const CREDENTIAL_VARS: &str =
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_SESSION_TOKEN \
     for temporary keys)";

/// Without keys in the environment the client falls back to a role (web identity, container,
/// or the instance metadata service). Asking for a credential once, before any work, tells a
/// machine with none apart from one whose requests fail, instead of an error about the
/// metadata service's address on the first request.
fn check_credentials(store: &AmazonS3, runtime: &Runtime, bucket: &str) -> Result<()> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID")
        || std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return Ok(());
    }
    let credential = runtime.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store.credentials().get_credential(),
        )
        .await
    });
    if let Ok(Ok(_)) = credential {
        return Ok(());
    }
    let role = [
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .into_iter()
    .find(|name| set(name));
    let said = match (role, credential) {
        (Some(name), Ok(Err(e))) => format!(
            "\n  {name} is set, and its provider said: {}",
            redact(&e.to_string())
        ),
        (Some(name), Err(_)) => {
            format!("\n  {name} is set, and its provider did not answer in 10 s")
        }
        _ => String::new(),
    };
    let profile = if set("AWS_PROFILE") {
        " AWS_PROFILE and ~/.aws are not read: export the profile's keys with \
         `eval \"$(aws configure export-credentials --profile NAME --format env)\"`."
    } else {
        ""
    };
    bail!(
        "s3://{bucket}: no credentials found. Set {CREDENTIAL_VARS}, or run where a role provides \
         them (EC2 instance profile, ECS task role, EKS web identity).{profile} A public bucket \
         is read without credentials with AWS_SKIP_SIGNATURE=true{said}"
    )
}

/// `text` without the user and password an endpoint URL may carry
/// (`http://user:secret@host`): error messages quote request URLs.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority = tail
            .find(|c: char| c == '/' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority].rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                rest = &tail[user_end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    for password in endpoint_passwords() {
        out = out.replace(&password, "***");
    }
    out
}

/// Passwords in the userinfo of the endpoint variables, wherever else they might be quoted.
fn endpoint_passwords() -> Vec<String> {
    std::env::vars()
        .filter(|(name, _)| name.starts_with("AWS_") && name.contains("ENDPOINT"))
        .filter_map(|(_, url)| {
            let authority = url.split_once("://")?.1.split('/').next()?.to_string();
            let userinfo = authority.rsplit_once('@')?.0;
            let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
            (password.len() >= 4).then(|| password.to_string())
        })
        .collect()
}

fn prefix_text(prefix: &Option<ObjectPath>) -> String {
    prefix.as_ref().map(|p| p.to_string()).unwrap_or_default()
}

/// An object's body as `Read`.
pub struct ObjectRead {
    bucket: Arc<Bucket>,
    key: String,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ObjectRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.bucket.runtime.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(self.bucket.io_error(e, &self.key)),
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

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_takes_the_userinfo_out_of_every_url_and_nothing_else() {
        assert_eq!(
            redact("GET http://u:p4ss@127.0.0.1:9000/b/k@2x.png failed; PUT https://x@h/y"),
            "GET http://***@127.0.0.1:9000/b/k@2x.png failed; PUT https://***@h/y"
        );
        assert_eq!(
            redact("s3://bucket/a@b.png and http://host:1/p"),
            "s3://bucket/a@b.png and http://host:1/p"
        );
    }
}
