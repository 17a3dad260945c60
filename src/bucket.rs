//! Aspect-ratio buckets: takes `--bucket-res/--bucket-step/--max-aspect`, `--buckets sdxl` or a
//! file, hands on the list of W×H targets and picks each image's bucket. Also the trainers' own
//! bucket rules (`--buckets kohya`, `--buckets musubi`), transcribed so that `precompute` makes
//! exactly the windows a trainer would, and `convert` checks that every row's window is the one
//! the trainer would give its image (a cache of another shape is re-cached or, worse, silently
//! accepted at the wrong size).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// A trainer's own bucket rule, recorded in the run identity (`framing.trainer`) so that
/// `convert` reads it from the shards instead of asking for the same settings again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum TrainerBuckets {
    Kohya(KohyaBuckets),
    Musubi(MusubiBuckets),
}

impl TrainerBuckets {
    pub fn name(&self) -> &'static str {
        match self {
            TrainerBuckets::Kohya(_) => "kohya",
            TrainerBuckets::Musubi(_) => "musubi",
        }
    }

    /// The predefined bucket list (kohya's `--bucket_no_upscale` adds the images' own sizes).
    pub fn resolutions(&self) -> Vec<(u32, u32)> {
        match self {
            TrainerBuckets::Kohya(k) => k.resolutions(),
            TrainerBuckets::Musubi(m) => m.resolutions(),
        }
    }

    /// Where the trainer puts a `w`×`h` image (`resolutions` is `self.resolutions()`); None
    /// when its bucket would be empty (an image smaller than one step).
    pub fn place(&self, resolutions: &[(u32, u32)], w: u32, h: u32) -> Option<Placement> {
        let p = match self {
            TrainerBuckets::Kohya(k) => k.place(resolutions, w, h),
            TrainerBuckets::Musubi(m) => m.place(resolutions, w, h),
        };
        (p.bucket.0 > 0 && p.bucket.1 > 0).then_some(p)
    }

    /// The settings as the trainer's own flags name them, for messages and `resize` metadata.
    pub fn describe(&self) -> String {
        match self {
            TrainerBuckets::Kohya(k) => format!(
                "kohya --resolution {},{}{}",
                k.resolution.0,
                k.resolution.1,
                if !k.enable_bucket {
                    String::new()
                } else if k.bucket_no_upscale {
                    format!(
                        " --enable_bucket --bucket_no_upscale --bucket_reso_steps {}",
                        k.bucket_reso_steps
                    )
                } else {
                    format!(
                        " --enable_bucket --min_bucket_reso {} --max_bucket_reso {} \
                         --bucket_reso_steps {}",
                        k.min_bucket_reso, k.max_bucket_reso, k.bucket_reso_steps
                    )
                }
            ),
            TrainerBuckets::Musubi(m) => format!(
                "musubi resolution = [{}, {}]{}",
                m.resolution.0,
                m.resolution.1,
                match (m.enable_bucket, m.no_upscale) {
                    (false, _) => "",
                    (true, false) => ", enable_bucket = true",
                    (true, true) => ", enable_bucket = true, bucket_no_upscale = true",
                }
            ),
        }
    }
}

/// kohya sd-scripts' bucketing (`library/model_util.py` `make_bucket_resolutions`,
/// `library/train_util.py` `BucketManager`), as the training flags configure it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KohyaBuckets {
    pub resolution: (u32, u32),
    /// `--enable_bucket`; without it every image goes to `resolution`.
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    /// `--bucket_no_upscale`: each image gets its own bucket, no larger than the image nor than
    /// the resolution's area (min/max_bucket_reso are then ignored, as kohya ignores them).
    pub bucket_no_upscale: bool,
}

/// Where a trainer puts an image: its bucket, the resized size and the crop offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub bucket: (u32, u32),
    pub resized: (u32, u32),
    /// (left, top)
    pub crop: (u32, u32),
}

impl KohyaBuckets {
    /// The predefined bucket list, sorted (`make_bucket_resolutions`), after
    /// `adjust_min_max_bucket_reso_by_steps` rounds min down and max up to the steps.
    pub fn resolutions(&self) -> Vec<(u32, u32)> {
        if !self.enable_bucket {
            return vec![self.resolution];
        }
        let steps = self.bucket_reso_steps.max(1);
        let min = self.min_bucket_reso - self.min_bucket_reso % steps;
        let max = self.max_bucket_reso.div_ceil(steps) * steps;
        let max_area = u64::from(self.resolution.0) * u64::from(self.resolution.1);
        let mut resos = std::collections::BTreeSet::new();
        let square = ((max_area as f64).sqrt() as u64 / u64::from(steps) * u64::from(steps)) as u32;
        resos.insert((square, square));
        let mut width = min;
        while width <= max {
            let height =
                max.min((max_area / u64::from(width) / u64::from(steps) * u64::from(steps)) as u32);
            if height >= min {
                resos.insert((width, height));
                resos.insert((height, width));
            }
            width += steps;
        }
        resos.into_iter().collect()
    }

