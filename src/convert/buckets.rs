//! The trainers' own bucket rules, transcribed so that a conversion can check that every row's
//! window is the one the trainer would give its image (a cache of another shape is re-cached or,
//! worse, silently accepted at the wrong size).

/// kohya sd-scripts' bucketing (`library/model_util.py` `make_bucket_resolutions`,
/// `library/train_util.py` `BucketManager`), as the training flags configure it.
#[derive(Debug, Clone)]
pub struct KohyaBuckets {
    pub resolution: (u32, u32),
    /// `--enable_bucket`; without it every image goes to `resolution`.
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
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

    /// `BucketManager.select_bucket` for an image of `w`×`h` (without `bucket_no_upscale`).
    pub fn place(&self, resolutions: &[(u32, u32)], w: u32, h: u32) -> Placement {
        let bucket = if !self.enable_bucket {
            self.resolution
        } else if resolutions.contains(&(w, h)) {
            (w, h)
        } else {
            nearest_aspect(resolutions, w, h)
        };
        cover_and_center(bucket, w, h)
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
#[derive(Debug, Clone)]
pub struct MusubiBuckets {
    pub resolution: (u32, u32),
    pub enable_bucket: bool,
    pub steps: u32,
}

impl MusubiBuckets {
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

    pub fn place(&self, resolutions: &[(u32, u32)], w: u32, h: u32) -> Placement {
        cover_and_center(nearest_aspect(resolutions, w, h), w, h)
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

    #[test]
    fn kohya_defaults_at_1024_match_its_documented_lists() {
        let kohya = |max| KohyaBuckets {
            resolution: (1024, 1024),
            enable_bucket: true,
            min_bucket_reso: 256,
            max_bucket_reso: max,
            bucket_reso_steps: 64,
        };
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
}
