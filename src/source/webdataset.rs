//! WebDataset tars (what img2dataset writes): members `KEY.EXT` grouped by key, read as a stream.
//! The key is the member name up to the first dot of its last path component; the image is the
//! member whose extension is an image format, `.txt`/`.caption` the caption, `.json` the metadata.
//! Member names are data, never paths: unsafe names, links and devices are refused, and no
//! header's size claim is allocated before the bytes arrive.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};

use flate2::read::GzDecoder;

use super::{
    escape_bytes, json_object, key_problem, source_bytes, Location, MetadataRead, Sample,
    SampleRef, SourceBytes,
};
use super::{DECODED, NOT_DECODED};
use crate::failure::{Failure, FailureKind};
use crate::pool;

/// Larger members are refused: no image this tool decodes is near it.
const MAX_MEMBER_BYTES: u64 = 512 << 20;
/// A header's size claim is trusted for at most this much up-front allocation.
const RESERVE_BYTES: u64 = 16 << 20;

/// The members of one sample, as they arrive.
struct Group {
    key: String,
    image: Option<(String, Vec<u8>)>,
    caption: Option<String>,
    metadata: Option<MetadataRead>,
    others: Vec<String>,
    extensions: HashSet<String>,
    failure: Option<Failure>,
}

/// A tar to read: a local file (seekable: the metadata pass skips images without reading them) or
/// a stream.
pub enum TarInput {
    File(File),
    Stream(Box<dyn Read + Send>),
}

/// Streams the samples of `input` (keys `UNIT/KEY`) into `send`; false once `send` refused one
/// (the consumer stopped). Without `images`, image members are skipped and each sample carries
/// only its metadata (the pre-flight's pass). A gzip-compressed tar is recognized by its first
/// bytes, whatever its name.
pub fn stream(
    unit: &str,
    input: std::io::Result<TarInput>,
    images: bool,
    send: &mut dyn FnMut(Result<SampleRef, Failure>) -> bool,
) -> bool {
    let cannot_read =
        |e: std::io::Error| Failure::new(unit, FailureKind::Io, format!("cannot read: {e}"));
    let input = match input {
        Ok(input) => input,
        Err(e) => {
            return send(Err(Failure::new(
                unit,
                FailureKind::Io,
                format!("cannot open: {e}"),
            )))
        }
    };
    let (raw, gzip): (Box<dyn Read>, bool) = match input {
        TarInput::File(mut file) => {
            let mut magic = [0u8; 2];
            let gzip = file.read_exact(&mut magic).is_ok() && magic == GZIP_MAGIC;
            if let Err(e) = file.seek(SeekFrom::Start(0)) {
                return send(Err(cannot_read(e)));
            }
            // Seeking past members drops the read buffer, so only the pass that skips images
            // seeks.
            if !gzip && !images {
                let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
                return match archive.entries_with_seek() {
                    Ok(entries) => walk(unit, entries, images, send),
                    Err(e) => send(Err(not_a_tar(unit, e))),
                };
            }
            (Box::new(BufReader::with_capacity(1 << 20, file)), gzip)
        }
        TarInput::Stream(stream) => {
            let mut buffered = BufReader::with_capacity(1 << 20, stream);
            match buffered.fill_buf() {
                Ok(head) => {
                    let gzip = head.starts_with(&GZIP_MAGIC);
                    (Box::new(buffered), gzip)
                }
                Err(e) => return send(Err(cannot_read(e))),
            }
        }
    };
    let reader: Box<dyn Read> = if gzip {
        Box::new(GzDecoder::new(raw))
    } else {
        raw
    };
    let mut archive = tar::Archive::new(reader);
    match archive.entries() {
        Ok(entries) => walk(unit, entries, images, send),
        Err(e) => send(Err(not_a_tar(unit, e))),
    }
}

/// The first bytes of a gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

fn not_a_tar(unit: &str, e: std::io::Error) -> Failure {
    // The tar reader quotes header bytes: a file that is no tar would print binary garbage.
    let message = e.to_string();
    Failure::new(
        unit,
        FailureKind::Corrupt,
        format!("not a tar: {}", message.escape_debug()),
    )
}

