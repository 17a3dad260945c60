//! The report's numbers, defined exactly so they can be checked against references:
//! PSNR and SSIM as scikit-image computes them, and running latent statistics. Images here are
//! planar (CHW) `f32` in [0, 1]; every sum is taken in `f64`.

/// SSIM constants of Wang et al. (2004), as scikit-image's defaults.
const K1: f64 = 0.01;
const K2: f64 = 0.03;
/// Standard deviation of the Gaussian window.
const SIGMA: f64 = 1.5;
/// scipy.ndimage truncates its Gaussian at this many sigmas; skimage sets 3.5 for SSIM.
const TRUNCATE: f64 = 3.5;
/// The window side: `2 · int(3.5 · 1.5 + 0.5) + 1` = 11, as skimage derives it.
pub const SSIM_WINDOW: usize = 2 * RADIUS + 1;
const RADIUS: usize = (TRUNCATE * SIGMA + 0.5) as usize;

/// `10 · log10(1 / MSE)` over every sample of two same-sized images with data range 1;
/// `+inf` when they are identical (as scikit-image's `peak_signal_noise_ratio`).
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "PSNR of images of different sizes");
    assert!(!a.is_empty(), "PSNR of an empty image");
    let sse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum();
    let mse = sse / a.len() as f64;
    10.0 * (1.0 / mse).log10()
}

/// How one frame of a clip window changed from the window's previous frame, in the source and
/// in the reconstruction: the frame pair's share of the report's temporal flicker. Every value
/// is a mean over all pixels and channels in [0, 1] (one level of 255 is 1/255 ≈ 0.0039).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    /// `mean |x_t − x_{t−1}|` of the source frames the encoder saw.
    pub source: f64,
    /// `mean |r_t − r_{t−1}|` of their reconstructions.
    pub reconstruction: f64,
    /// `mean |(r_t − r_{t−1}) − (x_t − x_{t−1})|`: motion the reconstruction adds or loses,
    /// 0 only when every pixel changes exactly as in the source.
    pub error: f64,
}

impl Change {
    /// The change from frame `t − 1` to frame `t`: source `previous → current`, reconstruction
    /// `previous_rec → current_rec` (planar frames of one size, in [0, 1]).
    pub fn between(
        previous: &[f32],
        current: &[f32],
        previous_rec: &[f32],
        current_rec: &[f32],
    ) -> Self {
        assert!(
            previous.len() == current.len()
                && previous_rec.len() == current.len()
                && current_rec.len() == current.len()
                && !current.is_empty(),
            "frame change of frames of different sizes"
        );
        let (mut source, mut reconstruction, mut error) = (0.0, 0.0, 0.0);
        for i in 0..current.len() {
            let ds = f64::from(current[i]) - f64::from(previous[i]);
            let dr = f64::from(current_rec[i]) - f64::from(previous_rec[i]);
            source += ds.abs();
            reconstruction += dr.abs();
            error += (dr - ds).abs();
        }
        let n = current.len() as f64;
        Change {
            source: source / n,
            reconstruction: reconstruction / n,
            error: error / n,
        }
    }
}

/// Mean SSIM of two planar images (`channels × height × width`), averaged over channels: what
/// `skimage.metrics.structural_similarity(x, y, channel_axis=-1, data_range=1.0,
/// gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` returns.
///
/// Each channel is filtered with the 11-tap Gaussian (σ 1.5, scipy's `mode='reflect'` at the
/// borders), and the SSIM map is averaged after cropping `(window − 1) / 2` pixels off every
/// border. scikit-image refuses images with a side under 11; here the window shrinks to the
/// largest odd number `s` ≤ the shorter side, which is what scikit-image returns when called
/// with `win_size=s` (its own advice for small images): the filter stays the same, only the
/// cropped border narrows. A 1-pixel-wide image thus averages its whole SSIM map.
pub fn ssim(a: &[f32], b: &[f32], width: usize, height: usize) -> f64 {
    assert_eq!(a.len(), b.len(), "SSIM of images of different sizes");
    let plane = width * height;
    assert!(plane > 0, "SSIM of an empty image");
    assert_eq!(a.len() % plane, 0, "buffer is not whole planes");
    let channels = a.len() / plane;
    let kernel = gaussian_kernel();
    let total: f64 = (0..channels)
        .map(|c| {
            let range = c * plane..(c + 1) * plane;
            ssim_plane(&a[range.clone()], &b[range], width, height, &kernel)
        })
        .sum();
    total / channels as f64
}

