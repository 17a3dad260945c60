//! The Wan-family clip graphs and `temporal::{ClipEncoder, ClipDecoder}` against what diffusers
//! 0.42.1 computes for 1-, 5- and 9-frame clips (`../shared/models/families/*/golden_video.npz`,
//! see the README there): each family exported by the binary, every case encoded from
//! `input · 2 − 1` (frame-major), compared with `encoder_output`; its mean normalized with the
//! card's per-channel statistics against `latent_normalized`; the golden mean decoded against
//! `decoded`. Errors are max |a − b| / max |golden| (the tensor's scale), within 1e-4 in f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use vae_pipeline::model::ModelCard;
use vae_pipeline::temporal::{ClipDecoder, ClipEncoder};

use crate::common::{python, s, scratch, shared, vae_pipeline};

const FAMILIES: [&str; 3] = ["wan2.1", "qwen-image", "wan2.2"];
const TOLERANCE: f32 = 1e-4;

/// A tensor of the golden file: shape and values.
type Golden = (Vec<usize>, Vec<f32>);

/// Every tensor of `golden_video.npz`, by case then name (numpy writes them out as .npy, which
/// the test reads; the test crate has no zip reader).
fn goldens(family: &str, dir: &Path) -> BTreeMap<String, BTreeMap<String, Golden>> {
    let npz = shared(&format!("models/families/{family}/golden_video.npz"));
    let out = dir.join("golden");
    let script = "import sys, numpy as np, pathlib\n\
                  z = np.load(sys.argv[1]); out = pathlib.Path(sys.argv[2])\n\
                  for k in z.files:\n    p = out / (k + '.npy'); p.parent.mkdir(parents=True, exist_ok=True); np.save(p, z[k])\n";
    let status = Command::new(python())
        .args(["-c", script, s(&npz), s(&out)])
        .status()
        .unwrap();
    assert!(status.success(), "numpy could not read {}", npz.display());
    let mut cases = BTreeMap::new();
    for case in std::fs::read_dir(&out).unwrap() {
        let case = case.unwrap().path();
        let mut tensors = BTreeMap::new();
        for file in std::fs::read_dir(&case).unwrap() {
            let file = file.unwrap().path();
            let a: ndarray::ArrayD<f32> = ndarray_npy::read_npy(&file).unwrap();
            let name = file.file_stem().unwrap().to_string_lossy().into_owned();
            tensors.insert(name, (a.shape().to_vec(), a.iter().copied().collect()));
        }
        cases.insert(
            case.file_name().unwrap().to_string_lossy().into_owned(),
            tensors,
        );
    }
    assert!(!cases.is_empty(), "{} holds no cases", npz.display());
    cases
}

fn export(family: &str, dir: &Path, dtype: &str) -> PathBuf {
    let checkpoint = shared(&format!("models/families/{family}"));
    let out = dir.join("export");
    let run = vae_pipeline(&[
        "export",
        "--checkpoint",
        s(&checkpoint),
        "--out",
        s(&out),
        "--dtype",
        dtype,
    ]);
    assert!(
        run.status.success(),
        "export {family}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    out.join("card.toml")
}

/// max |a − b| / max |want|.
fn scaled_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// [B, C, T, H, W] → [B, T, C, H, W].
fn frame_major(x: &[f32], [b, c, t, h, w]: [usize; 5]) -> Vec<f32> {
    let plane = h * w;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for ti in 0..t {
                let from = ((bi * c + ci) * t + ti) * plane;
                let to = ((bi * t + ti) * c + ci) * plane;
                out[to..to + plane].copy_from_slice(&x[from..from + plane]);
            }
        }
    }
    out
}

fn dims5(shape: &[usize]) -> [usize; 5] {
    shape.try_into().expect("a 5-D golden tensor")
}