    /// `BucketManager.select_bucket` for an image of `w`×`h`, then `trim_and_resize_if_required`
    /// (centre crop).
    pub fn place(&self, resolutions: &[(u32, u32)], w: u32, h: u32) -> Placement {
        if !self.enable_bucket {
            return cover_and_center(self.resolution, w, h);
        }
        if self.bucket_no_upscale {
            return self.place_no_upscale(w, h);
        }
        let bucket = if resolutions.contains(&(w, h)) {
            (w, h)
        } else {
            nearest_aspect(resolutions, w, h)
        };
        cover_and_center(bucket, w, h)
    }

    /// `select_bucket` with `no_upscale`: an image larger than the resolution's area shrinks to
    /// it, its sides rounded to the steps on whichever side keeps the aspect ratio closer; the
    /// bucket is the (resized) size rounded down to the steps.
    fn place_no_upscale(&self, w: u32, h: u32) -> Placement {
        let steps = self.bucket_reso_steps.max(1);
        let max_area = f64::from(self.resolution.0) * f64::from(self.resolution.1);
        let aspect = f64::from(w) / f64::from(h);
        let resized = if f64::from(w) * f64::from(h) > max_area {
            let round_to_steps = |x: f64| {
                let x = (x + 0.5) as u32;
                x - x % steps
            };
            let rw = (max_area * aspect).sqrt();
            let rh = max_area / rw;
            let width_rounded = round_to_steps(rw);
            let height_in_wr = round_to_steps(f64::from(width_rounded) / aspect);
            let ar_width_rounded = f64::from(width_rounded) / f64::from(height_in_wr);
            let height_rounded = round_to_steps(rh);
            let width_in_hr = round_to_steps(f64::from(height_rounded) * aspect);
            let ar_height_rounded = f64::from(width_in_hr) / f64::from(height_rounded);
            if (ar_width_rounded - aspect).abs() < (ar_height_rounded - aspect).abs() {
                (
                    width_rounded,
                    (f64::from(width_rounded) / aspect + 0.5) as u32,
                )
            } else {
                (
                    (f64::from(height_rounded) * aspect + 0.5) as u32,
                    height_rounded,
                )
            }
        } else {
            (w, h)
        };
        let bucket = (resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
        Placement {
            bucket,
            resized,
            crop: ((resized.0 - bucket.0) / 2, (resized.1 - bucket.1) / 2),
        }
    }

    /// `BucketManager.get_crop_ltrb`: where the original image would sit fitted inside the
    /// bucket (Stability's convention; not the pixels actually cropped).
    pub fn crop_ltrb(bucket: (u32, u32), original: (u32, u32)) -> [f64; 4] {
        let (bw, bh) = (f64::from(bucket.0), f64::from(bucket.1));
        let image_ar = f64::from(original.0) / f64::from(original.1);
        let (rw, rh) = if bw / bh > image_ar {
            (bh * image_ar, bh)
        } else {
            (bw, bw / image_ar)
        };
        let left = ((bw - rw) / 2.0).floor();
        let top = ((bh - rh) / 2.0).floor();
        [left, top, left + rw, top + rh]
    }
}

/// musubi-tuner's `BucketSelector` (`src/musubi_tuner/dataset/bucket.py`) for one architecture's
/// step, and its `resize_image_to_bucket` (center crop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MusubiBuckets {
    pub resolution: (u32, u32),
    pub enable_bucket: bool,
    /// `bucket_no_upscale`: an image no larger than the resolution's area keeps its size,
    /// cropped to the steps.
    pub no_upscale: bool,
    pub steps: u32,
}

impl MusubiBuckets {
    /// `BucketSelector.RESOLUTION_STEPS_*` of every image architecture this tool converts to.
    pub const STEPS: u32 = 16;

    pub fn resolutions(&self) -> Vec<(u32, u32)> {
        if !self.enable_bucket {
            return vec![self.resolution];
        }
        let area = u64::from(self.resolution.0) * u64::from(self.resolution.1);
        let sqrt_size = (area as f64).sqrt() as u32;
        let divisible = |n: u32| n - n % self.steps;
        let min_size = divisible(sqrt_size / 2);
        let mut resos = std::collections::BTreeSet::new();
        let mut w = min_size;
        while w < sqrt_size + self.steps {
            let h = divisible((area / u64::from(w)) as u32);
            resos.insert((w, h));
            resos.insert((h, w));
            w += self.steps;
        }
        resos.into_iter().collect()
    }

    /// The rule musubi caches clips with: its `VideoDataset` builds its `BucketSelector` from
    /// the resolution alone (`retrieve_latent_cache_batches`), so clips are always bucketed and
    /// `bucket_no_upscale` is ignored, whatever the dataset's `enable_bucket` says. The choice
    /// and the crop are the images' (from the first frame's size).
    pub fn for_video(&self) -> Self {
        MusubiBuckets {
            enable_bucket: true,
            no_upscale: false,
            ..self.clone()
        }
    }

