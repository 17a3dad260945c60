//! `vae-pipeline report`: the metrics against scikit-image, the checks before work, `--shards`
//! against `--input` (the normalization round trip), and the outputs of a two-model run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use arrow_array::{Array, Float64Array, RecordBatch, StringArray};
use base64::Engine as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use vae_pipeline::report::metrics::{psnr, ssim};

/// Tolerance against scikit-image (the contract).
const SKIMAGE_TOL: f64 = 1e-4;

/// A Kodak image as HWC f32 in [0, 1] with its width and height.
fn kodak(name: &str) -> (usize, usize, Vec<f32>) {
    let rgb = image::open(shared(&format!("data/kodak/{name}.png")))
        .unwrap()
        .to_rgb8();
    let (w, h) = rgb.dimensions();
    let data = rgb.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    (w as usize, h as usize, data)
}

fn crop(img: &(usize, usize, Vec<f32>), x0: usize, y0: usize, w: usize, h: usize) -> Vec<f32> {
    let (iw, _, data) = img;
    let mut out = Vec::with_capacity(w * h * 3);
    for y in y0..y0 + h {
        out.extend_from_slice(&data[(y * iw + x0) * 3..(y * iw + x0 + w) * 3]);
    }
    out
}

fn hwc_to_chw(hwc: &[f32], w: usize, h: usize) -> Vec<f32> {
    let mut out = vec![0.0; hwc.len()];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = px[c];
        }
    }
    out
}

/// Deterministic noise in [-amp, amp] (xorshift), clamped into [0, 1] after adding.
fn noisy(img: &[f32], amp: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.max(1);
    img.iter()
        .map(|&v| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (v + (2.0 * u - 1.0) * amp).clamp(0.0, 1.0)
        })
        .collect()
}

fn box_blur(img: &[f32], w: usize, h: usize) -> Vec<f32> {
    let mut out = img.to_vec();
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let (mut sum, mut n) = (0.0, 0.0);
                for yy in y.saturating_sub(1)..(y + 2).min(h) {
                    for xx in x.saturating_sub(1)..(x + 2).min(w) {
                        sum += img[(yy * w + xx) * 3 + c];
                        n += 1.0;
                    }
                }
                out[(y * w + x) * 3 + c] = sum / n;
            }
        }
    }
    out
}

