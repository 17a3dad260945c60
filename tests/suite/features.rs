//! Training-set features through the binary: --flip against an explicitly mirrored file,
//! --captions overriding sidecars, --dedupe, --limit, and every shipped preset.

use std::fs::File;
use std::path::Path;

use crate::common::*;
use arrow_array::{Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn run(args: &[&str]) {
    let r = vae_pipeline(&[&["precompute"], args].concat());
    assert!(r.status.success(), "{}", stderr(&r));
}

/// `precompute_f32`, which must succeed.
fn run_f32(input: &Path, out: &Path, card: &Path, size: &str, extra: &[&str]) {
    let r = precompute_f32(input, out, card, size, extra);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn flip_latent_equals_the_latent_of_a_mirrored_file() {
    let dir = scratch("features-flip");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    for name in ["kodim01", "kodim04"] {
        let img = image::open(shared(&format!("data/kodak/{name}.png")))
            .unwrap()
            .to_rgb8();
        img.save(input.join(format!("{name}.png"))).unwrap();
        image::imageops::flip_horizontal(&img)
            .save(input.join(format!("{name}_mirrored.png")))
            .unwrap();
    }
    let card = card_file(&dir, "taef2");
    let out = dir.join("out");
    run_f32(&input, &out, &card, "64", &["--flip"]);
    let flips = read_rows(&out, "latent_flip");
    let plain = read_rows(&out, "latent");
    for name in ["kodim01", "kodim04"] {
        let flipped = flips[&format!("{name}.png")].0.as_ref().unwrap();
        let mirrored_file = plain[&format!("{name}_mirrored.png")].0.as_ref().unwrap();
        let d = max_abs_diff(flipped, mirrored_file);
        assert!(
            d <= 1e-3,
            "{name}: latent_flip differs from the mirrored file's latent by {d}"
        );
        let unflipped = plain[&format!("{name}.png")].0.as_ref().unwrap();
        assert!(
            max_abs_diff(flipped, unflipped) > 0.1,
            "{name}: the flip must change the latent"
        );
    }
}

#[test]
fn captions_file_overrides_sidecars_and_dedupe_and_limit_hold() {
    let dir = scratch("features-captions");
    let input = dir.join("input");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    for (src, dst) in [
        ("kodim01", "a.png"),
        ("kodim02", "b.png"),
        ("kodim03", "sub/c.png"),
        ("kodim01", "sub/copy_of_a.png"),
    ] {
        std::fs::copy(shared(&format!("data/kodak/{src}.png")), input.join(dst)).unwrap();
    }
    std::fs::write(input.join("a.txt"), "sidecar for a\n").unwrap();
    std::fs::write(input.join("b.caption"), "sidecar for b").unwrap();
    let csv = dir.join("captions.csv");
    std::fs::write(&csv, "key,caption\nb.png,\"from the CSV, with a comma and \"\"quotes\"\"\"\nsub/c.png,c from csv\n").unwrap();
    let card = card_file(&dir, "taef2");

    let out = dir.join("out");
    run_f32(
        &input,
        &out,
        &card,
        "32",
        &["--captions", s(&csv), "--dedupe"],
    );
    let rows = read_rows(&out, "latent");
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        vec!["a.png", "b.png", "sub/c.png"],
        "the copy is deduplicated"
    );
    assert_eq!(rows["a.png"].1.as_deref(), Some("sidecar for a"));
    assert_eq!(
        rows["b.png"].1.as_deref(),
        Some("from the CSV, with a comma and \"quotes\"")
    );
    assert_eq!(rows["sub/c.png"].1.as_deref(), Some("c from csv"));
    let errors = std::fs::read_to_string(out.join("_errors.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!(
        (line["key"].as_str(), line["kind"].as_str()),
        (Some("sub/copy_of_a.png"), Some("duplicate"))
    );
    assert!(line["message"].as_str().unwrap().contains("a.png"));

    let limited = dir.join("limited");
    run_f32(&input, &limited, &card, "32", &["--limit", "2"]);
    assert_eq!(
        read_rows(&limited, "latent").keys().collect::<Vec<_>>(),
        vec!["a.png", "b.png"],
        "first two keys in order"
    );
}

#[test]
fn every_preset_loads_and_print_config_round_trips() {
    let dir = scratch("features-presets");
    let mut presets: Vec<_> = std::fs::read_dir(repo().join("pipelines"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    presets.sort();
    let names: Vec<String> = presets
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in [
        "sd15-512.toml",
        "sdxl-1024-buckets.toml",
        "sd3-1024-buckets.toml",
        "flux1-1024-buckets.toml",
        "taef2-256-demo.toml",
    ] {
        assert!(names.iter().any(|n| n == wanted), "missing preset {wanted}");
    }
    for preset in presets {
        let first = vae_pipeline(&["precompute", "--pipeline", s(&preset), "--print-config"]);
        assert!(
            first.status.success(),
            "{}: {}",
            preset.display(),
            stderr(&first)
        );
        let printed = dir.join("printed.toml");
        std::fs::write(&printed, &first.stdout).unwrap();
        let again = vae_pipeline(&["precompute", "--pipeline", s(&printed), "--print-config"]);
        assert_eq!(again.stdout, first.stdout, "{}", preset.display());
        let config: toml::Table =
            toml::from_str(&std::fs::read_to_string(&preset).unwrap()).unwrap();
        let model = config["model"].as_str().unwrap();
        assert!(
            repo().join(format!("models/{model}.toml")).exists(),
            "{}: no card {model}",
            preset.display()
        );
    }
}

/// Scalar fields of `NAME.json` sidecars become typed, nullable columns with one schema for the
/// whole run: int and float widen to float, arrays are skipped, reserved names get `json_`.
#[test]
fn json_sidecar_fields_become_columns() {
    use arrow_array::{BooleanArray, Float64Array};
    let dir = scratch("features-json");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    for (src, dst) in [
        ("kodim01", "a.png"),
        ("kodim02", "b.png"),
        ("kodim03", "c.png"),
    ] {
        std::fs::copy(shared(&format!("data/kodak/{src}.png")), input.join(dst)).unwrap();
    }
    std::fs::write(
        input.join("a.json"),
        r#"{"score": 5, "aesthetic": 6.5, "nsfw": false, "source": "web"}"#,
    )
    .unwrap();
    std::fs::write(
        input.join("b.json"),
        r#"{"score": 7.5, "tags": ["x"], "caption": "from json", "source": 3}"#,
    )
    .unwrap();
    let card = card_file(&dir, "taef2");
    let out = dir.join("out");
    run(&[
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--model",
        s(&card),
        "--size",
        "32",
    ]);
    let file = File::open(out.join("32x32/part-00000.parquet")).unwrap();
    let batch = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        &names[names.len() - 5..],
        ["aesthetic", "json_caption", "nsfw", "score", "source"],
        "{names:?}"
    );
    let f64s = |c: &str| {
        batch
            .column_by_name(c)
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(f64s("score"), [Some(5.0), Some(7.5), None]);
    assert_eq!(f64s("aesthetic"), [Some(6.5), None, None]);
    let nsfw = batch
        .column_by_name("nsfw")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap()
        .iter()
        .collect::<Vec<_>>();
    assert_eq!(nsfw, [Some(false), None, None]);
    let text = |c: &str| {
        batch
            .column_by_name(c)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .iter()
            .map(|v| v.map(String::from))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        text("source"),
        [Some("web".to_string()), Some("3".to_string()), None],
        "mixed types become text"
    );
    assert_eq!(
        text("json_caption"),
        [None, Some("from json".to_string()), None]
    );
    assert_eq!(
        text("caption"),
        [None, None, None],
        "the caption column stays the sidecar .txt's"
    );
}