/// Groups the members `entries` yields into samples.
fn walk<R: Read>(
    unit: &str,
    entries: tar::Entries<'_, R>,
    images: bool,
    send: &mut dyn FnMut(Result<SampleRef, Failure>) -> bool,
) -> bool {
    let mut seen = HashSet::new();
    let mut group: Option<Group> = None;
    for (members, entry) in entries.enumerate() {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                let more = group.take().is_none_or(|g| flush(unit, g, images, send));
                let message = format!("tar unreadable after {members} member(s) (truncated?): {e}");
                return more && send(Err(Failure::new(unit, FailureKind::Corrupt, message)));
            }
        };
        let raw = entry.path_bytes().into_owned();
        let member_key = format!("{unit}/{}", escape_bytes(&raw));
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_hard_link() {
                "a hard link"
            } else {
                "not a regular file (device, FIFO or unknown type)"
            };
            let failure = Failure::new(
                member_key,
                FailureKind::Refused,
                format!("tar member is {what}: refused"),
            );
            if !send(Err(failure)) {
                return false;
            }
            continue;
        }
        let Some((sample_key, ext)) = split_member(&raw) else {
            let failure = Failure::new(
                member_key,
                FailureKind::Refused,
                "tar member name is absolute or has an empty, `.` or `..` component: refused",
            );
            if !send(Err(failure)) {
                return false;
            }
            continue;
        };
        let key = format!("{unit}/{}", escape_bytes(sample_key));
        if let Some(why) = key_problem(&key) {
            let message = format!(
                "tar member's WebDataset key {:?} (its name up to the first dot of the last \
                 component) cannot be a key: {why}; refused",
                String::from_utf8_lossy(sample_key)
            );
            if !send(Err(Failure::new(member_key, FailureKind::Refused, message))) {
                return false;
            }
            continue;
        }
        if group.as_ref().is_none_or(|g| g.key != key) {
            if let Some(done) = group.take() {
                if !flush(unit, done, images, send) {
                    return false;
                }
            }
            let mut fresh = Group::new(key.clone());
            if !seen.insert(key.clone()) {
                fresh.failure = Some(Failure::new(
                    key,
                    FailureKind::Refused,
                    "duplicate key: a second group of members with this key later in the tar; \
                     the first was kept",
                ));
            }
            group = Some(fresh);
        }
        let current = group.as_mut().expect("set above");
        if current.failure.is_some() {
            continue;
        }
        let ext = String::from_utf8_lossy(ext).to_ascii_lowercase();
        if !current.extensions.insert(ext.clone()) {
            current.failure = Some(Failure::new(
                &current.key,
                FailureKind::Refused,
                format!("duplicate key: two .{ext} members for one sample"),
            ));
            continue;
        }
        if let Some((first, _)) = current
            .image
            .as_ref()
            .filter(|_| DECODED.contains(&ext.as_str()))
        {
            let message = format!(
                "a second image for sample {} (it has .{first}): not encoded; a WebDataset \
                 sample holds one image, so give each image its own key",
                current.key
            );
            if !send(Err(Failure::new(member_key, FailureKind::Refused, message))) {
                return false;
            }
            continue;
        }
        if !images && DECODED.contains(&ext.as_str()) {
            // The pre-flight needs to know there is an image, not its bytes.
            current.add(ext, Vec::new());
            continue;
        }
        let size = entry.header().size().unwrap_or(0);
        if size > MAX_MEMBER_BYTES {
            current.failure = Some(Failure::new(
                &current.key,
                FailureKind::TooLarge,
                format!(
                    ".{ext} member claims {size} bytes, above the {MAX_MEMBER_BYTES}-byte limit"
                ),
            ));
            continue;
        }
        let mut bytes = pool::BYTES.take(size.min(RESERVE_BYTES) as usize);
        if let Err(e) = entry
            .by_ref()
            .take(MAX_MEMBER_BYTES)
            .read_to_end(&mut bytes)
        {
            pool::BYTES.give(bytes);
            current.failure = Some(Failure::new(
                &current.key,
                FailureKind::Corrupt,
                format!(".{ext} member unreadable (truncated tar?): {e}"),
            ));
            continue;
        }
        current.add(ext, bytes);
    }
    group.is_none_or(|g| flush(unit, g, images, send))
}

/// `dir/name.ext.more` → (`dir/name`, `ext.more`); None for names that are not plain relative
/// paths. A leading `./` (what `tar -C dir -cf x.tar .` writes) is dropped, as tar and
/// WebDataset do.
fn split_member(mut raw: &[u8]) -> Option<(&[u8], &[u8])> {
    while let Some(rest) = raw.strip_prefix(b"./") {
        raw = rest;
    }
    if raw.first() == Some(&b'/') {
        return None;
    }
    let components: Vec<&[u8]> = raw.split(|b| *b == b'/').collect();
    if components
        .iter()
        .any(|c| c.is_empty() || *c == b"." || *c == b".." || c.contains(&0))
    {
        return None;
    }
    let base = components.last()?;
    let dot = base.iter().position(|b| *b == b'.').unwrap_or(base.len());
    let key_len = raw.len() - base.len() + dot;
    let ext = raw.get(key_len + 1..).unwrap_or_default();
    Some((&raw[..key_len], ext))
}

