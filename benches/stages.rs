//! Per-stage criterion benchmarks: decode+resize per image (JPEG, PNG, WebP), batch assembly,
//! Parquet writing, and the ONNX Runtime call overhead with the cost-free `avgpool8` encoder.
//! `cargo bench --bench stages` measures; `cargo test --release` runs each once as a smoke
//! test (criterion's test mode). Inputs are the shared Kodak photos; ORT comes from `.ort/`.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use image::ImageEncoder;
use vae_pipeline::batch::{Batcher, RowMeta, RowPixels};
use vae_pipeline::config::{LatentMode, StorageDType};
use vae_pipeline::decode::{decode_bytes_toward, DecodeOptions};
use vae_pipeline::encode::{EncodedBatch, Encoder};
use vae_pipeline::format::{ShardMetadata, TensorColumns, FORMAT_VERSION};
use vae_pipeline::model::ModelCard;
use vae_pipeline::resize::{prepare, Framing, Prepared};
use vae_pipeline::write::ShardWriter;

const SIZE: u32 = 256;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kodak_png() -> Vec<u8> {
    let path = repo().join("../shared/data/kodak/kodim03.png");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the shared Kodak set)", path.display()))
}

/// q90 4:2:0, as cameras and most datasets store photos.
fn jpeg(rgb: &image::RgbImage) -> Vec<u8> {
    let (w, h) = rgb.dimensions();
    let image = turbojpeg::Image {
        pixels: rgb.as_raw().as_slice(),
        width: w as usize,
        pitch: 3 * w as usize,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2)
        .unwrap()
        .to_vec()
}

