//! The encode stage against tensors PyTorch/diffusers computed (`../shared/models/golden`).

use crate::common::*;
use vae_pipeline::batch::{Batch, BatchPixels, Batcher, RowPixels};
use vae_pipeline::config::LatentMode;
use vae_pipeline::decode::{decode_bytes, DecodeOptions};
use vae_pipeline::encode::Encoder;
use vae_pipeline::resize::{prepare, Framing, Prepared};

const CASES: [&str; 3] = [
    "gradient_shapes_64x64",
    "grayscale_64x64",
    "nonsquare_96x64_q95",
];

/// A batch of the golden input tensors (each `(1, 3, h, w)`), keyed by case name.
fn golden_batch(file: &str, cases: &[&str]) -> Batch {
    let mut pixels = Vec::new();
    let mut shape = Vec::new();
    for case in cases {
        let (s, v) = npy_f32(&format!("models/golden/{case}/{file}"));
        shape = s;
        pixels.extend(v);
    }
    Batch {
        frames: None,
        width: shape[3] as u32,
        height: shape[2] as u32,
        rows: cases.iter().map(|c| row(c)).collect(),
        pixels: BatchPixels::F32(pixels),
        flipped: false,
    }
}

fn golden(case: &str, file: &str) -> Vec<f32> {
    npy_f32(&format!("models/golden/{case}/{file}")).1
}

#[test]
fn taef2_fp32_matches_pytorch_in_one_batch() {
    let dir = scratch("parity-taef2");
    let mut enc = Encoder::open(&card(&dir, "taef2"), 2, LatentMode::Mean, 0).unwrap();
    let out = enc.encode(golden_batch("taef2_input.npy", &CASES)).unwrap();
    assert_eq!(out.latent_shape, [32, 8, 8]);
    let per = 32 * 64;
    for (i, case) in CASES.iter().enumerate() {
        let d = max_abs_diff(
            &out.latents[i * per..(i + 1) * per],
            &golden(case, "taef2_latent.npy"),
        );
        assert!(d <= 1e-4, "{case}: max |diff| {d}");
    }
}

#[test]
fn taef2_fp32_native_nonsquare_matches_pytorch() {
    let dir = scratch("parity-taef2-native");
    let mut enc = Encoder::open(&card(&dir, "taef2"), 2, LatentMode::Mean, 0).unwrap();
    let case = "nonsquare_96x64_q95";
    let out = enc
        .encode(golden_batch("native_taef2_input.npy", &[case]))
        .unwrap();
    assert_eq!(out.latent_shape, [32, 8, 12]);
    let d = max_abs_diff(&out.latents, &golden(case, "native_taef2_latent.npy"));
    assert!(d <= 1e-4, "max |diff| {d}");
}

#[test]
fn taef2_fp16_is_within_fp16_tolerance() {
    let dir = scratch("parity-taef2-fp16");
    let mut enc = Encoder::open(&card(&dir, "taef2-fp16"), 2, LatentMode::Mean, 0).unwrap();
    let out = enc.encode(golden_batch("taef2_input.npy", &CASES)).unwrap();
    let per = 32 * 64;
    for (i, case) in CASES.iter().enumerate() {
        let got = &out.latents[i * per..(i + 1) * per];
        let want = golden(case, "taef2_latent.npy");
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / per as f32;
        assert!(
            max_abs_diff(got, &want) <= 0.1 && mean <= 0.01,
            "{case}: mean |diff| {mean}"
        );
    }
}

