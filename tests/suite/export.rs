//! `export` against diffusers: the tiny AutoencoderKL checkpoint in `../shared/models` exported
//! to ONNX must reproduce the moments and reconstructions diffusers computed (the golden .npy
//! files); a full-size SD 1.5 graph of random weights must load and have the published
//! parameter count; bad checkpoints must be refused with the offending tensor named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::*;
use prost::Message;
use safetensors::{serialize_to_file, Dtype, SafeTensors, View};
use vae_pipeline::batch::{Batch, BatchPixels};
use vae_pipeline::config::LatentMode;
use vae_pipeline::encode::Encoder;
use vae_pipeline::export::onnx_pb::ModelProto;
use vae_pipeline::model::ModelCard;
use vae_pipeline::runtime;

const CASES: [&str; 3] = [
    "gradient_shapes_64x64",
    "grayscale_64x64",
    "nonsquare_96x64_q95",
];

/// Golden fp32 tolerance (models/README.md).
const F32_TOL: f32 = 1e-4;

fn export(args: &[&str]) -> std::process::Output {
    let mut all = vec!["export"];
    all.extend_from_slice(args);
    vae_pipeline(&all)
}

fn exported(args: &[&str]) {
    let out = export(args);
    assert!(
        out.status.success(),
        "export {args:?} failed:\n{}",
        stderr(&out)
    );
}

/// Runs one ONNX file on an NCHW tensor; returns the output shape and values.
fn run(
    model: &Path,
    input: &str,
    output: &str,
    data: &[f32],
    shape: [usize; 4],
    f16: bool,
) -> ([usize; 4], Vec<f32>) {
    let mut session = runtime::session(model, 2).unwrap();
    runtime::run_nchw(&mut session, input, output, f16, data, shape).unwrap()
}

fn golden(case: &str, file: &str) -> (Vec<usize>, Vec<f32>) {
    npy_f32(&format!("models/golden/{case}/{file}"))
}

fn shape4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// Max |diff| of the encoder's moments and of the decoder's reconstruction (from the golden
/// mean) over the golden cases, plus the native non-square input.
fn parity(dir: &Path, f16: bool) -> (f32, f32, f32, f32) {
    let (enc, dec) = (dir.join("encoder.onnx"), dir.join("decoder.onnx"));
    let (mut enc_max, mut dec_max, mut enc_mean, mut dec_mean) = (0f32, 0f32, 0f32, 0f32);
    let mut inputs: Vec<(&str, &str, &str)> = CASES
        .iter()
        .map(|c| (*c, "kl_input.npy", "kl_moments.npy"))
        .collect();
    inputs.push((CASES[2], "native_taef2_input.npy", "native_kl_moments.npy"));
    for (case, input, reference) in inputs {
        let (shape, mut x) = golden(case, input);
        if input.starts_with("native_taef2") {
            // The native input is in [0, 1]; the KL encoder takes x·2 − 1, as the golden did.
            x.iter_mut().for_each(|v| *v = *v * 2.0 - 1.0);
        }
        let (_, want) = golden(case, reference);
        let (got_shape, got) = run(&enc, "image", "moments", &x, shape4(&shape), f16);
        assert_eq!(got.len(), want.len(), "{case}: moments shape {got_shape:?}");
        enc_max = enc_max.max(max_abs_diff(&got, &want));
        enc_mean = enc_mean.max(mean_abs_diff(&got, &want));
    }
    for case in &CASES[..2] {
        let (_, moments) = golden(case, "kl_moments.npy");
        let mean = &moments[..moments.len() / 2];
        let (_, want) = golden(case, "kl_decoded.npy");
        let (got_shape, got) = run(&dec, "latent", "image", mean, [1, 4, 32, 32], f16);
        assert_eq!(got_shape, [1, 3, 64, 64]);
        dec_max = dec_max.max(max_abs_diff(&got, &want));
        dec_mean = dec_mean.max(mean_abs_diff(&got, &want));
    }
    (enc_max, enc_mean, dec_max, dec_mean)
}