impl Group {
    fn new(key: String) -> Self {
        Group {
            key,
            image: None,
            caption: None,
            metadata: None,
            others: Vec::new(),
            extensions: HashSet::new(),
            failure: None,
        }
    }

    fn add(&mut self, ext: String, bytes: Vec<u8>) {
        match ext.as_str() {
            "txt" | "caption" if self.caption.is_none() => {
                self.caption = Some(String::from_utf8_lossy(&bytes).trim().to_string());
                pool::BYTES.give(bytes);
            }
            "json" => {
                self.metadata = Some(json_object(&bytes));
                pool::BYTES.give(bytes);
            }
            e if DECODED.contains(&e) => self.image = Some((ext, bytes)),
            _ => {
                self.others.push(ext);
                pool::BYTES.give(bytes);
            }
        }
    }
}

/// Hands on a finished group as a sample (without bytes when `images` is off), or the failure it
/// holds.
fn flush(
    unit: &str,
    group: Group,
    images: bool,
    send: &mut dyn FnMut(Result<SampleRef, Failure>) -> bool,
) -> bool {
    if let Some(failure) = group.failure {
        if let Some((_, bytes)) = group.image {
            pool::BYTES.give(bytes);
        }
        return send(Err(failure));
    }
    let Some((_, bytes)) = group.image else {
        let message = match group
            .others
            .iter()
            .find(|e| NOT_DECODED.contains(&e.as_str()))
        {
            Some(ext) => format!(
                ".{ext} images are not decoded by vae-pipeline; convert them to PNG or JPEG"
            ),
            None if group.others.is_empty() => "no image member (only caption or JSON)".into(),
            None => {
                let dotted = group.others.iter().find(|e| {
                    e.rsplit_once('.').is_some_and(|(_, last)| {
                        DECODED.contains(&last) || NOT_DECODED.contains(&last)
                    })
                });
                let rule = match dotted {
                    Some(ext) => {
                        let stem = group.key.rsplit('/').next().unwrap_or_default();
                        format!(
                            "; WebDataset keys end at the first dot of a member's name, so \
                             `{stem}.{ext}` is the member .{ext} of sample `{stem}`: name \
                             images KEY.EXT with no dot in KEY"
                        )
                    }
                    None => String::new(),
                };
                format!(
                    "no image member (has .{}) in {unit}{rule}",
                    group.others.join(", .")
                )
            }
        };
        let kind = if group
            .others
            .iter()
            .any(|e| NOT_DECODED.contains(&e.as_str()))
        {
            FailureKind::Unsupported
        } else {
            FailureKind::Refused
        };
        return send(Err(Failure::new(group.key, kind, message)));
    };
    let bytes = if images {
        match source_bytes(&group.key, bytes) {
            Ok(bytes) => bytes,
            Err(failure) => return send(Err(failure)),
        }
    } else {
        SourceBytes::none()
    };
    let sample = Sample {
        key: group.key.clone(),
        bytes,
        caption: group.caption,
        metadata: group.metadata.unwrap_or(MetadataRead::Absent),
    };
    send(Ok(SampleRef {
        key: group.key,
        at: Location::Read(Box::new(sample)),
    }))
}

#[cfg(test)]
mod tests {
    use super::split_member;

    #[test]
    fn member_names_split_at_the_first_dot_of_the_last_component() {
        let split = |s: &str| {
            split_member(s.as_bytes()).map(|(k, e)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(e).into_owned(),
                )
            })
        };
        assert_eq!(split("000123.jpg"), Some(("000123".into(), "jpg".into())));
        assert_eq!(
            split("a.b/x.seg.png"),
            Some(("a.b/x".into(), "seg.png".into()))
        );
        assert_eq!(split("noext"), Some(("noext".into(), "".into())));
        assert_eq!(split("./x.jpg"), Some(("x".into(), "jpg".into())));
        assert_eq!(split("././a/x.jpg"), Some(("a/x".into(), "jpg".into())));
        for bad in [
            "/etc/passwd.jpg",
            "../x.jpg",
            "a/../x.jpg",
            "./../x.jpg",
            "a/./x.jpg",
            "a//x.jpg",
        ] {
            assert_eq!(split(bad), None, "{bad}");
        }
    }
}
