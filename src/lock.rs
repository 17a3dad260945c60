//! Lock: one writer per output folder. Takes an output folder (and a scope, so that many workers
//! can each hold their own lock in one shard set), hands on a held `flock` on a file in it. The
//! kernel drops the lock when the process ends, however it ends, so a `kill -9` leaves none
//! behind; the file itself names the holder (pid, host, start time) for the refusal message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    pub path: PathBuf,
}

impl OutputLock {
    /// Takes the lock file `name` in `dir` (created if missing) without waiting. Refuses with the
    /// holder's pid, host and start time when another process holds it.
    pub fn acquire(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
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
        Ok(OutputLock { _file: file, path })
    }
}

/// This machine's name, from the kernel.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown host".into())
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