/// The window side used for a `width × height` image (see [`ssim`]).
pub fn ssim_window(width: usize, height: usize) -> usize {
    let side = width.min(height).min(SSIM_WINDOW);
    if side % 2 == 1 {
        side
    } else {
        side - 1
    }
}

/// scipy's `_gaussian_kernel1d`: `exp(-x² / 2σ²)` for x in −r..=r, normalized to sum 1.
fn gaussian_kernel() -> [f64; SSIM_WINDOW] {
    let mut k: [f64; SSIM_WINDOW] = std::array::from_fn(|i| {
        let x = i as f64 - RADIUS as f64;
        (-0.5 / (SIGMA * SIGMA) * x * x).exp()
    });
    let sum: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

fn ssim_plane(x: &[f32], y: &[f32], w: usize, h: usize, kernel: &[f64]) -> f64 {
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let y: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    let product =
        |f: fn(f64, f64) -> f64| -> Vec<f64> { x.iter().zip(&y).map(|(&a, &b)| f(a, b)).collect() };
    let ux = filter(&x, w, h, kernel);
    let uy = filter(&y, w, h, kernel);
    let uxx = filter(&product(|a, _| a * a), w, h, kernel);
    let uyy = filter(&product(|_, b| b * b), w, h, kernel);
    let uxy = filter(&product(|a, b| a * b), w, h, kernel);
    let (c1, c2) = (K1 * K1, K2 * K2);
    let pad = (ssim_window(w, h) - 1) / 2;
    let mut sum = 0.0;
    for row in pad..h - pad {
        for col in pad..w - pad {
            let i = row * w + col;
            let (mx, my) = (ux[i], uy[i]);
            let vx = uxx[i] - mx * mx;
            let vy = uyy[i] - my * my;
            let vxy = uxy[i] - mx * my;
            sum += ((2.0 * mx * my + c1) * (2.0 * vxy + c2))
                / ((mx * mx + my * my + c1) * (vx + vy + c2));
        }
    }
    sum / ((h - 2 * pad) * (w - 2 * pad)) as f64
}

/// Separable Gaussian filter with scipy's `reflect` border (`d c b a | a b c d | d c b a`),
/// rows first (scipy's axis 0), then columns.
fn filter(src: &[f64], w: usize, h: usize, kernel: &[f64]) -> Vec<f64> {
    let r = kernel.len() / 2;
    let taps = |n: usize| -> Vec<Vec<usize>> {
        (0..n)
            .map(|i| {
                (0..kernel.len())
                    .map(|k| reflect(i as isize + k as isize - r as isize, n))
                    .collect()
            })
            .collect()
    };
    let (rows, cols) = (taps(h), taps(w));
    let mut vertical = vec![0.0; w * h];
    for (y, idx) in rows.iter().enumerate() {
        for (&k, &sy) in kernel.iter().zip(idx) {
            let src_row = &src[sy * w..(sy + 1) * w];
            for (d, s) in vertical[y * w..(y + 1) * w].iter_mut().zip(src_row) {
                *d += k * s;
            }
        }
    }
    let mut out = vec![0.0; w * h];
    for y in 0..h {
        let line = &vertical[y * w..(y + 1) * w];
        for (x, idx) in cols.iter().enumerate() {
            out[y * w + x] = kernel.iter().zip(idx).map(|(k, &sx)| k * line[sx]).sum();
        }
    }
    out
}

/// scipy.ndimage's `reflect` extension: period 2n, mirrored about the edge between pixels.
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m < n {
        m
    } else {
        2 * n - 1 - m
    }
}

/// Mean and population standard deviation (numpy's `std`, ddof 0); NaN for no values.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Count, mean and sum of squared deviations of a stream of values, merged with Chan et al.'s
/// pairwise update so a large dataset loses no precision to `Σx² − n·mean²` cancellation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub count: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    pub fn of(values: &[f32]) -> Self {
        if values.is_empty() {
            return Moments::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let m2 = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>();
        Moments {
            count: values.len() as u64,
            mean,
            m2,
        }
    }

    pub fn merge(&mut self, other: &Moments) {
        if other.count == 0 {
            return;
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        self.mean += delta * other.count as f64 / n;
        self.m2 += other.m2 + delta * delta * self.count as f64 * other.count as f64 / n;
        self.count += other.count;
    }

    /// The moments of `a·x + b` over the same values.
    pub fn affine(&self, a: f64, b: f64) -> Moments {
        Moments {
            count: self.count,
            mean: a * self.mean + b,
            m2: a * a * self.m2,
        }
    }

    /// NaN when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.mean
        }
    }

    /// Population standard deviation; NaN when empty.
    pub fn std(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }
}

