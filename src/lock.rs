//! Lock: one writer per output folder. Takes a shard set (and a scope, so that many workers can
//! each hold their own lock in one set), hands on a held lock that names its holder (pid, host,
//! start time) in the refusal message.
//! - A local folder: an `flock` on a file in it. The kernel drops it when the process ends,
//!   however it ends, so a `kill -9` leaves none behind.
//! - An object store has no locks: a lease object, created only if absent, renewed every
//!   `RENEW` by a conditional PUT (`If-Match`), deleted on release. A killed holder's lease is
//!   taken over once it is `LEASE_TTL` old, or at once from the same machine when the holder's
//!   process is gone.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use object_store::{PutMode, UpdateVersion};

use crate::host::{hostname, now_utc};
use crate::lease::{LeaseBody, HELD, LEASE_TTL};
use crate::object::Bucket;

/// How often a held lease is renewed.
pub const RENEW: Duration = Duration::from_secs(30);

/// A held lock; released when dropped (or, for a local folder, when the process dies).
#[derive(Debug)]
pub enum OutputLock {
    Local { _file: File, path: PathBuf },
    Lease(Lease),
}

impl OutputLock {
    /// Takes the lock file `name` in `dir` (created if missing) without waiting. Refuses with the
    /// holder's pid, host and start time when another process holds it.
    pub fn acquire(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "{} is being written by another vae-pipeline run ({}). One run writes an output \
                     folder at a time: wait for it, or stop it and rerun this command to resume",
                    dir.display(),
                    if holder.is_empty() {
                        "holder unknown".to_string()
                    } else {
                        holder.to_string()
                    }
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        let holder = format!(
            "pid {} on {}, started {}",
            std::process::id(),
            hostname(),
            now_utc()
        );
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(holder.as_bytes())?;
        file.flush()?;
        Ok(OutputLock::Local { _file: file, path })
    }
}

/// A held lease on an object store, renewed by a background thread until dropped.
pub struct Lease {
    bucket: Arc<Bucket>,
    key: String,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({}/{})", self.bucket.url, self.key)
    }
}

impl Lease {
    /// Takes the lease `key` for the set `what` (for messages), or refuses naming its holder.
    pub fn acquire(bucket: Arc<Bucket>, key: &str, what: &str) -> Result<OutputLock> {
        let body = serde_json::to_vec(&LeaseBody {
            holder: format!(
                "pid {} on {}, started {}",
                std::process::id(),
                hostname(),
                now_utc()
            ),
            host: hostname(),
            pid: std::process::id(),
        })?;
        let mut version = bucket.put_if(key, body.clone(), PutMode::Create)?;
        if version.is_none() {
            if let Some((held, held_version, modified)) = bucket.get_versioned(key)? {
                let (live, age, holder) = judge(&held, modified);
                if live {
                    bail!(
                        "{what} is being written by another vae-pipeline run ({holder}; lease renewed \
                         {age} s ago). One run writes a set or partition at a time: wait for it, or \
                         stop it and rerun this command to resume. A killed run's lease is taken \
                         over {} s after its last renewal (at once from the machine it ran on)",
                        LEASE_TTL.as_secs()
                    );
                }
                version = bucket.put_if(key, body.clone(), PutMode::Update(held_version))?;
            } else {
                version = bucket.put_if(key, body.clone(), PutMode::Create)?;
            }
        }
        let Some(version) = version else {
            bail!("{what} is being written by another vae-pipeline run (it took the lease {key} first)");
        };
        let stop = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (bucket, key, body, stop) =
                (bucket.clone(), key.to_string(), body.clone(), stop.clone());
            std::thread::Builder::new()
                .name("lease".into())
                .spawn(move || renew(&bucket, &key, body, version, &stop))
                .context("cannot start the lease thread")?
        };
        if let Ok(mut held) = HELD.lock() {
            held.push((bucket.url.clone(), key.to_string(), body));
        }
        Ok(OutputLock::Lease(Lease {
            bucket,
            key: key.to_string(),
            stop,
            renewer: Some(renewer),
        }))
    }
}

impl Lease {
    /// Whether the lease `key` exists and was renewed within `LEASE_TTL` (by a process that, on
    /// this machine, is still alive).
    pub fn is_live(bucket: &Bucket, key: &str) -> Result<bool> {
        Ok(bucket
            .get_versioned(key)?
            .is_some_and(|(held, _, modified)| judge(&held, modified).0))
    }
}

/// Whether a lease object (its body, its last-modified time) is live: renewed within `LEASE_TTL`
/// and, when its holder ran on this machine, by a process still alive. With its age and holder.
fn judge(body: &[u8], modified: i64) -> (bool, u64, String) {
    let held: Option<LeaseBody> = serde_json::from_slice(body).ok();
    let age = unix_now().saturating_sub(modified.max(0) as u64);
    let gone_here = held
        .as_ref()
        .is_some_and(|h| h.host == hostname() && !Path::new(&format!("/proc/{}", h.pid)).exists());
    let holder = held.map_or("holder unknown".to_string(), |h| h.holder);
    (age < LEASE_TTL.as_secs() && !gone_here, age, holder)
}

/// Renews the lease every `RENEW` until `stop`; a failed condition means another run took it
/// over (this one was presumed dead), which is reported: create-only commits still refuse its
/// shards.
fn renew(bucket: &Bucket, key: &str, body: Vec<u8>, mut version: UpdateVersion, stop: &AtomicBool) {
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(500));
        if last.elapsed() < RENEW || stop.load(Ordering::Relaxed) {
            continue;
        }
        match bucket.put_if(key, body.clone(), PutMode::Update(version.clone())) {
            Ok(Some(renewed)) => {
                version = renewed;
                last = Instant::now();
            }
            Ok(None) => {
                eprintln!(
                    "warning: the lease {}/{key} was taken over by another run",
                    bucket.url
                );
                stop.store(true, Ordering::Relaxed);
            }
            Err(e) => eprintln!("warning: cannot renew the lease: {e:#}"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let lost = self.stop.swap(true, Ordering::Relaxed);
        if let Some(renewer) = self.renewer.take() {
            renewer.thread().unpark();
            let _ = renewer.join();
        }
        if !lost {
            let _ = self.bucket.delete(&self.key);
        }
        if let Ok(mut held) = HELD.lock() {
            held.retain(|(url, key, _)| *url != self.bucket.url || *key != self.key);
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a live process holds the `flock` on `path` (a missing file is not held).
pub fn is_held(path: &Path) -> Result<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}