struct Pair {
    name: &'static str,
    w: usize,
    h: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

fn write_npy(path: &Path, hwc: &[f32], w: usize, h: usize) {
    let arr = ndarray::Array3::from_shape_vec((h, w, 3), hwc.to_vec()).unwrap();
    ndarray_npy::write_npy(path, &arr).unwrap();
}

#[test]
fn psnr_and_ssim_match_scikit_image_on_kodak_crops_and_pathological_inputs() {
    let k01 = kodak("kodim01");
    let k13 = kodak("kodim13");
    let k23 = kodak("kodim23");
    let k05 = kodak("kodim05");
    let c01 = crop(&k01, 300, 200, 64, 64);
    let c13 = crop(&k13, 10, 40, 96, 48);
    let c23 = crop(&k23, 200, 100, 256, 256);
    let c05 = crop(&k05, 0, 0, 40, 40);
    let strip_w1 = crop(&k01, 400, 100, 1, 64);
    let strip_h1 = crop(&k13, 100, 300, 64, 1);
    let quantized: Vec<f32> = c05.iter().map(|v| (v * 15.0).round() / 15.0).collect();
    let constant = |w: usize, h: usize, v: f32| vec![v; w * h * 3];
    let pairs = vec![
        Pair {
            name: "kodim01_noise",
            w: 64,
            h: 64,
            a: c01.clone(),
            b: noisy(&c01, 0.08, 1),
        },
        Pair {
            name: "kodim13_blur_nonsquare",
            w: 96,
            h: 48,
            b: box_blur(&c13, 96, 48),
            a: c13,
        },
        Pair {
            name: "kodim23_contrast_256",
            w: 256,
            h: 256,
            b: c23.iter().map(|v| v * 0.85 + 0.05).collect(),
            a: c23,
        },
        Pair {
            name: "kodim05_quantized",
            w: 40,
            h: 40,
            a: c05.clone(),
            b: quantized,
        },
        Pair {
            name: "identical",
            w: 64,
            h: 64,
            a: c01.clone(),
            b: c01.clone(),
        },
        Pair {
            name: "constant_same",
            w: 32,
            h: 32,
            a: constant(32, 32, 0.5),
            b: constant(32, 32, 0.5),
        },
        Pair {
            name: "constant_different",
            w: 32,
            h: 32,
            a: constant(32, 32, 0.2),
            b: constant(32, 32, 0.7),
        },
        Pair {
            name: "constant_vs_texture",
            w: 64,
            h: 64,
            a: constant(64, 64, 0.5),
            b: c01.clone(),
        },
        Pair {
            name: "black_vs_white",
            w: 16,
            h: 16,
            a: constant(16, 16, 0.0),
            b: constant(16, 16, 1.0),
        },
        Pair {
            name: "one_pixel_wide",
            w: 1,
            h: 64,
            b: noisy(&strip_w1, 0.1, 2),
            a: strip_w1,
        },
        Pair {
            name: "one_pixel_high",
            w: 64,
            h: 1,
            b: noisy(&strip_h1, 0.1, 3),
            a: strip_h1,
        },
        Pair {
            name: "one_pixel",
            w: 1,
            h: 1,
            a: vec![0.2, 0.5, 0.9],
            b: vec![0.25, 0.4, 0.9],
        },
        Pair {
            name: "small_5x7",
            w: 5,
            h: 7,
            a: crop(&k01, 50, 50, 5, 7),
            b: noisy(&crop(&k01, 50, 50, 5, 7), 0.1, 4),
        },
        Pair {
            name: "small_10x10",
            w: 10,
            h: 10,
            a: crop(&k23, 5, 5, 10, 10),
            b: noisy(&crop(&k23, 5, 5, 10, 10), 0.1, 5),
        },
        Pair {
            name: "window_11x11",
            w: 11,
            h: 11,
            a: crop(&k23, 60, 60, 11, 11),
            b: noisy(&crop(&k23, 60, 60, 11, 11), 0.1, 6),
        },
        Pair {
            name: "odd_12x11",
            w: 12,
            h: 11,
            a: crop(&k13, 0, 0, 12, 11),
            b: noisy(&crop(&k13, 0, 0, 12, 11), 0.1, 7),
        },
    ];

    let dir = scratch("report-metrics");
    for p in &pairs {
        write_npy(&dir.join(format!("{}.a.npy", p.name)), &p.a, p.w, p.h);
        write_npy(&dir.join(format!("{}.b.npy", p.name)), &p.b, p.w, p.h);
    }
    let out = Command::new(python())
        .arg(repo().join("tests/python/report_reference.py"))
        .arg("metrics")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scikit-image reference failed: {}",
        stderr(&out)
    );
    let reference: BTreeMap<String, Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reference.len(), pairs.len());

    for p in &pairs {
        let r = &reference[p.name];
        let (a, b) = (hwc_to_chw(&p.a, p.w, p.h), hwc_to_chw(&p.b, p.w, p.h));
        let ours_psnr = psnr(&a, &b);
        match r["psnr"].as_f64() {
            Some(theirs) => assert!(
                (ours_psnr - theirs).abs() <= SKIMAGE_TOL,
                "{}: PSNR {ours_psnr} vs scikit-image {theirs}",
                p.name
            ),
            None => assert!(
                ours_psnr == f64::INFINITY && r["psnr"] == "inf",
                "{}: PSNR {ours_psnr} vs scikit-image {}",
                p.name,
                r["psnr"]
            ),
        }
        let ours_ssim = ssim(&a, &b, p.w, p.h);
        let theirs = r["ssim"].as_f64().unwrap();
        assert!(
            (ours_ssim - theirs).abs() <= SKIMAGE_TOL,
            "{}: SSIM {ours_ssim} vs scikit-image {theirs} (win_size {})",
            p.name,
            r["win_size"]
        );
        // Below 11 px scikit-image's default call raises; ours equals its win_size=s call.
        assert_eq!(
            r["skimage_default_raises"].as_bool().unwrap(),
            p.w.min(p.h) < 11,
            "{}",
            p.name
        );
    }
    let r = |name: &str| reference[name]["ssim"].as_f64().unwrap();
    assert!((r("identical") - 1.0).abs() < 1e-12 && (r("constant_same") - 1.0).abs() < 1e-12);
}