/// Per-channel and global statistics of raw latents `[C, h, w]`, accumulated image by image.
#[derive(Debug, Clone)]
pub struct LatentStats {
    channels: Vec<Moments>,
}

impl LatentStats {
    pub fn new(channels: usize) -> Self {
        LatentStats {
            channels: vec![Moments::default(); channels],
        }
    }

    /// Adds one image's latent (`C` planes) and returns its own moments over all elements.
    pub fn add(&mut self, latent: &[f32]) -> Moments {
        let plane = latent.len() / self.channels.len();
        let mut image = Moments::default();
        for (c, acc) in self.channels.iter_mut().enumerate() {
            let m = Moments::of(&latent[c * plane..(c + 1) * plane]);
            acc.merge(&m);
            image.merge(&m);
        }
        image
    }

    pub fn channels(&self) -> &[Moments] {
        &self.channels
    }

    /// Moments over every element of the latents as a normalization stores them: channel `c`'s
    /// raw value `z` becomes `a·z + b` for `(a, b) = map(c)`.
    pub fn mapped(&self, map: impl Fn(usize) -> (f64, f64)) -> Moments {
        let mut all = Moments::default();
        for (c, m) in self.channels.iter().enumerate() {
            let (a, b) = map(c);
            all.merge(&m.affine(a, b));
        }
        all
    }

    /// Moments over every element of every channel.
    pub fn global(&self) -> Moments {
        let mut all = Moments::default();
        for m in &self.channels {
            all.merge(m);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_is_the_mean_absolute_frame_difference() {
        let (a, b) = ([0.0, 0.5, 1.0, 0.25], [0.5, 0.5, 0.0, 0.25]);
        let (ra, rb) = ([0.0, 0.5, 1.0, 0.25], [0.0, 0.75, 0.5, 0.25]);
        let c = Change::between(&a, &b, &ra, &rb);
        assert_eq!(c.source, (0.5 + 0.0 + 1.0 + 0.0) / 4.0);
        assert_eq!(c.reconstruction, (0.0 + 0.25 + 0.5 + 0.0) / 4.0);
        // Changes (0.5, 0, −1, 0) in the source, (0, 0.25, −0.5, 0) in the reconstruction.
        assert_eq!(c.error, (0.5 + 0.25 + 0.5 + 0.0) / 4.0);
        let still = Change::between(&a, &a, &ra, &ra);
        assert_eq!(
            (still.source, still.reconstruction, still.error),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn reflect_matches_scipy() {
        // scipy.ndimage 'reflect' (numpy's pad mode 'symmetric') on [0, 1, 2], from -4 to 6:
        // np.pad(np.arange(3), 4, mode="symmetric")[:11]
        let got: Vec<usize> = (-4..7).map(|i| reflect(i, 3)).collect();
        assert_eq!(got, vec![2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0]);
        assert!((-6..6).all(|i| reflect(i, 1) == 0));
    }

    #[test]
    fn window_shrinks_to_odd_side() {
        assert_eq!(ssim_window(256, 256), 11);
        assert_eq!(ssim_window(11, 40), 11);
        assert_eq!(ssim_window(10, 40), 9);
        assert_eq!(ssim_window(64, 2), 1);
        assert_eq!(ssim_window(1, 1), 1);
    }

    #[test]
    fn mapped_moments_equal_the_mapped_values() {
        let latent: Vec<f32> = (0..32)
            .map(|i| (i as f32 * 0.37).sin() * (1 + i / 16) as f32)
            .collect();
        let mut stats = LatentStats::new(2);
        stats.add(&latent);
        let map = |c: usize| if c == 0 { (2.0, -1.0) } else { (0.5, 3.0) };
        let stored: Vec<f32> = latent
            .iter()
            .enumerate()
            .map(|(i, &z)| {
                let (a, b) = map(i / 16);
                (a * f64::from(z) + b) as f32
            })
            .collect();
        let direct = Moments::of(&stored);
        let mapped = stats.mapped(map);
        assert!((mapped.mean() - direct.mean()).abs() < 1e-6);
        assert!((mapped.std() - direct.std()).abs() < 1e-6);
    }

    #[test]
    fn moments_merge_equals_one_pass() {
        let a: Vec<f32> = (0..100)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.5)
            .collect();
        let mut merged = Moments::of(&a[..30]);
        merged.merge(&Moments::of(&a[30..]));
        let whole = Moments::of(&a);
        assert_eq!(merged.count, whole.count);
        assert!((merged.mean() - whole.mean()).abs() < 1e-12);
        assert!((merged.std() - whole.std()).abs() < 1e-12);
    }
}