/// The largest error per (T, tensor) over a family's cases.
fn family_errors(family: &str) -> BTreeMap<(usize, &'static str), f32> {
    let dir = scratch(&format!("temporal-{family}"));
    let card = ModelCard::load(&export(family, &dir, "f32")).unwrap();
    let t = card.temporal.as_ref().expect("export writes [temporal]");
    assert_eq!(t.frame_factor, 4);
    let stats = card.per_channel().expect("per-channel statistics");
    let mut encoder = ClipEncoder::open(&card, 2, None).unwrap();
    let mut decoder = ClipDecoder::open(&card, 2, None).unwrap();
    let mut worst = BTreeMap::new();
    for (case, g) in goldens(family, &dir) {
        let (shape, input) = &g["input"];
        let [b, c, frames, h, w] = dims5(shape);
        let x: Vec<f32> = input.iter().map(|v| v * 2.0 - 1.0).collect();
        let x = frame_major(&x, [b, c, frames, h, w]);
        let got = encoder.encode(&x, b, frames, h, w).unwrap();
        let (want_shape, want) = &g["encoder_output"];
        let [_, moments, t_latent, lh, lw] = dims5(want_shape);
        let mut errors = vec![("encoder_output", scaled_error(&got, want))];

        let channels = moments / 2;
        let mut normalized = got[..channels * t_latent * lh * lw].to_vec();
        stats.normalize(&mut normalized, true);
        errors.push((
            "latent_normalized",
            scaled_error(&normalized, &g["latent_normalized"].1),
        ));

        let mean = &want[..channels * t_latent * lh * lw];
        let decoded = decoder.decode(mean, b, t_latent, lh, lw).unwrap();
        let (decoded_shape, want_decoded) = &g["decoded"];
        let want_decoded = frame_major(want_decoded, dims5(decoded_shape));
        errors.push(("decoded", scaled_error(&decoded, &want_decoded)));
        for (name, e) in errors {
            eprintln!("{family} {case} {name}: {e:.2e}");
            let entry = worst.entry((frames, name)).or_insert(0f32);
            *entry = entry.max(e);
        }
    }
    worst
}

#[test]
fn clip_encoder_and_decoder_match_diffusers_for_every_family_and_case() {
    let mut failures = Vec::new();
    for family in FAMILIES {
        let worst = family_errors(family);
        assert_eq!(
            worst
                .keys()
                .map(|k| k.0)
                .collect::<std::collections::BTreeSet<_>>(),
            [1, 5, 9].into(),
            "{family}: the goldens hold T = 1, 5 and 9"
        );
        for ((frames, name), e) in worst {
            println!("parity {family} T={frames} {name}: {e:.2e}");
            if e > TOLERANCE {
                failures.push(format!("{family} T={frames} {name}: {e:.2e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "off by more than {TOLERANCE:e} of the scale: {failures:?}"
    );
}

/// fp16 weights, I/O and carried frames (norms and softmax in f32): the encoder output within
/// 1e-2 of its scale, the image graphs' fp16 tolerance (measured: at most 2.8e-3).
#[test]
fn f16_clip_encoder_is_within_fp16_tolerance() {
    for family in FAMILIES {
        let dir = scratch(&format!("temporal-f16-{family}"));
        let card = ModelCard::load(&export(family, &dir, "f16")).unwrap();
        let mut encoder = ClipEncoder::open(&card, 2, None).unwrap();
        for (case, g) in goldens(family, &dir) {
            let (shape, input) = &g["input"];
            let [b, c, frames, h, w] = dims5(shape);
            let x: Vec<f32> = input.iter().map(|v| v * 2.0 - 1.0).collect();
            let got = encoder
                .encode(&frame_major(&x, [b, c, frames, h, w]), b, frames, h, w)
                .unwrap();
            let e = scaled_error(&got, &g["encoder_output"].1);
            assert!(
                e <= 1e-2,
                "{family} {case} f16: off by {e:.2e} of the scale"
            );
        }
    }
}

#[test]
fn clips_of_the_wrong_length_and_cards_without_clip_graphs_are_refused() {
    let dir = scratch("temporal-refusals");
    let card = ModelCard::load(&export("wan2.1", &dir, "f32")).unwrap();
    let mut encoder = ClipEncoder::open(&card, 1, None).unwrap();
    let err = encoder
        .encode(&vec![0.0; 3 * 3 * 16 * 16], 1, 3, 16, 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 + 4k frames"), "{err}");
    let err = encoder
        .stream()
        .push(&vec![0.0; 4 * 3 * 16 * 16], 1, 4, 16, 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the first frame alone"), "{err}");

    let mut image_only = card.clone();
    image_only.temporal = None;
    let err = ClipEncoder::open(&image_only, 1, None)
        .err()
        .expect("no [temporal]")
        .to_string();
    assert!(err.contains("no [temporal] table"), "{err}");
}