/// A card for a shared model with its decoder (the shipped cards need `make models`).
fn report_card(dir: &Path, model: &str) -> PathBuf {
    let m = |f: &str| shared(&format!("models/{f}")).display().to_string();
    let body = match model {
        "taef2" => format!(
            "name = \"taef2\"\nencoder = \"{}\"\ndecoder = \"{}\"\ninput_range = [0.0, 1.0]\noutput = \"latent\"\nlatent_channels = 32\nspatial_factor = 8\nscaling_factor = 1.0\n",
            m("taef2_encoder.onnx"),
            m("taef2_decoder.onnx")
        ),
        "tiny-kl" => format!(
            "name = \"tiny-kl\"\nencoder = \"{}\"\ndecoder = \"{}\"\ninput_range = [-1.0, 1.0]\noutput = \"moments\"\nlatent_channels = 4\nspatial_factor = 2\nscaling_factor = 0.18215\n",
            m("tiny_kl_encoder.onnx"),
            m("tiny_kl_decoder.onnx")
        ),
        other => panic!("no report card for {other}"),
    };
    let path = dir.join(format!("{model}-report.toml"));
    std::fs::write(&path, body).unwrap();
    path
}

/// The first `n` Kodak images, copied (not linked) so a test may change one.
fn kodak_copies(dir: &Path, n: usize) -> PathBuf {
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    for i in 1..=n {
        let name = format!("kodim{i:02}.png");
        std::fs::copy(shared(&format!("data/kodak/{name}")), input.join(&name)).unwrap();
    }
    input
}

fn run_ok(args: &[&str]) {
    let out = vae_pipeline(args);
    assert!(out.status.success(), "{args:?} failed:\n{}", stderr(&out));
}

/// `metrics.parquet` as model → key → (psnr, ssim, latent_mean, latent_std), plus its columns.
type Metrics = BTreeMap<String, BTreeMap<String, [f64; 4]>>;