/// A diffusers VAE folder (`vae/config.json` + `vae/diffusion_pytorch_model.safetensors`) made
/// of the shared tiny checkpoint.
fn tiny_kl_folder(dir: &Path) -> PathBuf {
    let vae = dir.join("checkpoint").join("vae");
    std::fs::create_dir_all(&vae).unwrap();
    std::os::unix::fs::symlink(
        shared("models/tiny_kl.safetensors"),
        vae.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        shared("models/tiny_kl_config.json"),
        vae.join("config.json"),
    )
    .unwrap();
    dir.join("checkpoint")
}

#[test]
fn tiny_kl_f32_matches_diffusers() {
    let dir = scratch("export-tiny-f32");
    let out = dir.join("onnx");
    exported(&["--checkpoint", s(&tiny_kl_folder(&dir)), "--out", s(&out)]);
    let (enc, enc_mean, dec, dec_mean) = parity(&out, false);
    eprintln!("tiny-kl f32: encoder max |diff| {enc:.2e} (mean {enc_mean:.2e}), decoder max {dec:.2e} (mean {dec_mean:.2e})");
    assert!(enc <= F32_TOL, "encoder moments max |diff| {enc}");
    assert!(dec <= F32_TOL, "decoder image max |diff| {dec}");

    // The card it wrote drives the encode stage: scaled means equal diffusers' mode() × 0.18215.
    let card = ModelCard::load(&out.join("card.toml")).unwrap();
    assert_eq!(
        (
            card.latent_channels,
            card.spatial_factor,
            card.scaling_factor
        ),
        (4, 2, 0.18215)
    );
    assert_eq!(
        card.decoder.as_deref(),
        Some(out.join("decoder.onnx").as_path())
    );
    let mut encoder = Encoder::open(&card, 2, LatentMode::Mean, 0).unwrap();
    let mut pixels = Vec::new();
    for case in &CASES {
        pixels.extend(golden(case, "kl_input.npy").1);
    }
    let batch = Batch {
        frames: None,
        width: 64,
        height: 64,
        rows: CASES.iter().map(|c| row(c)).collect(),
        pixels: BatchPixels::F32(pixels),
        flipped: false,
    };
    let encoded = encoder.encode(batch).unwrap();
    let per = 4 * 32 * 32;
    for (i, case) in CASES.iter().enumerate() {
        let d = max_abs_diff(
            &encoded.latents[i * per..(i + 1) * per],
            &golden(case, "kl_mean_scaled.npy").1,
        );
        assert!(d <= F32_TOL, "{case}: scaled mean max |diff| {d}");
    }
}

#[test]
fn tiny_kl_f16_is_within_fp16_tolerance() {
    let dir = scratch("export-tiny-f16");
    let out = dir.join("onnx");
    exported(&[
        "--checkpoint",
        s(&shared("models/tiny_kl.safetensors")),
        "--config",
        s(&shared("models/tiny_kl_config.json")),
        "--dtype",
        "f16",
        "--out",
        s(&out),
    ]);
    let model =
        ModelProto::decode(std::fs::read(out.join("encoder.onnx")).unwrap().as_slice()).unwrap();
    let graph = model.graph.unwrap();
    // FLOAT16 = 10: weights and I/O.
    assert!(graph.initializer.iter().all(|t| t.data_type == Some(10)));
    let (enc, enc_mean, dec, dec_mean) = parity(&out, true);
    eprintln!("tiny-kl f16: encoder max |diff| {enc:.2e} (mean {enc_mean:.2e}), decoder max {dec:.2e} (mean {dec_mean:.2e})");
    assert!(
        enc <= 0.1 && enc_mean <= 0.01,
        "encoder moments max |diff| {enc}, mean {enc_mean}"
    );
    assert!(
        dec <= 0.1 && dec_mean <= 0.01,
        "decoder image max |diff| {dec}, mean {dec_mean}"
    );
}

/// A tensor to write into a safetensors file.
struct Owned {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Owned>) {
    serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, path).unwrap();
}

