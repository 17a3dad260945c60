//! Shared test material: `../shared` (must exist: CI fails, never skips, without it), model
//! cards that point straight at its ONNX files, the binary, and a Parquet reader for shards.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow_array::{Array, FixedSizeListArray, Float32Array, StringArray};
use vae_pipeline::batch::RowMeta;
use vae_pipeline::model::ModelCard;

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under `../shared`, which the tests need; a clear failure when it is missing.
pub fn shared(rel: &str) -> PathBuf {
    let path = repo().join("..").join("shared").join(rel);
    assert!(
        path.exists(),
        "test material {} is missing: the tests need ../shared beside the repo",
        path.display()
    );
    path
}

/// A scratch folder under `target/`, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo().join("target").join("test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a card for a shared model into `dir` and returns its path.
pub fn card_file(dir: &Path, model: &str) -> PathBuf {
    let m = |f: &str| shared(&format!("models/{f}")).display().to_string();
    let body = match model {
        "taef2" => format!(
            "name = \"taef2\"\nencoder = \"{}\"\ninput_range = [0.0, 1.0]\noutput = \"latent\"\nlatent_channels = 32\nspatial_factor = 8\nscaling_factor = 1.0\n",
            m("taef2_encoder.onnx")
        ),
        "taef2-fp16" => format!(
            "name = \"taef2-fp16\"\nencoder = \"{}\"\ninput_range = [0.0, 1.0]\noutput = \"latent\"\nlatent_channels = 32\nspatial_factor = 8\nscaling_factor = 1.0\n",
            m("taef2_encoder_fp16.onnx")
        ),
        "tiny-kl" => format!(
            "name = \"tiny-kl\"\nencoder = \"{}\"\ninput_range = [-1.0, 1.0]\noutput = \"moments\"\nlatent_channels = 4\nspatial_factor = 2\nscaling_factor = 0.18215\n",
            m("tiny_kl_encoder.onnx")
        ),
        "avgpool8" => format!(
            "name = \"avgpool8\"\nencoder = \"{}\"\ninput_range = [0.0, 1.0]\noutput = \"latent\"\nlatent_channels = 4\nspatial_factor = 8\nscaling_factor = 1.0\n",
            m("avgpool8_encoder.onnx")
        ),
        other => panic!("no test card for {other}"),
    };
    let path = dir.join(format!("{model}.toml"));
    std::fs::write(&path, body).unwrap();
    path
}

pub fn card(dir: &Path, model: &str) -> ModelCard {
    ModelCard::load(&card_file(dir, model)).unwrap()
}

/// Reads a `.npy` file as a flat f32 vector plus its shape.
pub fn npy_f32(rel: &str) -> (Vec<usize>, Vec<f32>) {
    let a: ndarray::ArrayD<f32> = ndarray_npy::read_npy(shared(rel)).unwrap();
    (a.shape().to_vec(), a.iter().copied().collect())
}

pub fn npy_u8(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let a: ndarray::ArrayD<u8> = ndarray_npy::read_npy(path).unwrap();
    (a.shape().to_vec(), a.iter().copied().collect())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the binary with the repo's ONNX Runtime library (as `make` sets it up).
pub fn vae_pipeline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vae-pipeline"))
        .args(args)
        .output()
        .expect("binary runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The Python of the test venv (Pillow, pyarrow): `VAE_PIPELINE_PYTHON` or `.venv/bin/python`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("VAE_PIPELINE_PYTHON")
        .map_or_else(|| repo().join(".venv/bin/python"), PathBuf::from);
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p
}

/// A row of a shard set: the f32 values of one tensor column (None when the shard lacks it)
/// and the caption.
pub type Row = (Option<Vec<f32>>, Option<String>);

/// Every row of a shard set (written with `--dtype f32`) by key; a key seen twice fails.
pub fn read_rows(out: &Path, tensor: &str) -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for entry in walk_parquet(out) {
        let file = std::fs::File::open(&entry).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let strings = |name: &str| {
                let column = batch.column_by_name(name).unwrap();
                column
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let (keys, captions) = (strings("key"), strings("caption"));
            let values = batch.column_by_name(tensor).map(|c| {
                c.as_any()
                    .downcast_ref::<FixedSizeListArray>()
                    .unwrap()
                    .clone()
            });
            for i in 0..batch.num_rows() {
                let v = values.as_ref().map(|l| {
                    let item = l.value(i);
                    let floats = item.as_any().downcast_ref::<Float32Array>();
                    floats.expect("f32 latents").values().to_vec()
                });
                let caption = captions.is_valid(i).then(|| captions.value(i).to_string());
                let key = keys.value(i).to_string();
                assert!(
                    rows.insert(key, (v, caption)).is_none(),
                    "duplicate key {}",
                    keys.value(i)
                );
            }
        }
    }
    rows
}

/// Every f32 latent in a shard set, by key.
pub fn read_latents(out: &Path) -> BTreeMap<String, Vec<f32>> {
    read_rows(out, "latent")
        .into_iter()
        .map(|(k, (v, _))| (k, v.expect("a latent column")))
        .collect()
}

fn walk_parquet(out: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(out).unwrap().flatten() {
        if dir.path().is_dir() {
            for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
                if f.path().extension().is_some_and(|e| e == "parquet") {
                    files.push(f.path());
                }
            }
        }
    }
    files.sort();
    files
}

/// Copies Kodak photos (`kodim01`, …) into `input` as PNG files.
pub fn copy_kodak(input: &Path, names: &[&str]) {
    std::fs::create_dir_all(input).unwrap();
    for n in names {
        std::fs::copy(
            shared(&format!("data/kodak/{n}.png")),
            input.join(format!("{n}.png")),
        )
        .unwrap();
    }
}

/// A folder with the first `n` Kodak images (symlinked).
pub fn kodak_subset(dir: &Path, n: usize) -> PathBuf {
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    for i in 1..=n {
        let name = format!("kodim{i:02}.png");
        std::os::unix::fs::symlink(shared(&format!("data/kodak/{name}")), input.join(&name))
            .unwrap();
    }
    input
}

/// The binary's `precompute` of `input` into `out` with `card` at `size`², then `extra` flags,
/// as a command to run or spawn.
pub fn precompute_command(
    input: &Path,
    out: &Path,
    card: &Path,
    size: &str,
    extra: &[&str],
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vae-pipeline"));
    command
        .args(["precompute", "--input", s(input), "--out", s(out)])
        .args(["--model", s(card), "--size", size])
        .args(extra);
    command
}

/// `precompute` of `input` into `out` with `card` at `size`² and f32 storage (the tests' usual
/// run), then `extra` flags.
pub fn precompute_f32(input: &Path, out: &Path, card: &Path, size: &str, extra: &[&str]) -> Output {
    precompute_command(
        input,
        out,
        card,
        size,
        &[&["--dtype", "f32"], extra].concat(),
    )
    .output()
    .expect("binary runs")
}

/// Row metadata for a hand-built batch: only the key matters.
pub fn row(key: &str) -> RowMeta {
    RowMeta {
        key: key.into(),
        source_sha256: [0; 32],
        orig_width: 0,
        orig_height: 0,
        crop_top: 0,
        crop_left: 0,
        width: 0,
        height: 0,
        caption: None,
        extra: Vec::new(),
        window: None,
    }
}
