//! The contract between a run and its output folder (issue "One shard contract, one run plan"):
//! resumes with any run settings verify, one writer at a time, lossless keys, a graceful stop, a
//! refused run writes nothing, captions and metadata are data, bucket files by content.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn verify(out: &Path) -> (bool, String) {
    let v = vae_pipeline(&["verify", s(out)]);
    (
        v.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        ),
    )
}

fn ok(out: &std::process::Output) -> String {
    let err = stderr(out);
    assert!(out.status.success(), "{err}");
    err
}

/// Ordinary resumes with other run settings (batch size, threads, shard rows, a moved --out)
/// keep one schema per folder: `verify` says ok after each.
#[test]
fn resumes_with_other_run_settings_verify() {
    let dir = scratch("contract-run-settings");
    let input = dir.join("input");
    let card = card_file(&dir, "avgpool8");
    copy_kodak(
        &input,
        &["kodim01", "kodim02", "kodim03", "kodim04", "kodim05"],
    );
    let out = dir.join("out");
    ok(&precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &["--shard-rows", "2"],
    ));
    copy_kodak(&input, &["kodim06", "kodim07"]);
    let err = ok(&precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &["--batch-size", "8", "--threads", "1", "--shard-rows", "3"],
    ));
    assert!(
        err.contains("encoded 2 images, 5 already committed"),
        "{err}"
    );
    let (good, text) = verify(&out);
    assert!(
        good,
        "verify after a resume with other run settings: {text}"
    );

    // Moving the output (and running from another working directory) is not a new identity.
    let moved = dir.join("moved");
    std::fs::rename(&out, &moved).unwrap();
    copy_kodak(&input, &["kodim08"]);
    let err = ok(&precompute_f32(
        &input,
        &moved,
        &card,
        "64",
        &["--threads", "2"],
    ));
    assert!(
        err.contains("encoded 1 images, 7 already committed"),
        "{err}"
    );
    let (good, text) = verify(&moved);
    assert!(good, "{text}");
    let runs = std::fs::read_to_string(moved.join("_runs.jsonl")).unwrap();
    assert_eq!(runs.lines().count(), 3, "one line per run: {runs}");
    assert!(runs.contains("\"batch_size\":8"), "{runs}");
}

