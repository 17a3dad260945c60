//! The binary as a user runs it: bad flags and models fail before any work with a message that
//! says what to do; results do not depend on batch size, threads or the run.

use std::path::Path;

use crate::common::*;

/// Runs `precompute` and asserts it failed before writing any shard, with `expect` in stderr.
fn fails_before_work(args: &[&str], out: &Path, expect: &str) {
    let result = vae_pipeline(&[&["precompute"], args].concat());
    let err = stderr(&result);
    assert!(
        !result.status.success(),
        "expected failure for {args:?}, got success: {err}"
    );
    assert!(
        err.contains(expect),
        "for {args:?} expected {expect:?} in:\n{err}"
    );
    assert!(
        !out.join("_SUCCESS").exists() && !out.join("64x64").exists(),
        "work was done for {args:?}"
    );
}

#[test]
fn bad_input_model_and_flags_fail_before_work() {
    let dir = scratch("cli-errors");
    let input = kodak_subset(&dir, 1);
    let out = dir.join("out");
    let taef2 = card_file(&dir, "taef2");
    let kl = card_file(&dir, "tiny-kl");
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--out", s(&out)].iter().map(|x| x.to_string()).collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |extra: &[&str], expect: &str| {
        let args = common(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_before_work(&refs, &out, expect);
    };
    run(
        &["--input", "/no/such/folder", "--model", s(&taef2)],
        "--input /no/such/folder does not exist",
    );
    run(
        &["--input", s(&taef2), "--model", s(&taef2)],
        "is neither a folder, an image, a tar",
    );
    run(
        &["--input", s(&input), "--model", "no-such-model"],
        "unknown model \"no-such-model\"",
    );
    run(
        &["--input", s(&input), "--model", s(&taef2), "--size", "100"],
        "--size 100 is not a multiple of `spatial_factor` = 8",
    );
    run(
        &["--input", s(&input), "--model", s(&kl), "--size", "63"],
        "use 62 or 64",
    );
    run(
        &[
            "--input",
            s(&input),
            "--model",
            s(&taef2),
            "--batch-size",
            "0",
        ],
        "--batch-size must be at least 1",
    );
    run(
        &["--input", s(&input), "--model", s(&taef2), "--size", "abc"],
        "invalid value 'abc' for '--size",
    );
    run(
        &[
            "--input",
            s(&input),
            "--model",
            s(&taef2),
            "--latent-mode",
            "median",
        ],
        "invalid value 'median'",
    );

    let missing = dir.join("missing.toml");
    std::fs::write(
        &missing,
        std::fs::read_to_string(&taef2)
            .unwrap()
            .replace("taef2_encoder.onnx", "nope.onnx"),
    )
    .unwrap();
    run(
        &["--input", s(&input), "--model", s(&missing)],
        "field `encoder` names",
    );

    let wrong_channels = dir.join("wrong-channels.toml");
    std::fs::write(
        &wrong_channels,
        std::fs::read_to_string(&taef2)
            .unwrap()
            .replace("latent_channels = 32", "latent_channels = 16"),
    )
    .unwrap();
    run(
        &[
            "--input",
            s(&input),
            "--model",
            s(&wrong_channels),
            "--size",
            "64",
        ],
        "field `latent_channels` = 16",
    );

    let wrong_output = dir.join("wrong-output.toml");
    std::fs::write(
        &wrong_output,
        std::fs::read_to_string(&kl)
            .unwrap()
            .replace("\"moments\"", "\"latent\""),
    )
    .unwrap();
    run(
        &[
            "--input",
            s(&input),
            "--model",
            s(&wrong_output),
            "--size",
            "64",
        ],
        "but encoder output \"moments\" has 8",
    );

    let wrong_factor = dir.join("wrong-factor.toml");
    std::fs::write(
        &wrong_factor,
        std::fs::read_to_string(&kl)
            .unwrap()
            .replace("spatial_factor = 2", "spatial_factor = 8"),
    )
    .unwrap();
    run(
        &[
            "--input",
            s(&input),
            "--model",
            s(&wrong_factor),
            "--size",
            "64",
        ],
        "field `spatial_factor` = 8",
    );

    let wrong_name = dir.join("wrong-name.toml");
    std::fs::write(
        &wrong_name,
        format!(
            "{}input_name = \"pixels\"\n",
            std::fs::read_to_string(&taef2).unwrap()
        ),
    )
    .unwrap();
    run(
        &[
            "--input",
            s(&input),
            "--model",
            s(&wrong_name),
            "--size",
            "64",
        ],
        "field `input_name` = \"pixels\"",
    );

    let taef2_with = |extra: &[&str], expect: &str| {
        run(
            &[&["--input", s(&input), "--model", s(&taef2)], extra].concat(),
            expect,
        )
    };
    taef2_with(
        &["--device", "gpu"],
        "--device \"gpu\": expected cpu, cuda, cuda:N or cuda:N,M,…",
    );
    taef2_with(
        &["--reducing-gap", "0.5"],
        "--reducing-gap is 0 (always decode JPEGs at full size) or at least 1",
    );
    // The CPU build of ONNX Runtime has no CUDA provider: an error that says what to install,
    // never a silent run on the CPU.
    taef2_with(
        &["--device", "cuda:0"],
        "--device cuda:0: ONNX Runtime could not use its CUDA execution provider",
    );
    taef2_with(&["--device", "cuda"], "onnxruntime-gpu==1.31.1");

    let not_a_card = dir.join("bad.toml");
    std::fs::write(&not_a_card, "name = \"x\"\nencoder = 3\n").unwrap();
    run(
        &["--input", s(&input), "--model", s(&not_a_card)],
        "invalid model card",
    );
}

