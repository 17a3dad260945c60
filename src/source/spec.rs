//! `--input` → a `Source`: a folder (walked), one file, a glob (`data/*.tar`) or a brace range as
//! WebDataset users write it (`data/{00000..00099}.tar`, `{a,b}`), checked before any work.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::files::{FileKind, FilesSource};
use super::parquet::{self, ParquetColumns};
use super::{FolderSource, Source};

/// Brace expansions beyond this many names are refused (a typo, not a dataset).
const MAX_EXPANDED: usize = 10_000_000;

/// The source `--input` names, with Parquet files' columns checked.
pub fn open(input: &Path, columns: &ParquetColumns) -> Result<Box<dyn Source + Send>> {
    let text = input.to_string_lossy();
    if let Some((scheme, _)) = text.split_once("://") {
        bail!(
            "--input {text}: {scheme}:// inputs are not read yet; copy or mount the data locally \
             (object storage is planned)"
        );
    }
    let special = |c: char| matches!(c, '*' | '?' | '[' | '{');
    let (root, files) = if !text.contains(special) {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("--input {} does not exist", input.display()))?;
        if meta.is_dir() {
            check_columns_unused(columns)?;
            let root = std::fs::canonicalize(input)
                .with_context(|| format!("cannot resolve --input {}", input.display()))?;
            return Ok(Box::new(FolderSource::new(&root)));
        }
        let kind = FileKind::of(input).with_context(|| {
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
    if files.iter().any(|(_, k)| *k == FileKind::Parquet) {
        for (path, _) in files.iter().filter(|(_, k)| *k == FileKind::Parquet) {
            parquet::check(path, columns)?;
        }
    } else {
        check_columns_unused(columns)?;
    }
    Ok(Box::new(FilesSource::new(root, files, columns.clone())))
}

/// The files a glob or brace pattern names, in the pattern's order (numeric for ranges, name
/// order within a glob), and the folder keys are relative to: the pattern's literal head.
fn matched(text: &str) -> Result<(PathBuf, Vec<(PathBuf, FileKind)>)> {
    let head = &text[..text.find(['*', '?', '[', '{']).unwrap_or(text.len())];
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
                if let Some(kind) = FileKind::of(&path) {
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
            let kind = FileKind::of(&path).with_context(|| {
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
    use super::expand_braces;

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
