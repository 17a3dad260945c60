//! Inputs that could not be used: one vocabulary for `precompute` (`_errors.jsonl`) and `report`
//! (`errors.jsonl`). Every stage that can refuse an image hands on a `Failure`, and it is
//! recorded, so nothing is silently dropped.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Zero-byte file.
    Empty,
    /// Claims an image format but cannot be decoded completely.
    Corrupt,
    /// A recognized image format this tool does not decode.
    Unsupported,
    /// Header dimensions above the pixel limit.
    TooLarge,
    /// Shorter side below `--min-size`.
    TooSmall,
    /// Unreadable file or folder (permissions, vanished, symlink loop).
    Io,
    /// The encoder produced NaN or Inf for this image.
    Nonfinite,
    /// Same bytes as an earlier input (`--dedupe`).
    Duplicate,
    /// `report --shards`: the source changed since its row was written.
    Stale,
    /// An archive member or sample this tool will not use: an unsafe name, a link or device, a
    /// duplicate key, no image.
    Refused,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Empty => "empty",
            FailureKind::Corrupt => "corrupt",
            FailureKind::Unsupported => "unsupported",
            FailureKind::TooLarge => "too_large",
            FailureKind::TooSmall => "too_small",
            FailureKind::Io => "io",
            FailureKind::Nonfinite => "nonfinite",
            FailureKind::Duplicate => "duplicate",
            FailureKind::Stale => "stale",
            FailureKind::Refused => "refused",
        }
    }
}

/// One line of `_errors.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub key: String,
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(key: impl Into<String>, kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            key: key.into(),
            kind,
            message: message.into(),
        }
    }
}
