//! Resume and guards: a rerun skips committed rows, re-encodes changed sources and drops stale
//! rows, and ends with the same set a fresh run over the final folder gives.

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn precompute(input: &Path, out: &Path, card: &Path) -> std::process::Output {
    precompute_f32(input, out, card, "64", &["--shard-rows", "2"])
}

#[test]
fn changed_and_removed_sources_are_re_encoded_and_pruned() {
    let dir = scratch("resume-content");
    let input = dir.join("input");
    let out = dir.join("out");
    let card = card_file(&dir, "taef2");
    copy_kodak(&input, &["kodim01", "kodim02", "kodim03", "kodim04"]);
    let first = precompute(&input, &out, &card);
    assert!(first.status.success(), "{}", stderr(&first));

    // kodim02's bytes change (another photo), kodim04 is deleted.
    std::fs::copy(shared("data/kodak/kodim05.png"), input.join("kodim02.png")).unwrap();
    std::fs::remove_file(input.join("kodim04.png")).unwrap();
    let again = precompute(&input, &out, &card);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert!(
        err.contains("encoded 1 images, 2 already committed, 2 stale rows pruned"),
        "{err}"
    );
    assert!(err.contains("3 rows in"), "{err}");

    let fresh_out = dir.join("fresh");
    let fresh = precompute(&input, &fresh_out, &card);
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    let (resumed, expected) = (read_latents(&out), read_latents(&fresh_out));
    assert_eq!(
        resumed.keys().collect::<Vec<_>>(),
        vec!["kodim01.png", "kodim02.png", "kodim03.png"]
    );
    for (key, latent) in &expected {
        assert!(
            max_abs_diff(latent, &resumed[key]) <= 1e-5,
            "{key}: resumed set differs from a fresh run"
        );
    }
    let manifest = std::fs::read_to_string(out.join("_manifest.jsonl")).unwrap();
    let rows: i64 = manifest
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["rows"]
                .as_i64()
                .unwrap()
        })
        .sum();
    assert_eq!(rows, 3, "manifest counts the pruned shards: {manifest}");
}

/// A file-size limit (RLIMIT_FSIZE) makes shard writes fail with EFBIG, as a full disk does:
/// the run fails with a clear message, leaves no partial shard, and a rerun completes.
#[test]
fn a_failed_write_leaves_nothing_partial_and_resume_completes() {
    let dir = scratch("resume-disk-full");
    let input = dir.join("input");
    let out = dir.join("out");
    let card = card_file(&dir, "taef2");
    copy_kodak(
        &input,
        &["kodim01", "kodim02", "kodim03", "kodim04", "kodim05"],
    );
    let limited = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 12; exec '{}' precompute --input '{}' --out '{}' --model '{}' --size 64 --dtype f32 --shard-rows 2",
            env!("CARGO_BIN_EXE_vae-pipeline"),
            s(&input),
            s(&out),
            s(&card)
        ))
        .output()
        .unwrap();
    let err = stderr(&limited);
    assert!(
        !limited.status.success(),
        "the write must fail under a 12 KiB file limit: {err}"
    );
    assert!(
        err.contains("disk full?") && err.contains("rerun the same command"),
        "{err}"
    );
    for entry in walkdir::WalkDir::new(&out) {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "partial file {name} left behind");
    }
    assert!(!out.join("_SUCCESS").exists());

    let resumed = precompute(&input, &out, &card);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(read_latents(&out).len(), 5);
}