/// A second run on the same --out while one is writing is refused and names the holder; once
/// the holder is killed with -9 the lock is gone and a rerun completes the set.
#[test]
fn a_second_writer_is_refused_and_kill_9_leaves_no_lock() {
    let dir = scratch("contract-lock");
    let input = kodak_subset(&dir, 24);
    let out = dir.join("out");
    let card = card_file(&dir, "taef2");
    let run = |extra: &[&str]| precompute_command(&input, &out, &card, "256", extra);
    let mut first = run(&["--shard-rows", "4", "--threads", "1"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        || out.join("_runs.jsonl").exists(),
        "the first run to start writing",
    );
    let second = run(&["--shard-rows", "4"]).output().unwrap();
    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is being written by another vae-pipeline run")
            && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    // Nothing of the second run was written.
    assert_eq!(
        std::fs::read_to_string(out.join("_runs.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let rerun = run(&["--shard-rows", "4"]).output().unwrap();
    ok(&rerun);
    let (good, text) = verify(&out);
    assert!(good, "{text}");
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "waited too long for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// File names that are not UTF-8 get distinct, reversible keys: three files, three rows; a
/// rerun keeps all three; `report --shards` finds their sources again.
#[test]
fn non_utf8_file_names_get_distinct_keys() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("contract-non-utf8");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let names: [&[u8]; 3] = [b"x\xff.png", b"x\xfe.png", "x\u{fffd}.png".as_bytes()];
    for (name, photo) in names.iter().zip(["kodim01", "kodim02", "kodim03"]) {
        std::fs::copy(
            shared(&format!("data/kodak/{photo}.png")),
            input.join(std::ffi::OsStr::from_bytes(name)),
        )
        .unwrap();
    }
    let out = dir.join("out");
    let card = card_file(&dir, "taef2");
    ok(&precompute_f32(&input, &out, &card, "64", &[]));
    let keys: Vec<String> = read_latents(&out).into_keys().collect();
    assert_eq!(keys, vec!["x%FE.png", "x%FF.png", "x\u{fffd}.png"]);
    let err = ok(&precompute_f32(&input, &out, &card, "64", &[]));
    assert!(
        err.contains("encoded 0 images, 3 already committed, 0 stale rows pruned"),
        "{err}"
    );
    assert_eq!(read_latents(&out).len(), 3);
    let errors = std::fs::read_to_string(out.join("_errors.jsonl")).unwrap();
    assert!(errors.is_empty(), "{errors}");
}

/// A refused run writes nothing: a bad --buckets path leaves no --out behind, so the corrected
/// command runs.
#[test]
fn a_refused_run_writes_nothing() {
    let dir = scratch("contract-refused");
    let input = kodak_subset(&dir, 2);
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    let bad = precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &[
            "--resize",
            "bucket",
            "--buckets",
            s(&dir.join("missing.txt")),
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("--buckets"), "{}", stderr(&bad));
    assert!(!out.exists(), "a refused run created {}", out.display());
    let bad = precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &["--captions", s(&dir.join("no.csv"))],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(!out.exists());
    ok(&precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &["--resize", "bucket"],
    ));
}

/// The refusal of a different identity says which settings differ; editing a bucket file in
/// place is a new identity.
#[test]
fn identity_changes_are_named_and_bucket_files_count_by_content() {
    let dir = scratch("contract-identity");
    let input = kodak_subset(&dir, 2);
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    let buckets = dir.join("buckets.txt");
    std::fs::write(&buckets, "96x64\n64x96\n64x64\n").unwrap();
    let args = ["--resize", "bucket", "--buckets", s(&buckets)];
    ok(&precompute_f32(&input, &out, &card, "64", &args));
    std::fs::write(&buckets, "128x64\n64x128\n64x64\n").unwrap();
    let edited = precompute_f32(&input, &out, &card, "64", &args);
    let err = stderr(&edited);
    assert_eq!(edited.status.code(), Some(2), "{err}");
    assert!(
        err.contains("framing.buckets: [[64, 64], [64, 96], [96, 64]] there, [[64, 64], [64, 128], [128, 64]] now"),
        "{err}"
    );
    let other = precompute_f32(&input, &out, &card, "128", &args);
    let err = stderr(&other);
    assert!(err.contains("framing.size: 64 there, 128 now"), "{err}");
    ok(&precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &[&args[..], &["--overwrite"]].concat(),
    ));
    assert!(read_latents(&out).len() == 2);
}

/// Captions and JSON metadata are data: after an edit beside unchanged image bytes, a rerun
/// brings just those rows up to date.
#[test]
fn edited_captions_and_sidecars_update_their_rows() {
    let dir = scratch("contract-captions");
    let input = dir.join("input");
    copy_kodak(&input, &["kodim01", "kodim02", "kodim03"]);
    std::fs::write(input.join("kodim01.txt"), "a red door").unwrap();
    std::fs::write(input.join("kodim02.json"), r#"{"score": 5}"#).unwrap();
    let captions = dir.join("captions.csv");
    std::fs::write(&captions, "key,caption\nkodim03.png,parrots\n").unwrap();
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    let args = ["--captions", s(&captions)];
    ok(&precompute_f32(&input, &out, &card, "64", &args));

    std::fs::write(input.join("kodim01.txt"), "a blue door").unwrap();
    std::fs::write(input.join("kodim02.json"), r#"{"score": 6}"#).unwrap();
    std::fs::write(&captions, "key,caption\nkodim03.png,two parrots\n").unwrap();
    let err = ok(&precompute_f32(&input, &out, &card, "64", &args));
    assert!(
        err.contains("encoded 3 images, 0 already committed, 3 stale rows pruned"),
        "{err}"
    );
    let rows = read_rows(&out, "latent");
    assert_eq!(rows["kodim01.png"].1.as_deref(), Some("a blue door"));
    assert_eq!(rows["kodim03.png"].1.as_deref(), Some("two parrots"));
    let score = python_column(&out, "score");
    assert_eq!(score, "[None, 6, None]", "{score}");

    let err = ok(&precompute_f32(&input, &out, &card, "64", &args));
    assert!(
        err.contains("encoded 0 images, 3 already committed"),
        "{err}"
    );
    let (good, text) = verify(&out);
    assert!(good, "{text}");
}

/// A column of the set, sorted by key, as pyarrow prints it.
fn python_column(out: &Path, column: &str) -> String {
    let script = format!(
        "import glob, pyarrow.parquet as pq, pyarrow as pa\n\
         t = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob('{}/*/*.parquet'))).sort_by('key')\n\
         print(t.column('{column}').to_pylist())",
        out.display()
    );
    let r = Command::new(python())
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

/// `--dedupe` duplicates are not failures: 1 duplicate of 4 passes `--max-failures 0`, and the
/// summary counts the rows.
#[test]
fn dedupe_duplicates_are_not_failures() {
    let dir = scratch("contract-dedupe");
    let input = dir.join("input");
    copy_kodak(&input, &["kodim01", "kodim02", "kodim03"]);
    std::fs::copy(input.join("kodim01.png"), input.join("kodim09.png")).unwrap();
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    let err = ok(&precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &["--dedupe", "--max-failures", "0"],
    ));
    assert!(
        err.contains("encoded 3 images, 1 duplicates (--dedupe), 0 failed; 3 rows in 1 shard(s)"),
        "{err}"
    );
}

/// Inputs with nothing to encode fail: no images at all, or none that decodes.
#[test]
fn a_run_with_no_rows_is_not_a_success() {
    let dir = scratch("contract-empty");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("notes.txt"), "no images here").unwrap();
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    let empty = precompute_f32(&input, &out, &card, "64", &[]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(
        stderr(&empty).contains("holds no images"),
        "{}",
        stderr(&empty)
    );
    assert!(!out.exists());
    std::fs::write(input.join("broken.png"), b"not a png").unwrap();
    let broken = precompute_f32(&input, &out, &card, "64", &[]);
    assert_eq!(broken.status.code(), Some(2));
    assert!(stderr(&broken).contains("no rows"), "{}", stderr(&broken));
    assert!(!out.join("_SUCCESS").exists());
}

/// A batch too large for memory is a configuration error, not an allocation abort.
#[test]
fn a_huge_batch_size_is_refused_before_work() {
    let dir = scratch("contract-batch");
    let input = kodak_subset(&dir, 1);
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    let r = precompute_f32(&input, &out, &card, "256", &["--batch-size", "100000"]);
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--batch-size 100000 needs") && err.contains("use a batch size of at most"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A source that cannot be read now keeps its committed row and gets an `io` line.
#[test]
fn an_unreadable_source_keeps_its_row() {
    let dir = scratch("contract-unreadable");
    let input = dir.join("input");
    copy_kodak(&input, &["kodim01", "kodim02", "kodim03"]);
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    ok(&precompute_f32(&input, &out, &card, "64", &[]));
    let saved = dir.join("kodim02.png");
    std::fs::rename(input.join("kodim02.png"), &saved).unwrap();
    // A symlink to itself: the name is there, but it cannot be opened (ELOOP), as on a flaky mount.
    std::os::unix::fs::symlink("kodim02.png", input.join("kodim02.png")).unwrap();
    let err = ok(&precompute_f32(&input, &out, &card, "64", &[]));
    assert!(
        err.contains("2 already committed, 0 stale rows pruned"),
        "{err}"
    );
    assert!(err.contains("1 failed (io 1"), "{err}");
    assert_eq!(read_latents(&out).len(), 3);
    let errors = std::fs::read_to_string(out.join("_errors.jsonl")).unwrap();
    assert!(errors.contains("its committed row is kept"), "{errors}");
    std::fs::remove_file(input.join("kodim02.png")).unwrap();
    std::fs::rename(&saved, input.join("kodim02.png")).unwrap();
    let err = ok(&precompute_f32(&input, &out, &card, "64", &[]));
    assert!(
        err.contains("encoded 0 images, 3 already committed"),
        "{err}"
    );
}

/// SIGTERM (and SIGINT, SIGUSR1) stop taking images, commit what is in flight and exit 2 with
/// "rerun"; the rerun completes the set exactly. A repeat within 2 s is the same request.
#[test]
fn a_signal_stops_gracefully_and_the_rerun_completes() {
    let dir = scratch("contract-signal");
    let input = kodak_subset(&dir, 24);
    let out = dir.join("out");
    let card = card_file(&dir, "taef2");
    let run = |out: &Path| {
        let extra = [
            "--dtype",
            "f32",
            "--shard-rows",
            "1000",
            "--batch-size",
            "2",
        ];
        precompute_command(&input, out, &card, "256", &extra)
    };
    for signal in ["TERM", "USR1"] {
        let _ = std::fs::remove_dir_all(&out);
        let child = run(&out).stderr(Stdio::piped()).spawn().unwrap();
        wait_for(|| out.join("_runs.jsonl").exists(), "the run to start");
        std::thread::sleep(Duration::from_millis(1500));
        let kill = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let done = child.wait_with_output().unwrap();
        let err = stderr(&done);
        assert_eq!(done.status.code(), Some(2), "SIG{signal}: {err}");
        assert!(
            err.contains("interrupted") && err.contains("Rerun the same command"),
            "{err}"
        );
        let committed = read_latents(&out).len();
        assert!(
            committed > 0 && committed < 24,
            "SIG{signal}: the open shard ({committed} rows) is committed, not everything ran"
        );
        assert!(!out.join("_SUCCESS").exists());
        let rerun = run(&out).output().unwrap();
        let err = ok(&rerun);
        assert!(
            err.contains(&format!("{committed} already committed")),
            "{err}"
        );
        let (good, text) = verify(&out);
        assert!(good, "{text}");
    }
    let fresh = dir.join("fresh");
    ok(&run(&fresh).output().unwrap());
    let (resumed, expected) = (read_latents(&out), read_latents(&fresh));
    assert_eq!(resumed.len(), 24);
    for (key, latent) in &expected {
        assert!(max_abs_diff(latent, &resumed[key]) <= 1e-5, "{key}");
    }

    // Two signals 50 ms apart (as `scancel` gives a worker under an sbatch script that forwards
    // its own): one request, so what is in flight is still committed.
    let _ = std::fs::remove_dir_all(&out);
    let child = run(&out).stderr(Stdio::null()).spawn().unwrap();
    wait_for(|| out.join("_runs.jsonl").exists(), "the run to start");
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(
        status.code(),
        Some(2),
        "a repeated SIGINT within 2 s is the same request"
    );
    let (good, text) = verify(&out);
    assert!(!good && text.contains("_SUCCESS is missing"), "{text}");
    ok(&run(&out).output().unwrap());
    let (good, text) = verify(&out);
    assert!(good, "{text}");
}

/// Preset paths are relative to the preset, and a bad preset value is named as the preset's key.
#[test]
fn presets_anchor_paths_and_name_their_keys() {
    let dir = scratch("contract-preset");
    let presets = dir.join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    kodak_subset(&presets, 2);
    let card = card_file(&presets, "avgpool8");
    std::fs::write(
        presets.join("job.toml"),
        "input = \"input\"\nout = \"shards\"\nmodel = \"avgpool8.toml\"\nsize = 64\n",
    )
    .unwrap();
    let elsewhere = scratch("contract-preset-cwd");
    let run = Command::new(env!("CARGO_BIN_EXE_vae-pipeline"))
        .args(["precompute", "--pipeline", s(&presets.join("job.toml"))])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    ok(&run);
    assert!(presets.join("shards/_SUCCESS").exists());
    assert!(card.exists());
    std::fs::write(
        presets.join("bad.toml"),
        "input = \"input\"\nout = \"shards2\"\nmodel = \"avgpool8.toml\"\nmax_failures = 2.0\n",
    )
    .unwrap();
    let bad = vae_pipeline(&["precompute", "--pipeline", s(&presets.join("bad.toml"))]);
    let err = stderr(&bad);
    assert_eq!(bad.status.code(), Some(2));
    assert!(err.contains("`max_failures` in preset"), "{err}");
    let flag = vae_pipeline(&[
        "precompute",
        "--pipeline",
        s(&presets.join("bad.toml")),
        "--max-failures",
        "3",
    ]);
    assert!(
        stderr(&flag).contains("--max-failures is a fraction"),
        "{}",
        stderr(&flag)
    );
}

/// `inspect | head -1` and `verify | head -1` end quietly, not with a panic.
#[test]
fn closed_pipes_are_not_panics() {
    let dir = scratch("contract-pipe");
    let input = kodak_subset(&dir, 2);
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    ok(&precompute_f32(&input, &out, &card, "64", &[]));
    for command in ["inspect", "verify"] {
        let r = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; '{}' {command} '{}' | head -c 1 >/dev/null",
                env!("CARGO_BIN_EXE_vae-pipeline"),
                s(&out)
            ))
            .output()
            .unwrap();
        let err = stderr(&r);
        assert!(!err.contains("panicked"), "{command}: {err}");
        assert!(r.status.success(), "{command}: {err}");
    }
}

/// `verify` reads past a corrupt shard (and reports it), reads shards other writers
/// compressed with snappy, and refuses foreign files in shard folders.
#[test]
fn verify_checks_every_shard_and_only_shards() {
    let dir = scratch("contract-verify");
    let input = kodak_subset(&dir, 4);
    let out = dir.join("out");
    let card = card_file(&dir, "avgpool8");
    ok(&precompute_f32(
        &input,
        &out,
        &card,
        "64",
        &["--shard-rows", "1"],
    ));
    let folder = out.join("64x64");
    // Rewritten by pyarrow with snappy: still our rows and metadata.
    let part0 = folder.join("part-00000.parquet");
    let r = Command::new(python())
        .arg("-c")
        .arg(format!(
            "import pyarrow.parquet as pq; t = pq.read_table('{p}'); \
             pq.write_table(t, '{p}', compression='snappy')",
            p = part0.display()
        ))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    let (good, text) = verify(&out);
    assert!(good, "a snappy shard with the same rows is fine: {text}");

    std::fs::copy(&part0, folder.join("zz.parquet")).unwrap();
    let (good, text) = verify(&out);
    assert!(
        !good && text.contains("zz.parquet: not a shard file"),
        "{text}"
    );
    std::fs::remove_file(folder.join("zz.parquet")).unwrap();

    let part1 = folder.join("part-00001.parquet");
    let bytes = std::fs::read(&part1).unwrap();
    std::fs::write(&part1, &bytes[..bytes.len() - 20]).unwrap();
    let (good, text) = verify(&out);
    assert!(!good, "{text}");
    assert!(text.contains("64x64/part-00001.parquet:"), "{text}");
    assert!(
        text.contains("FAILED") && text.contains("(3 rows in 4 shards read)"),
        "{text}"
    );
}

/// `report --shards` on a bucketed set gives what `report --input` gives with the same buckets.
#[test]
fn report_on_bucketed_shards_equals_report_on_images() {
    let dir = scratch("contract-report-buckets");
    let input = kodak_subset(&dir, 4);
    let out = dir.join("out");
    let card = card_file(&dir, "taef2");
    let with_decoder = dir.join("taef2-dec.toml");
    std::fs::write(
        &with_decoder,
        format!(
            "{}decoder = \"{}\"\n",
            std::fs::read_to_string(&card).unwrap(),
            shared("models/taef2_decoder.onnx").display()
        ),
    )
    .unwrap();
    ok(&precompute_f32(
        &input,
        &out,
        &with_decoder,
        "256",
        &["--resize", "bucket"],
    ));
    let from_shards = dir.join("report-shards");
    let r = vae_pipeline(&[
        "report",
        "--shards",
        s(&out),
        "--input",
        s(&input),
        "--model",
        s(&with_decoder),
        "--out",
        s(&from_shards),
        "--limit",
        "0",
    ]);
    ok(&r);
    let from_images = dir.join("report-images");
    let r = vae_pipeline(&[
        "report",
        "--input",
        s(&input),
        "--model",
        s(&with_decoder),
        "--size",
        "256",
        "--resize",
        "bucket",
        "--out",
        s(&from_images),
    ]);
    ok(&r);
    let psnr = |d: &PathBuf| {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                .unwrap();
        let m = &summary["models"]["taef2"];
        (
            m["images"].as_u64().unwrap(),
            m["psnr_mean"].as_f64().unwrap(),
        )
    };
    let (a, b) = (psnr(&from_shards), psnr(&from_images));
    assert_eq!(a.0, 4);
    assert_eq!(a.0, b.0);
    assert!((a.1 - b.1).abs() < 1e-3, "shards {a:?} vs images {b:?}");
    let buckets = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(
        buckets, 2,
        "landscape and portrait photos land in two buckets"
    );
}

/// The unknown-model message lists each folder it searched once.
#[test]
fn an_unknown_model_lists_each_card_folder_once() {
    let dir = scratch("contract-unknown-model");
    let input = kodak_subset(&dir, 1);
    let r = vae_pipeline(&[
        "precompute",
        "--input",
        s(&input),
        "--out",
        s(&dir.join("out")),
        "--model",
        "no-such-model",
    ]);
    let err = stderr(&r);
    let listed = err
        .split("no no-such-model.toml in ")
        .nth(1)
        .and_then(|rest| rest.split(". Known cards").next())
        .unwrap_or_else(|| panic!("{err}"));
    let folders: Vec<PathBuf> = listed
        .split(", ")
        .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| PathBuf::from(f)))
        .collect();
    let unique: std::collections::BTreeSet<_> = folders.iter().collect();
    assert_eq!(unique.len(), folders.len(), "{listed}");
}
