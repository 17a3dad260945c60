//! `report.html`: one self-contained page (pictures as inline `data:` PNGs, charts as inline
//! SVG, no scripts, no external requests) so it can be mailed, archived or opened offline.

use std::fmt::Write as _;

use anyhow::Result;
use base64::Engine as _;
use image::{ImageEncoder, RgbImage};

use super::gallery::{Shot, AMPLIFY, BEST, MAX_PANEL, WORST};
use super::metrics::SSIM_WINDOW;
use super::output::{ClipSummary, Flicker, ModelSummary, Summary, FIT_TOLERANCE};

/// What the page shows for one model besides its summary.
pub struct ModelPage<'a> {
    pub name: &'a str,
    pub summary: &'a ModelSummary,
    pub latent_chart: String,
    pub worst: Vec<Shot>,
    pub best: Vec<Shot>,
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#222}
h1{margin-bottom:4px} .meta{color:#555;margin-top:0}
table.summary{border-collapse:collapse;margin:12px 0}
table.summary th,table.summary td{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.summary th:first-child,table.summary td:first-child{text-align:left}
td.bad{background:#fde2e1} td.good{background:#e3f4e3}
.verdict{margin:6px 0} figure{margin:10px 0} figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:14px;color:#333;margin-top:3px} code{background:#f3f3f3;padding:0 3px}
.legend{color:#555;font-size:14px} svg{max-width:100%;height:auto}
";

/// The whole page.
pub fn render(summary: &Summary, psnr_chart: &str, models: &[ModelPage]) -> Result<String> {
    let mut h = String::new();
    let source = match &summary.shards {
        Some(shards) => format!("stored latents from <code>{}</code>", esc(shards)),
        None => "encoded and decoded here".to_string(),
    };
    write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>VAE reconstruction report</title><style>{STYLE}</style></head><body>\n\
         <h1>VAE reconstruction report</h1>\n\
         <p class=\"meta\">{} {} from <code>{}</code> ({} could not be read), {}×{} ({}), {}. \
         vae-pipeline {}.</p>\n",
        summary.inputs,
        if summary.video.is_some() {
            "clips"
        } else {
            "images"
        },
        esc(&summary.input),
        summary.failed,
        summary.size,
        summary.size,
        esc(&summary.resize),
        source,
        summary.version
    )?;
    summary_table(&mut h, summary, models)?;
    h += if summary.video.is_some() {
        "<h2>PSNR per frame</h2>\n"
    } else {
        "<h2>PSNR per image</h2>\n"
    };
    h += psnr_chart;
    h += "\n<h2>Latent statistics</h2>\n<p class=\"legend\">Per channel: mean ± std of the raw \
          latents <code>z</code> (the card's normalization undone). The recommended \
          <code>scaling_factor</code> is 1 / (global std), the recommended <code>shift_factor</code> \
          the global mean.</p>\n";
    for m in models {
        write!(h, "<h3>{}</h3>\n{}\n", esc(m.name), m.latent_chart)?;
    }
    for m in models {
        if let Some(clips) = &m.summary.clips {
            flicker_section(&mut h, m.name, clips)?;
        }
    }
    let what = if summary.video.is_some() {
        "frames"
    } else {
        "images"
    };
    for m in models {
        write!(
            h,
            "<h2>Worst {WORST} and best {BEST} {what} by PSNR: {}</h2>\n<p class=\"legend\">Each row: \
             original | reconstruction | error heatmap (mean absolute error over RGB × {AMPLIFY}: \
             black is exact, pale yellow is {:.0} levels of 255 or more). Images larger than \
             {MAX_PANEL} px show their central {MAX_PANEL}×{MAX_PANEL} at 1:1.</p>\n",
            esc(m.name),
            255.0 / AMPLIFY
        )?;
        let rows = m
            .worst
            .iter()
            .map(|s| ("worst", s))
            .chain(m.best.iter().map(|s| ("best", s)));
        let mut rank = [0usize; 2];
        for (which, shot) in rows {
            let r = &mut rank[usize::from(which == "best")];
            *r += 1;
            writeln!(
                h,
                "<figure><img src=\"data:image/png;base64,{}\" width=\"{}\" height=\"{}\" alt=\"{}\">\
                 <figcaption>{which} {r}: <code>{}</code> · PSNR {:.2} dB · SSIM {:.4}</figcaption></figure>",
                png_base64(&shot.row)?,
                shot.row.width(),
                shot.row.height(),
                esc(&shot.key),
                esc(&shot.key),
                shot.psnr,
                shot.ssim
            )?;
        }
    }
    write!(
        h,
        "<h2>Definitions</h2>\n<p class=\"legend\">PSNR: <code>10·log10(1/MSE)</code> per image over \
         all pixels and channels in [0, 1], reconstruction clamped; mean ± std over images. SSIM: \
         per RGB channel with an {SSIM_WINDOW}×{SSIM_WINDOW} Gaussian window (σ 1.5), K1 0.01, K2 \
         0.03, data range 1, population covariance, averaged over channels (scikit-image's \
         <code>structural_similarity(…, gaussian_weights=True, sigma=1.5, \
         use_sample_covariance=False, data_range=1)</code>). A normalization fits when the stored \
         latents' std is within {:.0}% of 1 and their mean within {:.0}% of their std from 0.</p>\n",
        FIT_TOLERANCE * 100.0,
        FIT_TOLERANCE * 100.0
    )?;
    if summary.video.is_some() {
        h += FLICKER_DEFINITION;
    }
    h += "</body></html>\n";
    Ok(h)
}

/// What the clip numbers are, on the page as in docs/report.md.
const FLICKER_DEFINITION: &str = "<p class=\"legend\">Clips: each window of T frames is encoded \
    by the card's temporal encoder, its mean latent decoded by the temporal decoder, and every \
    reconstructed frame r<sub>t</sub> scored against the source frame x<sub>t</sub> the encoder \
    saw (resized and cropped, RGB in [0, 1]): PSNR and SSIM per frame as above, means over all \
    frames. Temporal flicker, per pair of consecutive frames of a window: source change \
    <code>mean |x<sub>t</sub> − x<sub>t−1</sub>|</code>, reconstruction change <code>mean \
    |r<sub>t</sub> − r<sub>t−1</sub>|</code>, and flicker error <code>mean |(r<sub>t</sub> − \
    r<sub>t−1</sub>) − (x<sub>t</sub> − x<sub>t−1</sub>)|</code>, each over all pixels and \
    channels in [0, 1] units (1/255 is one level). A window's (and the run's) flicker is the \
    mean over its (all) frame pairs; ratio = reconstruction / source (above 1: the \
    reconstruction flickers more than the clip moves; below 1: it smooths motion away), \
    difference = reconstruction − source. A one-frame window has no pair.</p>\n";

/// The flicker numbers overall and the windows whose reconstruction changes most against
/// their source (highest ratio first; all windows are in summary.json).
fn flicker_section(h: &mut String, name: &str, clips: &ClipSummary) -> Result<()> {
    const SHOWN: usize = 8;
    write!(
        h,
        "<h2>Temporal flicker: {}</h2>\n<p class=\"legend\">{} windows, {} frame pairs: source \
         change {}, reconstruction change {} (ratio {}, difference {}), flicker error {}. The \
         {SHOWN} windows with the highest ratio:</p>\n<table class=\"summary\"><tr><th>window</th>\
         <th>frames</th><th>PSNR mean (min)</th><th>SSIM mean</th><th>source change</th>\
         <th>reconstruction change</th><th>ratio</th><th>difference</th><th>flicker error</th></tr>\n",
        esc(name),
        clips.windows,
        clips.flicker.pairs,
        opt(clips.flicker.source, 5),
        opt(clips.flicker.reconstruction, 5),
        opt(clips.flicker.ratio, 3),
        opt(clips.flicker.difference, 5),
        opt(clips.flicker.error, 5),
    )?;
    let mut windows: Vec<_> = clips.per_window.iter().collect();
    windows.sort_by(|a, b| {
        let r = |f: &Flicker| f.ratio.unwrap_or(f64::NEG_INFINITY);
        r(&b.flicker)
            .total_cmp(&r(&a.flicker))
            .then_with(|| a.key.cmp(&b.key))
    });
    for w in windows.into_iter().take(SHOWN) {
        let f = &w.flicker;
        writeln!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&w.key),
            w.frames,
            num(w.psnr_mean, 2),
            num(w.psnr_min, 2),
            num(w.ssim_mean, 4),
            opt(f.source, 5),
            opt(f.reconstruction, 5),
            opt(f.ratio, 3),
            opt(f.difference, 5),
            opt(f.error, 5),
        )?;
    }
    h.push_str("</table>\n");
    Ok(())
}

/// Rows are quantities, columns are models (same images for every model).
fn summary_table(h: &mut String, summary: &Summary, models: &[ModelPage]) -> Result<()> {
    h.push_str("<h2>Summary</h2>\n<table class=\"summary\"><tr><th></th>");
    for m in models {
        write!(h, "<th>{}</th>", esc(m.name))?;
    }
    h.push_str("</tr>\n");
    let mut row = |label: &str, cell: &dyn Fn(&ModelSummary) -> (String, &'static str)| {
        let mut line = format!("<tr><td>{label}</td>");
        for m in models {
            let (text, class) = cell(m.summary);
            if class.is_empty() {
                line += &format!("<td>{text}</td>");
            } else {
                line += &format!("<td class=\"{class}\">{text}</td>");
            }
        }
        line += "</tr>\n";
        h.push_str(&line);
    };
    let fit = |ok: bool| if ok { "good" } else { "bad" };
    if summary.video.is_some() {
        row("windows scored (frames)", &|s| {
            let windows = s.clips.as_ref().map_or(0, |c| c.windows);
            (
                format!(
                    "{windows} ({} frames; {} windows failed)",
                    s.images, s.failed
                ),
                "",
            )
        });
    } else {
        row("images scored", &|s| {
            (format!("{} ({} failed)", s.images, s.failed), "")
        });
    }
    row("PSNR (dB), mean ± std", &|s| {
        (pm(s.psnr_mean, s.psnr_std, 2), "")
    });
    row("SSIM, mean ± std", &|s| {
        (pm(s.ssim_mean, s.ssim_std, 4), "")
    });
    if summary.lpips.is_some() {
        row("LPIPS, mean ± std", &|s| {
            (
                pm(
                    s.lpips_mean.unwrap_or(f64::NAN),
                    s.lpips_std.unwrap_or(f64::NAN),
                    4,
                ),
                "",
            )
        });
    }
    if summary.video.is_some() {
        let flicker = |s: &ModelSummary| s.clips.as_ref().map(|c| c.flicker.clone());
        row(
            "flicker: source, reconstruction (ratio)",
            &|s| match flicker(s) {
                Some(f) => (
                    format!(
                        "{}, {} ({})",
                        opt(f.source, 5),
                        opt(f.reconstruction, 5),
                        opt(f.ratio, 3)
                    ),
                    "",
                ),
                None => ("–".into(), ""),
            },
        );
        row("flicker error", &|s| match flicker(s) {
            Some(f) => (opt(f.error, 5), ""),
            None => ("–".into(), ""),
        });
    }
    row("latent mean (raw)", &|s| (num(s.latent_mean, 4), ""));
    row("latent std (raw)", &|s| (num(s.latent_std, 4), ""));
    // A per-channel card's advice is its latents_mean/latents_std (summary.json), not a
    // scaling_factor on top of them.
    let per_channel = |s: &ModelSummary| s.recommended_latents_mean.is_some();
    row("scaling_factor: recommended (card)", &|s| {
        if per_channel(s) {
            return (
                format!("{} (per-channel card)", s.card_scaling_factor),
                fit(s.scaling_factor_fits),
            );
        }
        (
            format!(
                "{} ({})",
                num(s.recommended_scaling_factor, 4),
                s.card_scaling_factor
            ),
            fit(s.scaling_factor_fits),
        )
    });
    row("shift_factor: recommended (card)", &|s| {
        if per_channel(s) {
            return (
                format!(
                    "{} (per-channel card: latents_mean/latents_std in summary.json)",
                    s.card_shift_factor
                ),
                fit(s.shift_factor_fits),
            );
        }
        (
            format!(
                "{} ({})",
                num(s.recommended_shift_factor, 4),
                s.card_shift_factor
            ),
            fit(s.shift_factor_fits),
        )
    });
    row("stored latents with the card: std, mean", &|s| {
        (
            format!(
                "{}, {}",
                num(s.stored_latent_std, 3),
                num(s.stored_latent_mean, 3)
            ),
            "",
        )
    });
    h.push_str("</table>\n");
    for m in models {
        writeln!(
            h,
            "<p class=\"verdict\"><b>{}</b>: {}</p>",
            esc(m.name),
            esc(&m.summary.verdict)
        )?;
    }
    Ok(())
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else if v == f64::INFINITY {
        "∞".into()
    } else {
        "–".into()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    num(v.unwrap_or(f64::NAN), digits)
}

fn pm(mean: f64, std: f64, digits: usize) -> String {
    format!("{} ± {}", num(mean, digits), num(std, digits))
}

fn png_base64(image: &RgbImage) -> Result<String> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_keys() {
        assert_eq!(esc("a<b>&\"c'.png"), "a&lt;b&gt;&amp;&quot;c&#39;.png");
    }

    #[test]
    fn numbers_never_print_nan() {
        assert_eq!(num(f64::NAN, 2), "–");
        assert_eq!(num(f64::INFINITY, 2), "∞");
        assert_eq!(pm(27.123, 3.2, 2), "27.12 ± 3.20");
    }
}