/// An fp16 encoder gets f16 batches written by the batcher (in parallel, no f32 batch in
/// between): the same latents, to the bit, as an f32 batch of the same images converted on the
/// way in, with mirror images and a partial batch.
#[test]
fn fp16_batches_written_directly_encode_like_converted_f32_batches() {
    let dir = scratch("parity-taef2-fp16-direct");
    let mut enc = Encoder::open(&card(&dir, "taef2-fp16"), 2, LatentMode::Mean, 0).unwrap();
    assert!(enc.input_f16());
    let images: Vec<Prepared> = (0..3u32)
        .map(|i| Prepared {
            pixels: (0..40 * 32 * 3)
                .map(|v| ((v * 7 + i * 50) % 256) as u8)
                .collect(),
            width: 40,
            height: 32,
            crop_left: 4,
            crop_top: 0,
            crop_width: 32,
            crop_height: 32,
        })
        .collect();
    let batches = |f16: bool| {
        let mut batcher = Batcher::new(2, [0.0, 1.0]).with_flip(true).with_f16(f16);
        let mut out: Vec<Batch> = images
            .iter()
            .filter_map(|p| batcher.push(RowPixels::Image(p.clone()), row("img")))
            .collect();
        out.extend(batcher.flush());
        out
    };
    let (direct, converted) = (batches(true), batches(false));
    assert_eq!(direct.len(), 2, "one full batch and one partial");
    for (d, c) in direct.into_iter().zip(converted) {
        assert!(matches!(d.pixels, BatchPixels::F16(_)));
        assert!(matches!(c.pixels, BatchPixels::F32(_)));
        assert_eq!(d.pixels.len(), c.pixels.len());
        let (d, c) = (enc.encode(d).unwrap(), enc.encode(c).unwrap());
        assert_eq!(d.rows.len(), c.rows.len());
        assert_eq!(d.latents, c.latents);
        assert_eq!(d.flip_latents, c.flip_latents);
        assert_ne!(
            d.latents,
            d.flip_latents.unwrap(),
            "mirrors are encoded too"
        );
    }
}

#[test]
fn tiny_kl_mean_and_dist_match_diffusers() {
    let dir = scratch("parity-kl");
    let per = 4 * 32 * 32;
    let mut mean = Encoder::open(&card(&dir, "tiny-kl"), 2, LatentMode::Mean, 0).unwrap();
    let out = mean.encode(golden_batch("kl_input.npy", &CASES)).unwrap();
    assert!(out.stds.is_none());
    let mut dist = Encoder::open(&card(&dir, "tiny-kl"), 2, LatentMode::Dist, 0).unwrap();
    let d_out = dist.encode(golden_batch("kl_input.npy", &CASES)).unwrap();
    let stds = d_out.stds.as_ref().expect("dist mode stores std");
    for (i, case) in CASES.iter().enumerate() {
        let range = i * per..(i + 1) * per;
        let want = golden(case, "kl_mean_scaled.npy");
        assert!(
            max_abs_diff(&out.latents[range.clone()], &want) <= 1e-4,
            "{case} mean"
        );
        assert!(
            max_abs_diff(&d_out.latents[range.clone()], &want) <= 1e-4,
            "{case} dist mean"
        );
        let moments = golden(case, "kl_moments.npy");
        let want_std: Vec<f32> = moments[per..]
            .iter()
            .map(|lv| 0.18215 * (0.5 * lv.clamp(-30.0, 20.0)).exp())
            .collect();
        for (g, w) in stds[range].iter().zip(&want_std) {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1e-3),
                "{case} std {g} vs {w}"
            );
        }
    }
}