    /// `get_bucket_resolution`, then `resize_image_to_bucket`.
    pub fn place(&self, resolutions: &[(u32, u32)], w: u32, h: u32) -> Placement {
        let area = u64::from(self.resolution.0) * u64::from(self.resolution.1);
        let bucket = if self.enable_bucket && self.no_upscale && u64::from(w) * u64::from(h) <= area
        {
            (w - w % self.steps, h - h % self.steps)
        } else {
            nearest_aspect(resolutions, w, h)
        };
        cover_and_center(bucket, w, h)
    }
}

/// The bucket whose aspect ratio is nearest (`argmin |W/H − w/h|`, the first on ties).
fn nearest_aspect(resolutions: &[(u32, u32)], w: u32, h: u32) -> (u32, u32) {
    let ar = f64::from(w) / f64::from(h);
    let mut best = resolutions[0];
    let mut best_error = f64::INFINITY;
    for &(bw, bh) in resolutions {
        let error = (f64::from(bw) / f64::from(bh) - ar).abs();
        if error < best_error {
            best = (bw, bh);
            best_error = error;
        }
    }
    best
}

/// Scale to cover the bucket (`int(x·scale + 0.5)`), crop the centre.
fn cover_and_center(bucket: (u32, u32), w: u32, h: u32) -> Placement {
    let (bw, bh) = (f64::from(bucket.0), f64::from(bucket.1));
    let (fw, fh) = (f64::from(w), f64::from(h));
    let scale = if fw / fh > bw / bh { bh / fh } else { bw / fw };
    let resized = ((fw * scale + 0.5) as u32, (fh * scale + 0.5) as u32);
    Placement {
        bucket,
        resized,
        crop: (
            resized.0.saturating_sub(bucket.0) / 2,
            resized.1.saturating_sub(bucket.1) / 2,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kohya(max: u32) -> KohyaBuckets {
        KohyaBuckets {
            resolution: (1024, 1024),
            enable_bucket: true,
            min_bucket_reso: 256,
            max_bucket_reso: max,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        }
    }

    #[test]
    fn kohya_defaults_at_1024_match_its_documented_lists() {
        // FACTS.md: 25 buckets at the default max of 1024, 41 at 2048; a 768x512 photo goes
        // to 1024x704 and 1216x832 respectively.
        for (max, count, bucket) in [(1024, 25, (1024, 704)), (2048, 41, (1216, 832))] {
            let k = kohya(max);
            let list = k.resolutions();
            assert_eq!(list.len(), count);
            assert_eq!(k.place(&list, 768, 512).bucket, bucket);
        }
        let p = kohya(1024).place(&kohya(1024).resolutions(), 1500, 1000);
        assert_eq!(
            p,
            Placement {
                bucket: (1024, 704),
                resized: (1056, 704),
                crop: (16, 0)
            }
        );
        let ltrb = KohyaBuckets::crop_ltrb((1024, 704), (1500, 1000));
        assert_eq!(ltrb[..3], [0.0, 10.0, 1024.0]);
        assert!((ltrb[3] - 692.666_666_666_666_6).abs() < 1e-9);
    }

    #[test]
    fn kohya_picks_by_plain_aspect_difference_where_log_ratio_differs() {
        // Issue 21: kohya puts these in other buckets than the log-ratio rule of `assign`.
        let k = kohya(2048);
        let list = k.resolutions();
        assert_eq!(k.place(&list, 961, 701).bucket, (1152, 896));
        assert_eq!(k.place(&list, 1333, 495).bucket, (1600, 640));
        let sdxl_like = generate(1024, 64, 4.0);
        assert_eq!(assign(&sdxl_like, 961, 701, false, 64), Some((1216, 832)));
    }

    #[test]
    fn trainer_rules_survive_the_identity_toml() {
        #[derive(Serialize, Deserialize)]
        struct Holder {
            trainer: TrainerBuckets,
        }
        for rule in [
            TrainerBuckets::Kohya(kohya(2048)),
            TrainerBuckets::Musubi(MusubiBuckets {
                resolution: (960, 544),
                enable_bucket: true,
                no_upscale: true,
                steps: MusubiBuckets::STEPS,
            }),
        ] {
            let text = toml::to_string(&Holder {
                trainer: rule.clone(),
            })
            .unwrap();
            let back: Holder = toml::from_str(&text).unwrap();
            assert_eq!(back.trainer, rule, "{text}");
        }
    }

    /// musubi's `BucketSelector((832, 480), architecture="wan")`, as its video caching builds it
    /// (values printed by musubi-tuner @30c658c4): clips are bucketed even when the dataset
    /// says `enable_bucket = false`, and `bucket_no_upscale` does not apply.
    #[test]
    fn musubi_buckets_clips_whatever_the_dataset_says() {
        let images = MusubiBuckets {
            resolution: (832, 480),
            enable_bucket: false,
            no_upscale: true,
            steps: MusubiBuckets::STEPS,
        };
        assert_eq!(images.resolutions(), [(832, 480)]);
        let clips = images.for_video();
        let list = clips.resolutions();
        for (size, bucket) in [
            ((1920, 1080), (832, 480)),
            ((720, 1280), (480, 832)),
            ((640, 480), (720, 544)),
        ] {
            assert_eq!(
                clips.place(&list, size.0, size.1).bucket,
                bucket,
                "{size:?}"
            );
        }
    }
}
