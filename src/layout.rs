//! The folder layout of a shard set: side-file names, shape folders, the scope a run writes
//! (whole set or one partition) and the names of files not yet complete. Part of the format
//! (`format` re-exports it); apart so that `store`, which `format` reads through, names
//! temporaries without using `format`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Side files of a shard set.
pub const SUCCESS: &str = "_SUCCESS";
pub const ERRORS: &str = "_errors.jsonl";
pub const MANIFEST: &str = "_manifest.jsonl";
pub const CONFIG: &str = "_config.toml";
/// One line per run that wrote into the set: its run settings (threads, batch size, …).
pub const RUNS: &str = "_runs.jsonl";
/// The output folder's writer lock (`flock`).
pub const LOCK: &str = "_lock";
/// A many-worker run's fixed plan (partition count, units, identity): `partition_files.rs`.
pub const PLAN: &str = "_plan.json";
/// Per-partition side files: done markers, errors, runs, locks.
pub const PARTITIONS: &str = "_partitions";

/// The input shape of one shape folder: W×H for images, W×H×T for clips of T frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputShape {
    pub width: u32,
    pub height: u32,
    /// Frames per window, for clips.
    pub frames: Option<u32>,
}

impl InputShape {
    pub fn image(width: u32, height: u32) -> Self {
        InputShape {
            width,
            height,
            frames: None,
        }
    }
}

/// `<W>x<H>` (images) or `<W>x<H>x<T>` (clips): the folder of one input shape.
pub fn shape_dir_name(shape: InputShape) -> String {
    match shape.frames {
        None => format!("{}x{}", shape.width, shape.height),
        Some(t) => format!("{}x{}x{t}", shape.width, shape.height),
    }
}

/// The input shape a shape folder name stands for.
pub fn parse_shape_dir(name: &str) -> Option<InputShape> {
    let mut parts = name.split('x');
    let width = parts.next()?.parse().ok()?;
    let height = parts.next()?.parse().ok()?;
    let frames = match parts.next() {
        Some(t) => Some(t.parse().ok()?),
        None => None,
    };
    let shape = InputShape {
        width,
        height,
        frames,
    };
    (parts.next().is_none() && shape_dir_name(shape) == name).then_some(shape)
}

/// What one run writes in a set: all of it, or one partition of a many-worker run. A
/// partition's shards and side files are named by it, so workers never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Whole,
    Partition(usize),
}

impl Scope {
    /// `part-NNNNN.parquet`, or `part-pPPPPP-NNNNN.parquet` in partition P.
    pub fn part_name(self, number: usize) -> String {
        match self {
            Scope::Whole => format!("part-{number:05}.parquet"),
            Scope::Partition(p) => format!("part-p{p:05}-{number:05}.parquet"),
        }
    }

    /// The number of a shard file this scope wrote (None for another scope's), for numbering
    /// the next and for reading back only its own rows.
    pub fn part_number(self, name: &str) -> Option<usize> {
        let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        let number = match self {
            Scope::Whole => stem,
            Scope::Partition(p) => stem.strip_prefix(&format!("p{p:05}-"))?,
        };
        number
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| number.parse().ok())
            .flatten()
    }

    /// Whether `shard` (`<W>x<H>/part-….parquet`) is this scope's.
    pub fn owns(self, shard: &str) -> bool {
        let name = shard.rsplit('/').next().unwrap_or(shard);
        self.part_number(name).is_some()
    }

    fn side(self, whole: &str, suffix: &str) -> String {
        match self {
            Scope::Whole => whole.to_string(),
            Scope::Partition(p) => format!("{PARTITIONS}/p{p:05}.{suffix}"),
        }
    }

    /// Its failures (`_errors.jsonl`; a partition's are merged into it by `finalize`).
    pub fn errors(self) -> String {
        self.side(ERRORS, "errors.jsonl")
    }

    /// Its runs' settings, one JSON line per run.
    pub fn runs(self) -> String {
        self.side(RUNS, "runs.jsonl")
    }

    /// Its writer's lock.
    pub fn lock(self) -> String {
        self.side(LOCK, "lock")
    }
}

/// A partition's done marker, written last when all of its inputs are committed.
pub fn done_marker(partition: usize) -> String {
    format!("{PARTITIONS}/p{partition:05}.json")
}

/// A shard file name: `part-*.parquet`, not hidden. Anything else in a shape folder is foreign.
pub fn is_shard_name(name: &str) -> bool {
    name.starts_with("part-") && name.ends_with(".parquet")
}

/// Where a file is written before it is complete: hidden, named by the writing process (many
/// workers may write the same side file at once), and removed by the next run of its scope.
pub fn tmp_name(path: &Path) -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let name = path.file_name().expect("file path").to_string_lossy();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}-{seq}.tmp", std::process::id()))
}

/// Whether the temporary file `name` is one a run of `scope` left: a partition's worker removes
/// only its partition's, a whole-set run (which holds the set's lock) all of them.
pub fn is_tmp_of(name: &str, scope: Scope) -> bool {
    is_tmp_name(name)
        && match scope {
            Scope::Whole => true,
            Scope::Partition(p) => {
                name.starts_with(&format!(".part-p{p:05}-"))
                    || name.starts_with(&format!(".p{p:05}."))
            }
        }
}

pub fn is_tmp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// A shard's path relative to its set, `/`-separated (`256x256/part-00000.parquet`).
pub fn relative(out: &Path, shard: &Path) -> String {
    let rel = shard.strip_prefix(out).unwrap_or(shard);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_folders_name_images_and_clip_windows_one_way() {
        for shape in [
            InputShape::image(1024, 768),
            InputShape {
                width: 832,
                height: 480,
                frames: Some(81),
            },
        ] {
            assert_eq!(parse_shape_dir(&shape_dir_name(shape)), Some(shape));
        }
        assert_eq!(shape_dir_name(InputShape::image(64, 32)), "64x32");
        for not_a_shape in [
            "64x",
            "64x64x",
            "064x64",
            "64x64x5x1",
            "64X64",
            "_errors",
            "64x64x+5",
        ] {
            assert_eq!(parse_shape_dir(not_a_shape), None, "{not_a_shape}");
        }
    }
}
