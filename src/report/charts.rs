//! The report's charts, drawn with plotters' SVG backend into strings that the page inlines
//! (no image files, no scripts, no fonts to ship: the browser renders the text).

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const WIDTH: u32 = 760;
const HEIGHT: u32 = 300;
const FONT: &str = "sans-serif";
/// One colour per model, in `--model` order (colour-blind-safe Okabe–Ito hues).
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// Histogram of per-image (on clips per-frame: `unit` "frames") PSNR, one translucent series per
/// model on shared 0.5 dB-or-wider bins. Images reconstructed exactly (PSNR = ∞) have no bin and
/// are left out.
pub fn psnr_histogram(models: &[(&str, Vec<f64>)], unit: &str) -> Result<String> {
    let finite = || {
        models
            .iter()
            .flat_map(|(_, v)| v.iter().copied().filter(|p| p.is_finite()))
    };
    let lo = finite().fold(f64::INFINITY, f64::min);
    let hi = finite().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo.floor(), hi.floor() + 1.0)
    } else {
        (0.0, 1.0)
    };
    let width = ((hi - lo) / 40.0).max(0.5);
    let bins = ((hi - lo) / width).ceil() as usize;
    let counts: Vec<Vec<u32>> = models
        .iter()
        .map(|(_, values)| {
            let mut c = vec![0u32; bins];
            for p in values.iter().filter(|p| p.is_finite()) {
                c[(((p - lo) / width) as usize).min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(0).max(1);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(lo..lo + width * bins as f64, 0u32..top + 1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("PSNR (dB)")
            .y_desc(unit)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for (m, ((name, _), count)) in models.iter().zip(&counts).enumerate() {
            let colour = PALETTE[m % PALETTE.len()];
            let fill = colour
                .mix(if models.len() > 1 { 0.5 } else { 0.8 })
                .filled();
            chart
                .draw_series(
                    count
                        .iter()
                        .enumerate()
                        .filter(|(_, &n)| n > 0)
                        .map(|(b, &n)| {
                            let x0 = lo + b as f64 * width;
                            Rectangle::new([(x0, 0), (x0 + width, n)], fill)
                        }),
                )
                .map_err(err)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fill));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Per-channel mean ± std of one model's raw latents as error bars, with the global mean (the
/// recommended `shift_factor`) and the card's `shift_factor` as horizontal lines.
pub fn latent_channels(
    colour_index: usize,
    means: &[f64],
    stds: &[f64],
    global_mean: f64,
    card_shift: f64,
) -> Result<String> {
    let channels = means.len() as i32;
    let lows = means.iter().zip(stds).map(|(m, s)| m - s);
    let highs = means.iter().zip(stds).map(|(m, s)| m + s);
    let mut lo = lows
        .chain([card_shift, global_mean])
        .fold(f64::INFINITY, f64::min);
    let mut hi = highs
        .chain([card_shift, global_mean])
        .fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        (lo, hi) = (-1.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    // Head room above the bars so the legend does not cover them.
    let legend_room = (hi - lo) * 0.4 + pad;
    let colour = PALETTE[colour_index % PALETTE.len()];

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(-1..channels, (lo - pad)..(hi + legend_room))
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("latent channel")
            .y_desc("raw latent value")
            .x_labels(channels.clamp(2, 33) as usize)
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(means.iter().zip(stds).enumerate().map(|(c, (&m, &s))| {
                ErrorBar::new_vertical(c as i32, m - s, m, m + s, colour.filled(), 6)
            }))
            .map_err(err)?
            .label("channel mean ± std")
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 12, y + 4)], colour.filled()));
        let line = |y: f64| vec![(-1, y), (channels, y)];
        chart
            .draw_series(LineSeries::new(line(global_mean), BLACK.stroke_width(1)))
            .map_err(err)?
            .label(format!(
                "global mean {global_mean:.4} (recommended shift_factor)"
            ))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLACK));
        let grey = RGBColor(150, 150, 150);
        chart
            .draw_series(LineSeries::new(line(card_shift), grey.stroke_width(2)))
            .map_err(err)?
            .label(format!("card shift_factor {card_shift}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 12, y)], grey.stroke_width(2))
            });
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