/// The tiny checkpoint's tensors, to edit into broken ones.
fn tiny_kl_tensors() -> BTreeMap<String, Owned> {
    let bytes = std::fs::read(shared("models/tiny_kl.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32);
            (
                name.to_string(),
                Owned {
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            )
        })
        .collect()
}

type Dict = Vec<(String, Vec<usize>)>;

fn conv(v: &mut Dict, name: String, cin: usize, cout: usize, k: usize) {
    v.push((format!("{name}.weight"), vec![cout, cin, k, k]));
    v.push((format!("{name}.bias"), vec![cout]));
}

fn norm(v: &mut Dict, name: String, c: usize) {
    v.push((format!("{name}.weight"), vec![c]));
    v.push((format!("{name}.bias"), vec![c]));
}

fn resnet(v: &mut Dict, p: String, cin: usize, cout: usize) {
    norm(v, format!("{p}.norm1"), cin);
    conv(v, format!("{p}.conv1"), cin, cout, 3);
    norm(v, format!("{p}.norm2"), cout);
    conv(v, format!("{p}.conv2"), cout, cout, 3);
    if cin != cout {
        conv(v, format!("{p}.conv_shortcut"), cin, cout, 1);
    }
}

fn mid(v: &mut Dict, p: &str, c: usize) {
    resnet(v, format!("{p}.mid_block.resnets.0"), c, c);
    norm(v, format!("{p}.mid_block.attentions.0.group_norm"), c);
    for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
        v.push((
            format!("{p}.mid_block.attentions.0.{proj}.weight"),
            vec![c, c],
        ));
        v.push((format!("{p}.mid_block.attentions.0.{proj}.bias"), vec![c]));
    }
    resnet(v, format!("{p}.mid_block.resnets.1"), c, c);
}

/// The state dict of a diffusers `AutoencoderKL` (names and shapes), written out here from the
/// architecture rather than taken from the exporter.
fn kl_state_dict(blocks: &[usize], layers: usize, latent: usize) -> Dict {
    let mut v = Dict::new();
    let n = blocks.len();
    conv(&mut v, "encoder.conv_in".into(), 3, blocks[0], 3);
    let mut cin = blocks[0];
    for (i, &cout) in blocks.iter().enumerate() {
        for j in 0..layers {
            let from = if j == 0 { cin } else { cout };
            resnet(
                &mut v,
                format!("encoder.down_blocks.{i}.resnets.{j}"),
                from,
                cout,
            );
        }
        if i + 1 < n {
            conv(
                &mut v,
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                cout,
                cout,
                3,
            );
        }
        cin = cout;
    }
    mid(&mut v, "encoder", blocks[n - 1]);
    norm(&mut v, "encoder.conv_norm_out".into(), blocks[n - 1]);
    conv(
        &mut v,
        "encoder.conv_out".into(),
        blocks[n - 1],
        2 * latent,
        3,
    );
    conv(&mut v, "quant_conv".into(), 2 * latent, 2 * latent, 1);
    conv(&mut v, "post_quant_conv".into(), latent, latent, 1);
    let rev: Vec<usize> = blocks.iter().rev().copied().collect();
    conv(&mut v, "decoder.conv_in".into(), latent, rev[0], 3);
    mid(&mut v, "decoder", rev[0]);
    let mut cin = rev[0];
    for (i, &cout) in rev.iter().enumerate() {
        for j in 0..=layers {
            let from = if j == 0 { cin } else { cout };
            resnet(
                &mut v,
                format!("decoder.up_blocks.{i}.resnets.{j}"),
                from,
                cout,
            );
        }
        if i + 1 < n {
            conv(
                &mut v,
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                cout,
                cout,
                3,
            );
        }
        cin = cout;
    }
    norm(&mut v, "decoder.conv_norm_out".into(), rev[n - 1]);
    conv(&mut v, "decoder.conv_out".into(), rev[n - 1], 3, 3);
    v
}