/// kodim03 as JPEG, PNG and lossless WebP.
fn encodings() -> Vec<(&'static str, Vec<u8>)> {
    let png = kodak_png();
    let rgb = image::load_from_memory(&png).unwrap().into_rgb8();
    let (w, h) = rgb.dimensions();
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .write_image(rgb.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    vec![("jpeg", jpeg(&rgb)), ("png", png), ("webp", webp)]
}

fn decode_resize(bytes: &[u8], framing: &Framing) -> Prepared {
    let hint = |w, h| framing.geometry("bench", w, h).map(|g| g.resized);
    let (rgb, (w, h)) = decode_bytes_toward(bytes, &DecodeOptions::default(), Some(&hint)).unwrap();
    prepare(rgb, framing.geometry("bench", w, h).unwrap()).unwrap()
}

fn decode_and_resize(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode+resize 768x512 -> 256");
    group.throughput(Throughput::Elements(1));
    let framing = Framing::center_crop(SIZE);
    for (format, bytes) in encodings() {
        group.bench_function(format, |b| {
            b.iter(|| decode_resize(black_box(&bytes), &framing))
        });
    }
    // A camera-sized JPEG (upscaled 4×), where the reduced DCT scale pays off.
    let big = {
        let rgb = image::load_from_memory(&kodak_png()).unwrap().into_rgb8();
        jpeg(&image::imageops::resize(
            &rgb,
            3072,
            2048,
            image::imageops::FilterType::Triangle,
        ))
    };
    group.bench_function("jpeg 3072x2048", |b| {
        b.iter(|| decode_resize(black_box(&big), &framing))
    });
    group.finish();
}

fn meta(i: usize) -> RowMeta {
    RowMeta {
        key: format!("image-{i:06}.jpg"),
        source_sha256: [i as u8; 32],
        orig_width: 768,
        orig_height: 512,
        crop_top: 0,
        crop_left: 64,
        width: SIZE as i32,
        height: SIZE as i32,
        caption: None,
        extra: Vec::new(),
        window: None,
    }
}

fn batch_assembly(c: &mut Criterion) {
    let framing = Framing::center_crop(SIZE);
    let image = decode_resize(&kodak_png(), &framing);
    let mut group = c.benchmark_group("batch assembly");
    group.throughput(Throughput::Elements(16));
    // The batcher takes its images by value; the clone (a pooled u8 copy) is in the time.
    for (name, f16) in [("f32", false), ("f16", true)] {
        group.bench_function(format!("16 images 256x256 u8 -> {name} NCHW"), |b| {
            b.iter(|| {
                let mut batcher = Batcher::new(16, [-1.0, 1.0]).with_f16(f16);
                (0..16)
                    .filter_map(|i| batcher.push(RowPixels::Image(image.clone()), meta(i)))
                    .count()
            })
        });
    }
    group.finish();
}

fn card(name: &str) -> ModelCard {
    let card = ModelCard::resolve(
        &repo()
            .join(format!("models/{name}.toml"))
            .display()
            .to_string(),
    )
    .unwrap_or_else(|e| panic!("{e:#} (run `make setup`)"));
    assert!(
        card.encoder.is_file(),
        "{} missing: run `make models`",
        card.encoder.display()
    );
    card
}

fn parquet_write(c: &mut Criterion) {
    let rows = 256;
    let latent_shape = [32, SIZE as usize / 8, SIZE as usize / 8];
    let per = latent_shape.iter().product::<usize>();
    let latents: Vec<f32> = (0..rows * per)
        .map(|i| ((i % 997) as f32 - 498.0) / 200.0)
        .collect();
    let out = std::env::temp_dir().join(format!("vae-pipeline-bench-write-{}", std::process::id()));
    let metadata = ShardMetadata {
        format_version: FORMAT_VERSION,
        tool_version: "bench".into(),
        model: "taef2".into(),
        encoder_sha256: String::new(),
        scaling_factor: 1.0,
        shift_factor: 0.0,
        normalization: String::new(),
        latent_mode: "mean".into(),
        dtype: StorageDType::F16,
        resize: "center-crop 256".into(),
        identity_hash: String::new(),
        identity: String::new(),
    };
    let mut group = c.benchmark_group("parquet write");
    group.throughput(Throughput::Bytes((rows * per * 2) as u64));
    group.bench_function("256 TAEF2 latents 32x32x32, f16, zstd", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_dir_all(&out);
                std::fs::create_dir_all(&out).unwrap();
                EncodedBatch {
                    width: SIZE,
                    height: SIZE,
                    frames: None,
                    latent_shape: latent_shape.to_vec(),
                    rows: (0..rows).map(meta).collect(),
                    latents: latents.clone(),
                    stds: None,
                    flip_latents: None,
                    flip_stds: None,
                    failures: Vec::new(),
                }
            },
            |batch| {
                let mut writer = ShardWriter::new(
                    std::sync::Arc::new(vae_pipeline::store::LocalStore::new(&out)),
                    vae_pipeline::format::Scope::Whole,
                    4096,
                    metadata.clone(),
                    TensorColumns::default(),
                    Vec::new(),
                    1,
                )
                .unwrap();
                writer.write(batch).unwrap();
                writer.close().unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&out);
}

fn ort_call_overhead(c: &mut Criterion) {
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        std::env::set_var(
            "ORT_DYLIB_PATH",
            repo().join(".ort/libonnxruntime.so.1.31.1"),
        );
    }
    let mut encoder = Encoder::open(&card("avgpool8"), 1, LatentMode::Mean, 0).unwrap();
    let framing = Framing::center_crop(64);
    let image = decode_resize(&kodak_png(), &framing);
    let mut group = c.benchmark_group("onnx runtime call, avgpool8");
    for n in [1usize, 16] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("batch {n} at 64x64"), |b| {
            b.iter_batched(
                || {
                    let mut batcher = Batcher::new(n, [0.0, 1.0]);
                    (0..n)
                        .find_map(|i| batcher.push(RowPixels::Image(image.clone()), meta(i)))
                        .unwrap()
                },
                |batch| encoder.encode(batch).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(
    stages,
    decode_and_resize,
    batch_assembly,
    parquet_write,
    ort_call_overhead
);
criterion_main!(stages);