#[test]
fn tiny_kl_sample_is_seeded_per_key_and_distributed_like_diffusers() {
    let dir = scratch("parity-kl-sample");
    let batch = || golden_batch("kl_input.npy", &CASES);
    let sample = |seed| {
        Encoder::open(&card(&dir, "tiny-kl"), 2, LatentMode::Sample, seed)
            .unwrap()
            .encode(batch())
            .unwrap()
    };
    let (a, b, c) = (sample(7), sample(7), sample(8));
    assert_eq!(a.latents, b.latents, "same seed, same latents");
    assert!(
        max_abs_diff(&a.latents, &c.latents) > 1e-3,
        "another seed draws other noise"
    );
    // Rebuilding diffusers' formula with *its* noise checks the mean/std combination exactly.
    let per = 4 * 32 * 32;
    let case = CASES[0];
    let moments = golden(case, "kl_moments.npy");
    let (mean, lv) = moments.split_at(per);
    let noise = golden(case, "kl_noise.npy");
    let rebuilt: Vec<f32> = (0..per)
        .map(|j| (mean[j] + (0.5 * lv[j].clamp(-30.0, 20.0)).exp() * noise[j]) * 0.18215)
        .collect();
    assert!(max_abs_diff(&rebuilt, &golden(case, "kl_sample_scaled.npy")) <= 1e-4);
    // Our noise, recovered as (sample - mean) / std, must be standard normal.
    let mut dist = Encoder::open(&card(&dir, "tiny-kl"), 2, LatentMode::Dist, 0).unwrap();
    let d = dist.encode(batch()).unwrap();
    let stds = d.stds.unwrap();
    let eps: Vec<f64> = (0..a.latents.len())
        .map(|j| ((a.latents[j] - d.latents[j]) / stds[j]) as f64)
        .collect();
    let m = eps.iter().sum::<f64>() / eps.len() as f64;
    let s = (eps.iter().map(|e| (e - m).powi(2)).sum::<f64>() / eps.len() as f64).sqrt();
    assert!(
        m.abs() < 0.05 && (s - 1.0).abs() < 0.05,
        "noise mean {m}, std {s} over {} draws",
        eps.len()
    );
}

/// From the golden image files through our decoder: PNGs decode bit-exactly like Pillow; the
/// JPEG within ±2 levels; encoding the decoded pixels stays within 0.1 of the golden latents.
#[test]
fn golden_image_files_decode_like_pillow_and_encode_within_tolerance() {
    let dir = scratch("parity-files");
    let mut enc = Encoder::open(&card(&dir, "taef2"), 2, LatentMode::Mean, 0).unwrap();
    for case in CASES {
        let ext = if case.ends_with("q95") { "jpg" } else { "png" };
        let bytes = std::fs::read(shared(&format!("models/golden/inputs/{case}.{ext}"))).unwrap();
        let rgb = decode_bytes(&bytes, &DecodeOptions::default()).unwrap();
        let (_, pillow) = npy_u8(&shared(&format!("models/golden/{case}/decoded_rgb_u8.npy")));
        let worst = rgb
            .as_raw()
            .iter()
            .zip(&pillow)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            if ext == "png" { worst == 0 } else { worst <= 2 },
            "{case}: decode differs from Pillow by {worst}"
        );
        let (w, h) = rgb.dimensions();
        let image = Prepared {
            pixels: rgb.into_raw(),
            width: w,
            height: h,
            crop_left: 0,
            crop_top: 0,
            crop_width: w,
            crop_height: h,
        };
        let (latent_file, input_file) = if ext == "jpg" {
            ("native_taef2_latent.npy", "native_taef2_input.npy")
        } else {
            ("taef2_latent.npy", "taef2_input.npy")
        };
        let mut pixels = vec![0.0; 3 * (w * h) as usize];
        image.write_chw(&mut pixels, [0.0, 1.0], false);
        let (_, want_input) = npy_f32(&format!("models/golden/{case}/{input_file}"));
        assert!(max_abs_diff(&pixels, &want_input) <= 2.0 / 255.0 + 1e-6);
        let out = enc
            .encode(Batch {
                frames: None,
                width: w,
                height: h,
                rows: vec![row(case)],
                pixels: BatchPixels::F32(pixels),
                flipped: false,
            })
            .unwrap();
        let d = max_abs_diff(&out.latents, &golden(case, latent_file));
        assert!(d <= 0.1, "{case}: latents from the file differ by {d}");
    }
}

/// A 64×64 image at `--size 64` is passed through untouched: resizing must not alter pixels.
#[test]
fn same_size_center_crop_is_identity() {
    let bytes = std::fs::read(shared("models/golden/inputs/gradient_shapes_64x64.png")).unwrap();
    let rgb = decode_bytes(&bytes, &DecodeOptions::default()).unwrap();
    let raw = rgb.as_raw().clone();
    let geometry = Framing::center_crop(64).geometry("g", 64, 64).unwrap();
    let p = prepare(rgb, geometry).unwrap();
    assert_eq!(p.window_rgb(), raw);
}