fn read_metrics(out: &Path) -> (Metrics, Vec<String>) {
    let file = std::fs::File::open(out.join("metrics.parquet")).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Metrics::new();
    let mut columns = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.unwrap();
        columns = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let text = |n: &str| {
            batch
                .column_by_name(n)
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let float = |n: &str| {
            batch
                .column_by_name(n)
                .unwrap()
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .clone()
        };
        let (keys, models) = (text("key"), text("model"));
        let values = ["psnr", "ssim", "latent_mean", "latent_std"].map(float);
        for i in 0..batch.num_rows() {
            let row = values.each_ref().map(|v| v.value(i));
            let previous = rows
                .entry(models.value(i).to_string())
                .or_default()
                .insert(keys.value(i).to_string(), row);
            assert!(
                previous.is_none(),
                "duplicate row {} {}",
                models.value(i),
                keys.value(i)
            );
        }
    }
    (rows, columns)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn shards_mode_reproduces_input_mode_and_flags_changed_sources() {
    let dir = scratch("report-shards");
    let input = kodak_copies(&dir, 6);
    let card = report_card(&dir, "tiny-kl");
    let shards = dir.join("shards");
    let r = precompute_f32(
        &input,
        &shards,
        &card,
        "64",
        &["--latent-mode", "mean", "--threads", "2"],
    );
    assert!(r.status.success(), "precompute failed:\n{}", stderr(&r));
    let (from_images, from_shards) = (dir.join("from-images"), dir.join("from-shards"));
    let common = ["--model", s(&card), "--threads", "2", "--batch-size", "4"];
    run_ok(
        &[
            &[
                "report",
                "--input",
                s(&input),
                "--size",
                "64",
                "--out",
                s(&from_images),
            ],
            &common[..],
        ]
        .concat(),
    );
    run_ok(
        &[
            &[
                "report",
                "--shards",
                s(&shards),
                "--input",
                s(&input),
                "--out",
                s(&from_shards),
            ],
            &common[..],
        ]
        .concat(),
    );

    let (a, _) = read_metrics(&from_images);
    let (b, _) = read_metrics(&from_shards);
    assert_eq!(a["tiny-kl"].len(), 6);
    // f32 shards store exactly what the report computes from the images, so the numbers are
    // the same bits: z = latent / 0.18215 undoes the stored normalization identically.
    assert_eq!(a, b, "--shards must reproduce --input");
    let (sa, sb) = (
        read_json(&from_images.join("summary.json")),
        read_json(&from_shards.join("summary.json")),
    );
    assert_eq!(sb["source"], "shards");
    for field in [
        "psnr_mean",
        "ssim_mean",
        "latent_std",
        "latent_channel_mean",
        "recommended_scaling_factor",
    ] {
        assert_eq!(
            sa["models"]["tiny-kl"][field], sb["models"]["tiny-kl"][field],
            "{field}"
        );
    }
    assert_eq!(
        sb["models"]["tiny-kl"]["card_scaling_factor"]
            .as_f64()
            .unwrap() as f32,
        0.18215
    );

    // A source that changed after precompute is reported as stale, not silently compared.
    std::fs::copy(shared("data/kodak/kodim07.png"), input.join("kodim03.png")).unwrap();
    let stale = dir.join("stale");
    run_ok(
        &[
            &[
                "report",
                "--shards",
                s(&shards),
                "--input",
                s(&input),
                "--out",
                s(&stale),
            ],
            &common[..],
        ]
        .concat(),
    );
    let errors = std::fs::read_to_string(stale.join("errors.jsonl")).unwrap();
    let lines: Vec<Value> = errors
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{errors}");
    assert_eq!(
        (lines[0]["key"].as_str(), lines[0]["kind"].as_str()),
        (Some("kodim03.png"), Some("stale"))
    );
    let summary = read_json(&stale.join("summary.json"));
    assert_eq!(
        (summary["inputs"].as_u64(), summary["failed"].as_u64()),
        (Some(6), Some(1))
    );
    assert_eq!(summary["models"]["tiny-kl"]["images"], 5);
}

#[test]
fn two_models_one_table_and_a_self_contained_page() {
    let dir = scratch("report-two-models");
    let input = kodak_copies(&dir, 6);
    let (taef2, tiny) = (report_card(&dir, "taef2"), report_card(&dir, "tiny-kl"));
    let out = dir.join("report");
    run_ok(&[
        "report",
        "--input",
        s(&input),
        "--model",
        s(&taef2),
        "--model",
        s(&tiny),
        "--size",
        "64",
        "--limit",
        "5",
        "--batch-size",
        "2",
        "--threads",
        "2",
        "--out",
        s(&out),
    ]);

    let (metrics, columns) = read_metrics(&out);
    assert_eq!(
        columns,
        ["key", "model", "psnr", "ssim", "latent_mean", "latent_std"],
        "no lpips column without --lpips"
    );
    let keys: Vec<String> = (1..=5).map(|i| format!("kodim{i:02}.png")).collect();
    for model in ["taef2", "tiny-kl"] {
        assert_eq!(
            metrics[model].keys().cloned().collect::<Vec<_>>(),
            keys,
            "{model}: same images"
        );
    }
    // The trained TAEF2 reconstructs; the random-weight tiny-KL does not.
    let mean_psnr = |m: &str| metrics[m].values().map(|r| r[0]).sum::<f64>() / 5.0;
    assert!(mean_psnr("taef2") > 20.0 && mean_psnr("tiny-kl") < 15.0);

    let summary = read_json(&out.join("summary.json"));
    for model in ["taef2", "tiny-kl"] {
        let m = &summary["models"][model];
        assert_eq!(m["images"], 5);
        let std = m["latent_std"].as_f64().unwrap();
        assert!((m["recommended_scaling_factor"].as_f64().unwrap() - 1.0 / std).abs() < 1e-12);
        assert_eq!(m["recommended_shift_factor"], m["latent_mean"]);
        assert!(m.get("lpips_mean").is_none());
        assert!(!m["verdict"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        summary["models"]["tiny-kl"]["card_scaling_factor"]
            .as_f64()
            .unwrap() as f32,
        0.18215
    );

    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<th>taef2</th><th>tiny-kl</th>"),
        "one column per model"
    );
    // Self-contained: every src is an inline PNG, no link, stylesheet, script or url().
    let srcs: Vec<&str> = html.split("src=\"").skip(1).collect();
    assert_eq!(srcs.len(), 10, "5 images (all among the worst) per model");
    for src in &srcs {
        let data = src
            .strip_prefix("data:image/png;base64,")
            .expect("inline PNG");
        let png = base64::engine::general_purpose::STANDARD
            .decode(&data[..data.find('"').unwrap()])
            .unwrap();
        let row = image::load_from_memory(&png).unwrap();
        assert_eq!(
            (row.width(), row.height()),
            (3 * 64 + 8, 64),
            "original | reconstruction | heatmap"
        );
    }
    for forbidden in [
        "href=", "<script", "<link", "url(", "@import", "http://", "https://",
    ] {
        let without_svg_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !without_svg_ns.contains(forbidden),
            "report.html contains {forbidden}"
        );
    }
    assert_eq!(
        html.matches("<svg").count(),
        3,
        "PSNR histogram + one latent chart per model"
    );
    for key in &keys {
        assert!(
            html.contains(&format!("<code>{key}</code>")),
            "{key} is named on the page"
        );
    }
}

#[test]
fn bad_setups_fail_before_any_work() {
    let dir = scratch("report-errors");
    let input = crate::common::kodak_subset(&dir, 1);
    let good = report_card(&dir, "taef2");
    let no_decoder = card_file(&dir, "taef2");
    let missing_decoder = dir.join("missing-decoder.toml");
    std::fs::write(
        &missing_decoder,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("taef2_decoder.onnx", "nowhere_decoder.onnx"),
    )
    .unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "x").unwrap();
    let out = dir.join("out");
    let (nope, lpips) = (dir.join("nope"), dir.join("lpips.onnx"));
    let (i, o, g) = (s(&input), s(&out), s(&good));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--input", s(&nope), "--model", g, "--out", o],
            "--input",
        ),
        (
            vec!["--input", i, "--model", s(&no_decoder), "--out", o],
            "has no `decoder`",
        ),
        (
            vec!["--input", i, "--model", s(&missing_decoder), "--out", o],
            "nowhere_decoder.onnx, which does not exist",
        ),
        (
            vec!["--input", i, "--model", "no-such-model", "--out", o],
            "unknown model",
        ),
        (
            vec!["--input", i, "--model", g, "--model", g, "--out", o],
            "two cards are named",
        ),
        (
            vec!["--input", i, "--model", g, "--size", "100", "--out", o],
            "not a multiple of `spatial_factor`",
        ),
        (
            vec!["--input", i, "--model", g, "--batch-size", "0", "--out", o],
            "--batch-size",
        ),
        (
            vec!["--input", i, "--model", g, "--lpips", s(&lpips), "--out", o],
            "--lpips",
        ),
        (
            vec![
                "--input",
                i,
                "--model",
                g,
                "--shards",
                s(&empty),
                "--out",
                o,
            ],
            "holds no shards (<W>x<H>/part-*.parquet)",
        ),
        (
            vec!["--input", i, "--model", g, "--out", s(&a_file)],
            "not a folder",
        ),
        (
            vec!["--input", i, "--model", g, "--out", o, "--frobnicate"],
            "--frobnicate",
        ),
        (vec!["--model", g, "--out", o], "--input"),
    ];
    for (args, expected) in cases {
        let result = vae_pipeline(&[&["report"], &args[..]].concat());
        let err = stderr(&result);
        assert_eq!(result.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in:\n{err}"
        );
        assert!(
            !out.join("report.html").exists() && !out.join("summary.json").exists(),
            "{args:?} did work"
        );
    }
}

#[test]
fn a_report_that_scored_no_image_fails_and_says_why() {
    let dir = scratch("report-nothing-scored");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("broken.png"), "not an image").unwrap();
    let out = dir.join("out");
    let result = vae_pipeline(&[
        "report",
        "--input",
        s(&input),
        "--model",
        s(&report_card(&dir, "taef2")),
        "--size",
        "64",
        "--out",
        s(&out),
    ]);
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(2), "{err}");
    assert!(err.contains("could not score any of the 1 inputs"), "{err}");
    let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
    assert!(
        errors.contains("\"key\":\"broken.png\"") && errors.contains("\"kind\":\"corrupt\""),
        "{errors}"
    );
    let summary = read_json(&out.join("summary.json"));
    assert!(
        summary["models"]["taef2"]["psnr_mean"].is_null(),
        "no numbers, not zeros"
    );
    assert!(summary["models"]["taef2"]["latent_mean"].is_null());
}
