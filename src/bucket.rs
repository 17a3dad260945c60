//! Aspect-ratio buckets: takes `--bucket-res/--bucket-step/--max-aspect`, `--buckets sdxl` or a
//! file, hands on the list of W×H targets and picks each image's bucket.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The SDXL paper's training resolutions (Podell et al. 2023, appendix I): ~1024² pixels, sides
/// multiples of 64, aspect 1:4 to 4:1.
pub const SDXL: &[(u32, u32)] = &[
    (512, 2048),
    (512, 1984),
    (512, 1920),
    (512, 1856),
    (576, 1792),
    (576, 1728),
    (576, 1664),
    (640, 1600),
    (640, 1536),
    (704, 1472),
    (704, 1408),
    (704, 1344),
    (768, 1344),
    (768, 1280),
    (832, 1216),
    (832, 1152),
    (896, 1152),
    (896, 1088),
    (960, 1088),
    (960, 1024),
    (1024, 1024),
    (1024, 960),
    (1088, 960),
    (1088, 896),
    (1152, 896),
    (1152, 832),
    (1216, 832),
    (1280, 768),
    (1344, 768),
    (1344, 704),
    (1408, 704),
    (1472, 704),
    (1536, 640),
    (1600, 640),
    (1664, 576),
    (1728, 576),
    (1792, 576),
    (1856, 512),
    (1920, 512),
    (1984, 512),
    (2048, 512),
];

/// kohya-ss' `make_bucket_resolutions` rule: for every width that is a multiple of `step`, the
/// largest height (a multiple of `step`) with w·h ≤ res², kept with its transpose when the
/// aspect is at most `max_aspect`; plus the square. Sorted by (w, h).
pub fn generate(res: u32, step: u32, max_aspect: f64) -> Vec<(u32, u32)> {
    let area = u64::from(res) * u64::from(res);
    let square = res / step * step;
    let mut buckets = vec![(square, square)];
    let mut w = step;
    while u64::from(w) * u64::from(step) <= area {
        let h = (area / u64::from(w) / u64::from(step) * u64::from(step)) as u32;
        if h >= step && f64::from(w.max(h)) / f64::from(w.min(h)) <= max_aspect {
            buckets.extend([(w, h), (h, w)]);
        }
        w += step;
    }
    buckets.sort_unstable();
    buckets.dedup();
    buckets
}

/// A bucket file: one `WxH` per line; blank lines and `#` comments ignored.
pub fn from_file(path: &Path) -> Result<Vec<(u32, u32)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --buckets {}", path.display()))?;
    let mut buckets = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
        match parsed {
            Some((w, h)) if w > 0 && h > 0 => buckets.push((w, h)),
            _ => bail!(
                "--buckets {} line {}: expected WxH, got {line:?}",
                path.display(),
                n + 1
            ),
        }
    }
    if buckets.is_empty() {
        bail!("--buckets {} lists no buckets", path.display());
    }
    buckets.sort_unstable();
    buckets.dedup();
    Ok(buckets)
}

/// The bucket for an upright `w`×`h` image: the closest aspect ratio (log-ratio distance), ties
/// to the larger area, then the smaller width. With `no_upscale` only buckets that fit inside the
/// image qualify; when none does, the image's own size rounded down to `step` (None when that is
/// empty: the image is too small).
pub fn assign(
    buckets: &[(u32, u32)],
    w: u32,
    h: u32,
    no_upscale: bool,
    step: u32,
) -> Option<(u32, u32)> {
    let aspect = (f64::from(w) / f64::from(h)).ln();
    let best = buckets
        .iter()
        .filter(|&&(bw, bh)| !no_upscale || (bw <= w && bh <= h))
        .min_by(|a, b| {
            let d = |&(bw, bh): &(u32, u32)| ((f64::from(bw) / f64::from(bh)).ln() - aspect).abs();
            d(a).total_cmp(&d(b))
                .then((b.0 * b.1).cmp(&(a.0 * a.1)))
                .then(a.0.cmp(&b.0))
        })
        .copied();
    match best {
        Some(b) => Some(b),
        None if no_upscale => {
            let own = (w / step * step, h / step * step);
            (own.0 > 0 && own.1 > 0).then_some(own)
        }
        None => None,
    }
}