#[test]
fn missing_onnx_runtime_says_how_to_fix_it() {
    let dir = scratch("cli-ort");
    let input = kodak_subset(&dir, 1);
    let out = dir.join("out");
    let taef2 = card_file(&dir, "taef2");
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_vae-pipeline"))
        .args([
            "precompute",
            "--input",
            s(&input),
            "--out",
            s(&out),
            "--model",
            s(&taef2),
        ])
        .env("ORT_DYLIB_PATH", "/no/such/libonnxruntime.so")
        .output()
        .unwrap();
    let err = stderr(&result);
    assert!(!result.status.success());
    assert!(
        err.contains("ORT_DYLIB_PATH is set to /no/such/libonnxruntime.so")
            && err.contains("make setup"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "output created before the model loaded");
}

#[test]
fn output_folders_of_other_runs_are_refused_and_finished_runs_resume() {
    let dir = scratch("cli-out");
    let input = kodak_subset(&dir, 2);
    let out = dir.join("out");
    let taef2 = card_file(&dir, "taef2");
    let base = [
        "precompute",
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--model",
        s(&taef2),
        "--size",
        "64",
    ];
    let first = vae_pipeline(&base);
    assert!(first.status.success(), "{}", stderr(&first));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(summary["encoded"], 2);
    assert_eq!(
        summary["rows"], 2,
        "_SUCCESS counts the committed rows: {summary}"
    );
    assert_eq!(summary["buckets"]["64x64"], 2, "{summary}");

    let again = vae_pipeline(&base);
    let err = stderr(&again);
    assert!(
        again.status.success() && err.contains("encoded 0 images, 2 already committed"),
        "{err}"
    );

    fails_before_work_in(
        &[&base[..], &["--dtype", "f32"]].concat(),
        "holds shards made with different settings:\n  dtype: \"f16\" there, \"f32\" now",
    );
    let overwrite = vae_pipeline(&[&base[..], &["--dtype", "f32", "--overwrite"]].concat());
    assert!(overwrite.status.success(), "{}", stderr(&overwrite));
    assert_eq!(
        read_latents(&out).len(),
        2,
        "--overwrite replaced the f16 shards with f32 ones"
    );

    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let r = vae_pipeline(&[
        "precompute",
        "--input",
        s(&input),
        "--out",
        s(&foreign),
        "--model",
        s(&taef2),
        "--size",
        "64",
    ]);
    assert!(
        !r.status.success() && stderr(&r).contains("was not written by vae-pipeline"),
        "{}",
        stderr(&r)
    );
    assert_eq!(
        std::fs::read_dir(&foreign).unwrap().count(),
        1,
        "foreign folder was touched"
    );
}

fn fails_before_work_in(args: &[&str], expect: &str) {
    let r = vae_pipeline(args);
    assert!(
        !r.status.success() && stderr(&r).contains(expect),
        "{}",
        stderr(&r)
    );
}

/// Runs taef2 at 64² with f32 storage on 9 Kodak images and returns latents by key.
fn latents(dir: &Path, name: &str, extra: &[&str]) -> std::collections::BTreeMap<String, Vec<f32>> {
    let input = dir.join("input");
    let out = dir.join(name);
    let taef2 = dir.join("taef2.toml");
    let r = precompute_f32(&input, &out, &taef2, "64", extra);
    assert!(r.status.success(), "{}", stderr(&r));
    let rows = read_latents(&out);
    assert_eq!(rows.len(), 9, "every image encoded once");
    rows
}

fn assert_close(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
    tol: f32,
    what: &str,
) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: same keys"
    );
    for (k, v) in a {
        let d = max_abs_diff(v, &b[k]);
        assert!(d <= tol, "{what}: {k} differs by {d}");
    }
}

#[test]
fn latents_do_not_depend_on_batch_size_threads_or_the_run() {
    let dir = scratch("cli-invariance");
    kodak_subset(&dir, 9);
    card_file(&dir, "taef2");
    let reference = latents(&dir, "b16", &[]);
    assert_close(
        &reference,
        &latents(&dir, "b1", &["--batch-size", "1"]),
        1e-5,
        "batch 1 vs 16",
    );
    assert_close(
        &reference,
        &latents(&dir, "b7", &["--batch-size", "7", "--shard-rows", "4"]),
        1e-5,
        "batch 7 vs 16",
    );
    assert_close(
        &reference,
        &latents(&dir, "t1", &["--threads", "1"]),
        1e-5,
        "1 vs default threads",
    );
    assert_close(
        &reference,
        &latents(&dir, "t2", &["--threads", "2"]),
        1e-5,
        "2 vs default threads",
    );
    assert_eq!(
        reference,
        latents(&dir, "again", &[]),
        "two identical runs give identical latents"
    );
}