/// Small uniform random values (xorshift): GroupNorm weights near 1 keep activations sane.
fn random_tensors(dict: &Dict, seed: u64) -> BTreeMap<String, Owned> {
    let mut state = seed | 1;
    dict.iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let is_norm_weight =
                shape.len() == 1 && name.contains("norm") && name.ends_with(".weight");
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let scale = 1.0 / (fan_in as f32).sqrt();
            let mut bytes = Vec::with_capacity(count * 4);
            for _ in 0..count {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let value = if is_norm_weight {
                    1.0 + 0.1 * u
                } else {
                    u * scale
                };
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            (
                name.clone(),
                Owned {
                    shape: shape.clone(),
                    bytes,
                },
            )
        })
        .collect()
}

fn initializer_count(path: &Path) -> usize {
    let model = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    model
        .graph
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>() as usize)
        .sum()
}

#[test]
fn sd15_size_graph_has_the_published_parameter_count() {
    let dir = scratch("export-sd15");
    let checkpoint = dir.join("sd15_random.safetensors");
    let dict = kl_state_dict(&[128, 256, 512, 512], 2, 4);
    write_safetensors(&checkpoint, &random_tensors(&dict, 15));
    let out = dir.join("onnx");
    let start = Instant::now();
    exported(&[
        "--checkpoint",
        s(&checkpoint),
        "--family",
        "sd15",
        "--out",
        s(&out),
    ]);
    eprintln!("SD 1.5-size export: {:.1} s", start.elapsed().as_secs_f64());
    // diffusers' `vae.encoder` has 34,163,592 parameters, `quant_conv` 72; the whole
    // AutoencoderKL 83,653,863, so decoder + post_quant_conv has 49,490,199.
    assert_eq!(
        initializer_count(&out.join("encoder.onnx")),
        34_163_592 + 72
    );
    assert_eq!(initializer_count(&out.join("decoder.onnx")), 49_490_199);

    let image: Vec<f32> = (0..3 * 64 * 64)
        .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
        .collect();
    let (shape, moments) = run(
        &out.join("encoder.onnx"),
        "image",
        "moments",
        &image,
        [1, 3, 64, 64],
        false,
    );
    assert_eq!(shape, [1, 8, 8, 8]);
    assert!(moments.iter().all(|v| v.is_finite()));
    let (shape, decoded) = run(
        &out.join("decoder.onnx"),
        "latent",
        "image",
        &moments[..4 * 64],
        [1, 4, 8, 8],
        false,
    );
    assert_eq!(shape, [1, 3, 64, 64]);
    assert!(decoded.iter().all(|v| v.is_finite()));
    let card = ModelCard::load(&out.join("card.toml")).unwrap();
    assert_eq!(
        (card.spatial_factor, card.scaling_factor, card.name.as_str()),
        (8, 0.18215, "sd15")
    );
    // The random checkpoint and its graphs are 0.7 GB: not worth keeping.
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flux2_graph_loads_and_card_holds_the_batch_norm_statistics() {
    let dir = scratch("export-flux2");
    let vae = dir.join("vae");
    std::fs::create_dir_all(&vae).unwrap();
    std::fs::write(
        vae.join("config.json"),
        r#"{"_class_name": "AutoencoderKLFlux2", "block_out_channels": [32, 64], "layers_per_block": 1,
            "latent_channels": 32, "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "batch_norm_eps": 0.0001, "patch_size": [2, 2]}"#,
    )
    .unwrap();
    let mut dict = kl_state_dict(&[32, 64], 1, 32);
    dict.push(("bn.running_mean".into(), vec![128]));
    dict.push(("bn.running_var".into(), vec![128]));
    let mut tensors = random_tensors(&dict, 2);
    // Variances must be positive: 0.5 + i/128.
    tensors.get_mut("bn.running_var").unwrap().bytes = (0..128)
        .flat_map(|i| (0.5 + i as f32 / 128.0).to_le_bytes())
        .collect();
    write_safetensors(&vae.join("diffusion_pytorch_model.safetensors"), &tensors);
    let out = dir.join("flux2");
    exported(&["--checkpoint", s(&vae), "--out", s(&out)]);

    let card = ModelCard::load(&out.join("card.toml")).unwrap();
    assert_eq!(
        (
            card.name.as_str(),
            card.latent_channels,
            card.spatial_factor
        ),
        ("flux2", 32, 2)
    );
    assert_eq!((card.scaling_factor, card.shift_factor), (1.0, 0.0));
    let bn = card.batch_norm.as_ref().expect("a [batch_norm] table");
    let written: Vec<f32> = tensors["bn.running_mean"]
        .bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!((bn.patch_size, bn.eps), (2, 1e-4));
    assert_eq!(bn.running_mean, written);
    assert_eq!(bn.running_var[127], 0.5 + 127.0 / 128.0);
    assert!(card.check_size(64).is_ok() && card.check_size(66).is_err());

    let image = vec![0.25; 3 * 32 * 48];
    let (shape, moments) = run(
        &out.join("encoder.onnx"),
        "image",
        "moments",
        &image,
        [1, 3, 32, 48],
        false,
    );
    assert_eq!(shape, [1, 64, 16, 24]);
    let (shape, _) = run(
        &out.join("decoder.onnx"),
        "latent",
        "image",
        &moments[..32 * 16 * 24],
        [1, 32, 16, 24],
        false,
    );
    assert_eq!(shape, [1, 3, 32, 48]);
}

/// Exports `tensors` with the tiny config; returns the error message.
fn refused(
    dir: &Path,
    file: &str,
    bytes: Option<&[u8]>,
    tensors: Option<&BTreeMap<String, Owned>>,
) -> String {
    let path = dir.join(file);
    match (bytes, tensors) {
        (Some(b), _) => std::fs::write(&path, b).unwrap(),
        (None, Some(t)) => write_safetensors(&path, t),
        (None, None) => unreachable!(),
    }
    let out = export(&[
        "--checkpoint",
        s(&path),
        "--config",
        s(&shared("models/tiny_kl_config.json")),
        "--out",
        s(&dir.join("out")),
    ]);
    assert!(!out.status.success(), "{file} was accepted");
    assert!(
        !dir.join("out").join("encoder.onnx").exists(),
        "{file}: a refused export wrote files"
    );
    stderr(&out)
}

#[test]
fn pickles_and_broken_checkpoints_are_refused_naming_the_tensor() {
    let dir = scratch("export-refused");
    // A pickle (protocol 2 header), by extension and renamed to .safetensors.
    let pickle = b"\x80\x02}q\x00.";
    for file in ["vae.ckpt", "vae.pt", "pickled.safetensors"] {
        let err = refused(&dir, file, Some(pickle), None);
        assert!(
            err.contains("pickle") && err.contains("runs whatever code"),
            "{file}: {err}"
        );
    }

    let mut missing = tiny_kl_tensors();
    missing
        .remove("decoder.up_blocks.1.resnets.0.conv2.weight")
        .unwrap();
    let err = refused(&dir, "missing.safetensors", None, Some(&missing));
    assert!(
        err.contains("has no tensor decoder.up_blocks.1.resnets.0.conv2.weight"),
        "{err}"
    );

    let mut extra = tiny_kl_tensors();
    extra.insert(
        "encoder.down_blocks.9.resnets.0.conv1.weight".into(),
        Owned {
            shape: vec![1],
            bytes: vec![0; 4],
        },
    );
    let err = refused(&dir, "extra.safetensors", None, Some(&extra));
    assert!(
        err.contains("does not use: encoder.down_blocks.9.resnets.0.conv1.weight"),
        "{err}"
    );

    let mut misshaped = tiny_kl_tensors();
    misshaped.get_mut("encoder.conv_in.weight").unwrap().shape = vec![32, 3, 9, 1];
    let err = refused(&dir, "misshaped.safetensors", None, Some(&misshaped));
    assert!(
        err.contains(
            "encoder.conv_in.weight has shape [32, 3, 9, 1], but the config needs [32, 3, 3, 3]"
        ),
        "{err}"
    );

    let out = export(&[
        "--checkpoint",
        s(&shared("models/tiny_kl.safetensors")),
        "--out",
        s(&dir.join("out")),
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("--family"),
        "{}",
        stderr(&out)
    );
}
