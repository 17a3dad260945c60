//! `--input` → a `Source`: a folder (walked), one file, a glob (`data/*.tar`) or a brace range as
//! WebDataset users write it (`data/{00000..00099}.tar`, `{a,b}`), locally or under `s3://`;
//! checked before any work (missing files, credentials, buckets, Parquet columns).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use std::sync::Arc;

use super::files::{FileKind, FilesSource, Place, Unit};
use super::parquet::{self, ParquetColumns};
use super::{escape_bytes, key_of, key_problem, FolderSource, Source};
use crate::failure::{Failure, FailureKind};
use crate::object::{self, Bucket, ObjectFile};

/// Brace expansions beyond this many names are refused (a typo, not a dataset).
const MAX_EXPANDED: usize = 10_000_000;

/// The source `--input` names, with Parquet files' columns checked.
pub fn open(input: &Path, columns: &ParquetColumns) -> Result<Box<dyn Source + Send>> {
    let text = input.to_string_lossy();
    if text.starts_with("s3://") {
        return open_objects(&text, columns);
    }
    if let Some((scheme, _)) = text.split_once("://") {
        bail!("--input {text}: {scheme}:// is not read; s3:// (and S3-compatible stores) is");
    }
    let (root, files) = if !text.contains(SPECIAL) {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("--input {} does not exist", input.display()))?;
        if meta.is_dir() {
            let root = std::fs::canonicalize(input)
                .with_context(|| format!("cannot resolve --input {}", input.display()))?;
            let folder = FolderSource::new(&root).with_columns(columns.clone());
            check_parquet_files(folder.parquet_files(), columns)?;
            return Ok(Box::new(folder));
        }
        let kind = FileKind::of_path(input).with_context(|| {
            format!(
                "--input {} is neither a folder, an image, a tar (.tar, .tar.gz) nor a Parquet file",
                input.display()
            )
        })?;
        let root = input.parent().unwrap_or(Path::new("")).to_path_buf();
        (root, vec![(input.to_path_buf(), kind)])
    } else {
        matched(&text)?
    };
    let parquet = files.iter().filter(|(_, k)| *k == FileKind::Parquet);
    check_parquet_files(parquet.map(|(path, _)| path.clone()).collect(), columns)?;
    let root = key_root(root, &files);
    let units = files
        .into_iter()
        .map(|(path, kind)| {
            let key = key_of(&root, &path);
            if let Some(why) = key_problem(&key) {
                bail!(
                    "--input {text}: {} gives the key {key:?} relative to {:?}, which breaks \
                     FORMAT.md's key rule ({why}); name the files by paths below one folder, \
                     without `..`",
                    path.display(),
                    root.display()
                );
            }
            Ok(Unit {
                key,
                kind,
                place: Place::Local(path),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Box::new(FilesSource::new(
        Some(root),
        None,
        units,
        Vec::new(),
        columns.clone(),
    )))
}

const SPECIAL: [char; 4] = ['*', '?', '[', '{'];

/// Checks the Parquet files' columns before any work (and warns once about columns that will
/// not be stored); without Parquet files, the column flags are refused.
fn check_parquet_files(paths: Vec<PathBuf>, columns: &ParquetColumns) -> Result<()> {
    if paths.is_empty() {
        return check_columns_unused(columns);
    }
    let mut ignored = Vec::new();
    for path in paths {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        ignored.extend(parquet::check(&file, &path.display().to_string(), columns)?);
    }
    parquet::warn_ignored(ignored);
    Ok(())
}

/// The folder keys are relative to: the pattern's literal head when every file lies below it;
/// else (an absolute brace list, `{../a,../b}`) the files' deepest common folder, so that a
/// key's FILE part never starts with `/` or holds `..`.
fn key_root(head: PathBuf, files: &[(PathBuf, FileKind)]) -> PathBuf {
    let below = |root: &Path, path: &Path| {
        path.strip_prefix(root).is_ok_and(|rel| {
            rel.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
    };
    if files.iter().all(|(path, _)| below(&head, path)) {
        return head;
    }
    let folders: Vec<Vec<_>> = files
        .iter()
        .map(|(path, _)| {
            path.parent()
                .map(|p| p.components().collect())
                .unwrap_or_default()
        })
        .collect();
    let mut common = folders.first().cloned().unwrap_or_default();
    for folder in &folders {
        let same = common
            .iter()
            .zip(folder)
            .take_while(|(a, b)| a == b)
            .count();
        common.truncate(same);
    }
    common.iter().collect()
}

/// `s3://bucket/…`: a prefix (its images and their sidecars, like a folder), one object, or a glob
/// or brace pattern over object keys (images, tars and Parquet files).
fn open_objects(url: &str, columns: &ParquetColumns) -> Result<Box<dyn Source + Send>> {
    let (name, pattern) = object::split_url(url)?;
    let bucket = Arc::new(Bucket::open(name)?);
    let head = &pattern[..pattern.find(SPECIAL).unwrap_or(pattern.len())];
    let root = head.rsplit_once('/').map_or("", |(dir, _)| dir).to_string();
    let mut found: Vec<(String, u64, FileKind)> = Vec::new();
    let mut folder = false;
    let single = match pattern {
        "" => None,
        p if p.ends_with('/') => None,
        p => bucket.size(p)?,
    };
    // A key may hold `*`, `?`, `[` or `{` itself: an object named exactly is that object, and a
    // prefix (ending in `/`) is listed as written, as no glob matches a folder.
    let literal = single.is_some() || pattern.ends_with('/') || !pattern.contains(SPECIAL);
    if literal {
        match single {
            Some(size) => {
                let kind = FileKind::of(pattern).with_context(|| {
                    format!("--input {url} is neither an image, a tar nor a Parquet file")
                })?;
                found.push((pattern.to_string(), size, kind));
            }
            None => folder = true,
        }
    } else {
        let listed = bucket.list(&root)?;
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        let mut missing = Vec::new();
        for p in expand_braces(pattern)? {
            if p.contains(['*', '?', '[']) {
                let glob = glob::Pattern::new(&p)
                    .with_context(|| format!("--input {url}: bad glob {p}"))?;
                for (key, size) in &listed {
                    if glob.matches_with(key, options) {
                        if let Some(kind) = FileKind::of(key) {
                            found.push((key.clone(), *size, kind));
                        }
                    }
                }
            } else {
                match listed.iter().find(|(key, _)| *key == p) {
                    Some((key, size)) => {
                        let kind = FileKind::of(key).with_context(|| {
                            format!("{p} (named by --input) is neither an image, a tar nor a Parquet file")
                        })?;
                        found.push((key.clone(), *size, kind));
                    }
                    None => missing.push(p),
                }
            }
        }
        if !missing.is_empty() {
            bail!(
                "--input {url}: {} named object(s) do not exist, e.g. {}",
                missing.len(),
                missing[..missing.len().min(3)].join(", ")
            );
        }
        if found.is_empty() {
            bail!("--input {url} matches no image, tar or Parquet object");
        }
    }
    let root = if folder {
        pattern.trim_end_matches('/').to_string()
    } else if literal {
        pattern
            .rsplit_once('/')
            .map_or("", |(dir, _)| dir)
            .to_string()
    } else {
        root
    };
    let listed = if folder {
        bucket.list(&root)?
    } else {
        Vec::new()
    };
    if folder && listed.is_empty() && !pattern.is_empty() && !pattern.ends_with('/') {
        bail!(
            "--input {url}: there is no object {pattern} in {}, nor any object under {pattern}/ \
             (object keys are matched exactly: case, spaces and Unicode normalization count)",
            bucket.url
        );
    }
    let names: std::collections::HashSet<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    let sidecar = |key: &str, ext: &str| {
        let stem = key.rsplit_once('.').map_or(key, |(s, _)| s);
        let name = format!("{stem}.{ext}");
        names.contains(name.as_str()).then_some(name)
    };
    if folder {
        found = listed
            .iter()
            .filter_map(|(key, size)| Some((key.clone(), *size, FileKind::of(key)?)))
            .collect();
    }
    if found.iter().any(|(_, _, k)| *k == FileKind::Parquet) {
        let mut ignored = Vec::new();
        for (key, size, _) in found.iter().filter(|(_, _, k)| *k == FileKind::Parquet) {
            let file = ObjectFile {
                bucket: bucket.clone(),
                key: key.clone(),
                size: *size,
            };
            let name = format!("{}/{key}", bucket.url);
            ignored.extend(parquet::check(&file, &name, columns)?);
        }
        parquet::warn_ignored(ignored);
    } else {
        check_columns_unused(columns)?;
    }
    let mut units = Vec::new();
    let mut refused = Vec::new();
    for (key, size, kind) in found {
        let rel = match root.as_str() {
            "" => key.as_str(),
            root => key
                .strip_prefix(root)
                .and_then(|k| k.strip_prefix('/'))
                .unwrap_or(&key),
        };
        let unit_key = rel
            .split('/')
            .map(|c| escape_bytes(c.as_bytes()))
            .collect::<Vec<_>>()
            .join("/");
        if let Some(why) = key_problem(&unit_key) {
            refused.push(Failure::new(
                unit_key,
                FailureKind::Refused,
                format!("object key {key:?} cannot give keys ({why}): refused"),
            ));
            continue;
        }
        let (caption, json) = if kind == FileKind::Image {
            (
                sidecar(&key, "txt").or_else(|| sidecar(&key, "caption")),
                sidecar(&key, "json"),
            )
        } else {
            (None, None)
        };
        units.push(Unit {
            key: unit_key,
            kind,
            place: Place::Object {
                key,
                size,
                caption,
                json,
            },
        });
    }
    Ok(Box::new(FilesSource::new(
        None,
        Some(bucket),
        units,
        refused,
        columns.clone(),
    )))
}

/// The files a glob or brace pattern names, in the pattern's order (numeric for ranges, name
/// order within a glob), and the folder keys are relative to: the pattern's literal head.
fn matched(text: &str) -> Result<(PathBuf, Vec<(PathBuf, FileKind)>)> {
    let head = &text[..text.find(SPECIAL).unwrap_or(text.len())];
    let root = PathBuf::from(head.rsplit_once('/').map_or("", |(dir, _)| dir));
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut missing = Vec::new();
    for pattern in expand_braces(text)? {
        if pattern.contains(['*', '?', '[']) {
            let mut paths: Vec<PathBuf> = glob::glob(&pattern)
                .with_context(|| format!("--input {text}: bad glob {pattern}"))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            paths.sort();
            for path in paths {
                // Sidecars and other files a glob catches are not inputs.
                if let Some(kind) = FileKind::of_path(&path) {
                    if seen.insert(path.clone()) {
                        files.push((path, kind));
                    }
                }
            }
        } else {
            let path = PathBuf::from(&pattern);
            if !path.is_file() {
                missing.push(pattern);
                continue;
            }
            let kind = FileKind::of_path(&path).with_context(|| {
                format!(
                    "{pattern} (named by --input) is neither an image, a tar nor a Parquet file"
                )
            })?;
            if seen.insert(path.clone()) {
                files.push((path, kind));
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "--input {text}: {} named file(s) do not exist, e.g. {}",
            missing.len(),
            missing[..missing.len().min(3)].join(", ")
        );
    }
    if files.is_empty() {
        bail!("--input {text} matches no image, tar or Parquet file");
    }
    Ok((root, files))
}

fn check_columns_unused(columns: &ParquetColumns) -> Result<()> {
    if columns.image.is_some() || columns.key.is_some() || columns.caption.is_some() {
        bail!("--image-column, --key-column and --caption-column apply to Parquet inputs, and --input names none");
    }
    Ok(())
}

/// Expands every `{A..B}` (integers, zero-padded to A's width when A has a leading zero) and
/// `{x,y,z}` group, left to right.
pub fn expand_braces(text: &str) -> Result<Vec<String>> {
    let Some(open) = text.find('{') else {
        return Ok(vec![text.to_string()]);
    };
    let close = open
        + text[open..]
            .find('}')
            .with_context(|| format!("--input {text}: `{{` without `}}`"))?;
    let inner = &text[open + 1..close];
    let choices: Vec<String> = if let Some((a, b)) = inner.split_once("..") {
        let (lo, hi): (u64, u64) = (
            a.parse()
                .with_context(|| format!("--input {text}: {{{inner}}} is not a range"))?,
            b.parse()
                .with_context(|| format!("--input {text}: {{{inner}}} is not a range"))?,
        );
        if hi < lo || hi - lo >= MAX_EXPANDED as u64 {
            bail!("--input {text}: {{{inner}}} must count up by fewer than {MAX_EXPANDED}");
        }
        let width = if a.len() > 1 && a.starts_with('0') {
            a.len()
        } else {
            0
        };
        (lo..=hi).map(|n| format!("{n:0width$}")).collect()
    } else {
        inner.split(',').map(str::to_string).collect()
    };
    let rest = expand_braces(&text[close + 1..])?;
    if choices.len().saturating_mul(rest.len()) > MAX_EXPANDED {
        bail!("--input {text} expands to more than {MAX_EXPANDED} names");
    }
    let head = &text[..open];
    Ok(choices
        .iter()
        .flat_map(|c| rest.iter().map(move |r| format!("{head}{c}{r}")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{expand_braces, key_root, FileKind};
    use std::path::PathBuf;

    #[test]
    fn keys_are_relative_to_the_pattern_folder_or_else_the_common_folder() {
        let root = |head: &str, files: &[&str]| {
            let files: Vec<_> = files
                .iter()
                .map(|f| (PathBuf::from(f), FileKind::Tar))
                .collect();
            key_root(PathBuf::from(head), &files)
        };
        assert_eq!(root("data", &["data/a/x.tar"]), PathBuf::from("data"));
        assert_eq!(root("", &["a/x.tar", "b/x.tar"]), PathBuf::from(""));
        assert_eq!(
            root("", &["/data/a/x.tar", "/data/b/x.tar"]),
            PathBuf::from("/data")
        );
        assert_eq!(root("", &["/data/a/x.tar"]), PathBuf::from("/data/a"));
        assert_eq!(root("", &["../a/x.tar", "../b/x.tar"]), PathBuf::from(".."));
    }

    #[test]
    fn braces_expand_like_webdataset() {
        assert_eq!(
            expand_braces("d/{00008..00011}.tar").unwrap(),
            ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(
            expand_braces("{a,b}/{1..2}.parquet").unwrap(),
            ["a/1.parquet", "a/2.parquet", "b/1.parquet", "b/2.parquet"]
        );
        assert!(expand_braces("x/{3..1}.tar").is_err());
        assert!(expand_braces("x/{0..99999999}.tar").is_err());
        assert!(expand_braces("x/{1..2.tar").is_err());
    }
}
