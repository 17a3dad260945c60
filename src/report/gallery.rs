//! The report's pictures: keeps the worst 8 and best 4 reconstructions by PSNR while images
//! stream past (memory stays bounded), each as one row original | reconstruction | error
//! heatmap, like the seed's `concat_image`.

use std::cmp::Ordering;

use image::{Rgb, RgbImage};

/// How many of the lowest- and highest-PSNR images the report shows.
pub const WORST: usize = 8;
pub const BEST: usize = 4;
/// Panels larger than this are shown as their central crop at 1:1: downscaling would hide the
/// artifacts the pictures are there to show, and keeps the page a sensible size.
pub const MAX_PANEL: usize = 512;
/// The heatmap shows the mean absolute error over RGB times this: 0 is black, an error of
/// 1/`AMPLIFY` (51 levels of 255) or more is the top of the colour scale.
pub const AMPLIFY: f32 = 5.0;
/// White gap between the panels of a row.
const GAP: u32 = 4;

/// One picture row and what its caption says.
pub struct Shot {
    pub key: String,
    pub psnr: f64,
    pub ssim: f64,
    pub row: RgbImage,
}

#[derive(Default)]
pub struct Gallery {
    worst: Vec<Shot>,
    best: Vec<Shot>,
}

/// PSNR order, ties broken by key so the pictures do not depend on batch order.
fn order(a: (f64, &str), b: (f64, &str)) -> Ordering {
    a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1))
}

impl Gallery {
    /// Considers one image (planar `3 × height × width` in [0, 1]); renders its row only when
    /// it enters the worst or best list.
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &mut self,
        key: &str,
        psnr: f64,
        ssim: f64,
        original: &[f32],
        reconstruction: &[f32],
        width: usize,
        height: usize,
    ) {
        let enters = |list: &[Shot], cap: usize, side: Ordering| {
            list.len() < cap
                || list
                    .last()
                    .is_some_and(|last| order((psnr, key), (last.psnr, &last.key)) == side)
        };
        let enters_worst = enters(&self.worst, WORST, Ordering::Less);
        let enters_best = enters(&self.best, BEST, Ordering::Greater);
        if !(enters_worst || enters_best) {
            return;
        }
        let shot = || Shot {
            key: key.to_string(),
            psnr,
            ssim,
            row: render_row(original, reconstruction, width, height),
        };
        if enters_worst {
            insert(&mut self.worst, shot(), WORST, |a, b| {
                order((a.psnr, &a.key), (b.psnr, &b.key))
            });
        }
        if enters_best {
            insert(&mut self.best, shot(), BEST, |a, b| {
                order((b.psnr, &b.key), (a.psnr, &a.key))
            });
        }
    }

    /// Worst first (ascending PSNR), then best first (descending); an image in both lists (fewer
    /// than 12 images) is shown once, among the worst.
    pub fn finish(self) -> (Vec<Shot>, Vec<Shot>) {
        let Gallery { worst, best } = self;
        let best = best
            .into_iter()
            .filter(|b| !worst.iter().any(|w| w.key == b.key))
            .collect();
        (worst, best)
    }
}

fn insert(list: &mut Vec<Shot>, shot: Shot, cap: usize, cmp: impl Fn(&Shot, &Shot) -> Ordering) {
    let at = list.partition_point(|s| cmp(s, &shot) == Ordering::Less);
    list.insert(at, shot);
    list.truncate(cap);
}

/// original | reconstruction | error heatmap, each the central crop of at most `MAX_PANEL`².
pub fn render_row(
    original: &[f32],
    reconstruction: &[f32],
    width: usize,
    height: usize,
) -> RgbImage {
    let (pw, ph) = (width.min(MAX_PANEL), height.min(MAX_PANEL));
    let (x0, y0) = ((width - pw) / 2, (height - ph) / 2);
    let plane = width * height;
    let at = |c: usize, x: usize, y: usize| c * plane + (y0 + y) * width + x0 + x;
    let level = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let mut row = RgbImage::from_pixel(3 * pw as u32 + 2 * GAP, ph as u32, Rgb([255, 255, 255]));
    let step = pw as u32 + GAP;
    for y in 0..ph {
        for x in 0..pw {
            let o: [f32; 3] = std::array::from_fn(|c| original[at(c, x, y)]);
            let r: [f32; 3] = std::array::from_fn(|c| reconstruction[at(c, x, y)]);
            let err = o.iter().zip(&r).map(|(a, b)| (a - b).abs()).sum::<f32>() / 3.0;
            let (px, py) = (x as u32, y as u32);
            row.put_pixel(px, py, Rgb(o.map(level)));
            row.put_pixel(step + px, py, Rgb(r.map(level)));
            row.put_pixel(2 * step + px, py, heat(err * AMPLIFY));
        }
    }
    row
}

/// An inferno-like colour scale for t in [0, 1]: black, purple, red, orange, pale yellow.
pub fn heat(t: f32) -> Rgb<u8> {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 4.0],
        [87.0, 16.0, 110.0],
        [188.0, 55.0, 84.0],
        [249.0, 142.0, 9.0],
        [252.0, 255.0, 164.0],
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f32;
    Rgb(std::array::from_fn(|c| {
        (STOPS[i][c] + (STOPS[i + 1][c] - STOPS[i][c]) * f).round() as u8
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer_gray(g: &mut Gallery, key: &str, psnr: f64) {
        let img = vec![0.5; 3 * 4 * 4];
        g.offer(key, psnr, 1.0, &img, &img, 4, 4);
    }

    #[test]
    fn keeps_worst_and_best_without_duplicates() {
        let mut g = Gallery::default();
        for i in 0..20 {
            offer_gray(&mut g, &format!("k{i:02}"), (i * 7 % 20) as f64);
        }
        let (worst, best) = g.finish();
        let psnr = |s: &[Shot]| s.iter().map(|s| s.psnr).collect::<Vec<_>>();
        assert_eq!(psnr(&worst), (0..8).map(f64::from).collect::<Vec<_>>());
        assert_eq!(psnr(&best), vec![19.0, 18.0, 17.0, 16.0]);

        let mut few = Gallery::default();
        for i in 0..5 {
            offer_gray(&mut few, &format!("k{i}"), i as f64);
        }
        let (worst, best) = few.finish();
        assert_eq!(worst.len(), 5);
        assert!(
            best.is_empty(),
            "every image is already shown among the worst"
        );
    }

    #[test]
    fn heat_scale_ends() {
        assert_eq!(heat(0.0), Rgb([0, 0, 4]));
        assert_eq!(heat(1.0), Rgb([252, 255, 164]));
        assert_eq!(heat(7.0), Rgb([252, 255, 164]));
    }
}