/// An fp16 encoder overflows when fed values above 65504: those images become `nonfinite`
/// error rows, the others are written, and the run succeeds.
#[test]
fn non_finite_latents_become_error_rows() {
    let dir = scratch("cli-nonfinite");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([10, 10, 10]))
        .save(input.join("dark.png"))
        .unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([250, 250, 250]))
        .save(input.join("bright.png"))
        .unwrap();
    let card = dir.join("overflow.toml");
    let text = std::fs::read_to_string(card_file(&dir, "taef2-fp16")).unwrap();
    std::fs::write(
        &card,
        text.replace("input_range = [0.0, 1.0]", "input_range = [0.0, 100000.0]"),
    )
    .unwrap();
    let out = dir.join("out");
    let r = precompute_f32(&input, &out, &card, "64", &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("1 failed (nonfinite 1"),
        "{}",
        stderr(&r)
    );
    let errors = std::fs::read_to_string(out.join("_errors.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!(line["key"], "bright.png");
    assert_eq!(line["kind"], "nonfinite");
    let rows = read_latents(&out);
    assert_eq!(rows.keys().collect::<Vec<_>>(), vec!["dark.png"]);
    assert!(rows["dark.png"].iter().all(|v| v.is_finite()));
}

/// A preset fills the config, flags override it, and --print-config shows the result as TOML
/// that reads back as a preset.
#[test]
fn preset_then_flags_make_the_effective_config() {
    let dir = scratch("cli-preset");
    let preset = repo().join("pipelines/sd15-512.toml");
    let r = vae_pipeline(&[
        "precompute",
        "--pipeline",
        s(&preset),
        "--size",
        "128",
        "--dtype",
        "bf16",
        "--print-config",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&r.stdout)).unwrap();
    assert_eq!(printed["model"].as_str(), Some("sd15"), "from the preset");
    assert_eq!(
        printed["batch_size"].as_integer(),
        Some(8),
        "from the preset"
    );
    assert_eq!(printed["device"].as_str(), Some("cpu"), "the default");
    assert_eq!(
        printed["size"].as_integer(),
        Some(128),
        "flag overrides preset"
    );
    assert_eq!(
        printed["dtype"].as_str(),
        Some("bf16"),
        "flag overrides preset"
    );
    let reread = dir.join("printed.toml");
    std::fs::write(&reread, &r.stdout).unwrap();
    let again = vae_pipeline(&["precompute", "--pipeline", s(&reread), "--print-config"]);
    assert_eq!(
        again.stdout, r.stdout,
        "printed config reads back unchanged"
    );

    // Paths in a preset are relative to it; URLs and patterns' folders are kept as written.
    let urls = dir.join("urls.toml");
    std::fs::write(
        &urls,
        "input = \"s3://bucket/shards/{00000..00009}.tar\"\nimage_column = \"jpg\"\n",
    )
    .unwrap();
    let r = vae_pipeline(&["precompute", "--pipeline", s(&urls), "--print-config"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&r.stdout)).unwrap();
    assert_eq!(
        printed["input"].as_str(),
        Some("s3://bucket/shards/{00000..00009}.tar")
    );
    assert_eq!(printed["image_column"].as_str(), Some("jpg"));

    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "sise = 256\n").unwrap();
    let bad = vae_pipeline(&["precompute", "--pipeline", s(&typo), "--print-config"]);
    assert!(
        !bad.status.success() && stderr(&bad).contains("unknown field `sise`"),
        "{}",
        stderr(&bad)
    );
}

/// `bench-encoder` reports one JSON line with two measurements: the encoder alone (input
/// resident, whole batches per session) and the encode stage's host path (every image asked for).
#[test]
fn bench_encoder_reports_encoder_only_and_host_path_throughput() {
    let dir = scratch("cli-bench-encoder");
    let avgpool = card_file(&dir, "avgpool8");
    let r = vae_pipeline(&[
        "bench-encoder",
        "--model",
        s(&avgpool),
        "--size",
        "64",
        "--batch-size",
        "3",
        "--images",
        "7",
        "--threads",
        "1",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let line: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(line["images"], 7);
    assert_eq!(line["batch_size"], 3);
    assert_eq!(line["device"], "cpu");
    assert_eq!(line["input"], "float32");
    assert_eq!(line["encoder_images"], 9, "three whole batches of 3");
    assert!(line["images_per_second"].as_f64().unwrap() > 0.0, "{line}");
    assert!(
        line["encoder_images_per_second"].as_f64().unwrap() > 0.0,
        "{line}"
    );
}
