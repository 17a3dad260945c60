//! Real-world inputs: every case `tests/fixtures/make_fixtures.py` writes must decode to Pillow's
//! careful reading (EXIF transposed, alpha on white) or be refused with the expected kind.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::common::*;
use vae_pipeline::decode::{decode_sample, DecodeOptions};
use vae_pipeline::failure::Failure;
use vae_pipeline::source::{FolderSource, Location, SampleRef, Source};

/// Loads and decodes one listed sample at full size, as the pipeline's decode stage does.
fn decode(
    source: &FolderSource,
    sample: SampleRef,
    options: &DecodeOptions,
) -> Result<vae_pipeline::decode::Decoded, Failure> {
    let loaded = source.load(sample)?;
    decode_sample(&loaded.key, &loaded.bytes.bytes, options, None)
}

/// Generates the fixtures once per test binary run into `dir`; returns the expected outcomes.
fn fixtures(dir: &Path) -> BTreeMap<String, serde_json::Value> {
    let out = Command::new(python())
        .arg(repo().join("tests/fixtures/make_fixtures.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fixture generation failed: {}",
        stderr(&out)
    );
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

#[test]
fn every_fixture_decodes_like_pillow_or_is_refused_with_its_kind() {
    let dir = scratch("inputs-decode");
    let expected = fixtures(&dir);
    let input = dir.join("input");
    let options = DecodeOptions::default();
    let mut seen = BTreeMap::new();
    let source = FolderSource::new(&input);
    for item in source.list() {
        let outcome = item.and_then(|sample| {
            let key = sample.key.clone();
            decode(&source, sample, &options).map(|d| (key, d))
        });
        match outcome {
            Ok((key, decoded)) => {
                let want = &expected
                    .get(&key)
                    .unwrap_or_else(|| panic!("unexpected image {key}"));
                assert_eq!(
                    want["kind"], "ok",
                    "{key} decoded but should be refused as {}",
                    want["kind"]
                );
                let (shape, reference) = npy_u8(&dir.join(want["ref"].as_str().unwrap()));
                let (w, h) = decoded.rgb.dimensions();
                assert_eq!(
                    shape,
                    vec![h as usize, w as usize, 3],
                    "{key}: upright size"
                );
                let tol = want["tol"].as_u64().unwrap() as u8;
                let frac = want["frac"].as_f64().unwrap();
                let diffs: Vec<u8> = decoded
                    .rgb
                    .as_raw()
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| a.abs_diff(*b))
                    .collect();
                let over = diffs.iter().filter(|&&d| d > tol).count() as f64 / diffs.len() as f64;
                let worst = diffs.iter().max().unwrap();
                assert!(
                    over <= frac && *worst <= tol.max(8),
                    "{key}: {:.2}% over {tol} levels, worst {worst}",
                    over * 100.0
                );
                eprintln!(
                    "{key}: worst {worst} levels, {:.2}% over {tol}",
                    over * 100.0
                );
                seen.insert(key, "ok".to_string());
            }
            Err(failure) => {
                let want = &expected
                    .get(&failure.key)
                    .unwrap_or_else(|| panic!("unexpected failure {failure:?}"));
                assert_eq!(
                    want["kind"],
                    failure.kind.as_str(),
                    "{}: {}",
                    failure.key,
                    failure.message
                );
                seen.insert(failure.key.clone(), failure.kind.as_str().to_string());
            }
        }
    }
    let missing: Vec<_> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(missing.is_empty(), "fixtures never reported: {missing:?}");
}

/// `_errors.jsonl` lines of a run, by key.
fn errors(out: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(out.join("_errors.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["key"].as_str().unwrap().to_string(),
                v["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The binary over every fixture: each good image is one row, each bad one one error line with
/// its kind, the run succeeds; `--min-size`, `--alpha reject` and `--max-failures` do what they say.
#[test]
fn precompute_over_every_fixture_records_each_input_once() {
    let dir = scratch("inputs-run");
    let expected = fixtures(&dir);
    let input = dir.join("input");
    let card = card_file(&dir, "taef2");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        (precompute_f32(&input, &out, &card, "32", extra), out)
    };
    let (r, out) = run("default", &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    let rows = read_latents(&out);
    let errs = errors(&out);
    for (key, want) in &expected {
        let kind = want
            .get("run_kind")
            .unwrap_or(&want["kind"])
            .as_str()
            .unwrap();
        match kind {
            "ok" => assert!(
                rows.contains_key(key) && !errs.contains_key(key),
                "{key} should be a row"
            ),
            kind => assert_eq!(
                errs.get(key).map(String::as_str),
                Some(kind),
                "{key} should be an error line"
            ),
        }
    }
    assert_eq!(
        rows.len() + errs.len(),
        expected.len(),
        "nothing extra: captions, .json and scripts are ignored"
    );
    let refused = expected
        .values()
        .filter(|v| v.get("run_kind").unwrap_or(&v["kind"]) != "ok")
        .count();
    assert!(
        stderr(&r).contains(&format!("{refused} failed (")),
        "{}",
        stderr(&r)
    );

    let (r, out) = run("min-size", &["--min-size", "20"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(
        errors(&out).get("small/tiny_16x12.png").map(String::as_str),
        Some("too_small")
    );

    let (r, out) = run("reject-alpha", &["--alpha", "reject"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let errs = errors(&out);
    for key in [
        "png/rgba8.png",
        "png/gray_alpha.png",
        "png/rgba16.png",
        "other/lossless_alpha.webp",
    ] {
        assert_eq!(
            errs.get(key).map(String::as_str),
            Some("unsupported"),
            "{key}"
        );
    }

    let (r, out) = run("strict", &["--max-failures", "0.05"]);
    assert!(
        !r.status.success(),
        "more than 5% failed: the run must fail"
    );
    assert!(
        stderr(&r).contains("more than --max-failures 0.05"),
        "{}",
        stderr(&r)
    );
    assert!(!out.join("_SUCCESS").exists() && out.join("_errors.jsonl").exists());
}

/// `--alpha black` composites on black: a fully transparent pixel becomes 0, on white 255.
#[test]
fn alpha_policy_picks_the_background() {
    let dir = scratch("inputs-alpha");
    let mut img = image::RgbaImage::from_pixel(8, 8, image::Rgba([200, 100, 50, 0]));
    img.put_pixel(0, 0, image::Rgba([200, 100, 50, 255]));
    let path = dir.join("a.png");
    img.save(&path).unwrap();
    let source = FolderSource::new(&dir);
    let sample = || SampleRef {
        key: "a.png".into(),
        at: Location::File(path.clone()),
    };
    for (alpha, bg) in [
        (vae_pipeline::config::AlphaPolicy::White, 255),
        (vae_pipeline::config::AlphaPolicy::Black, 0),
    ] {
        let d = decode(
            &source,
            sample(),
            &DecodeOptions {
                alpha,
                ..DecodeOptions::default()
            },
        )
        .unwrap();
        assert_eq!(d.rgb.get_pixel(0, 0).0, [200, 100, 50], "opaque pixel kept");
        assert_eq!(d.rgb.get_pixel(1, 0).0, [bg; 3], "{alpha:?}");
    }
}
