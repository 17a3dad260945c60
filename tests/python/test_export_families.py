"""`vae-pipeline export` of the 2025-2026 VAE families against diffusers' own outputs.

For each tiny random-weight checkpoint in ../shared/models/families (see its README.md), the
exported graphs, run here with the `onnxruntime` Python package, must reproduce the goldens
diffusers 0.42.1 computed for every case of golden.npz:
- `encoder_output` (moments, or DC-AE's latent) and `decoded` (decoder of the golden mean), f32
  within 1e-4 of the tensor's scale (max |a - b| / max |golden|), f16 within F16_TOL (measured);
- `latent_normalized`: the normalization the exported card states, applied in numpy.
Then end to end through the binary: `precompute` with the exported card stores the golden
normalized latents (in `dist` mode the std divided by `latents_std`); with the shipped card
(models/<name>.toml, ONNX paths swapped for the export) the golden mean under the shipped
statistics; `report`, from the images and from the shards, reconstructs exactly the golden
decoded image; a size off the factor is refused with the sizes to use; a checkpoint with a tensor
missing or left over is refused naming it; a Qwen-Image single file in the original Wan naming
exports the same graphs.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file, save_file

from vp_helpers import REPO, read_shards, require, run_precompute, tensor

F32_TOL = 1e-4
# fp16 weights and I/O (norms, softmax and linear-attention sums in f32): the largest error
# measured over every case of every family was 4.3e-3 of the tensor's scale (Qwen-Image's
# decoder); 1e-2 leaves room for other CPUs' kernels.
F16_TOL = 1e-2

# folder -> (shipped card or None, latent channels, spatial factor)
FAMILIES = {
    "qwen-image": ("qwen-image", 16, 8),
    "wan2.2": ("wan2.2", 48, 16),
    "dc-ae-f32c32-sana": ("sana", 32, 32),
    "dc-ae-f32c32-in": (None, 32, 32),
    "hunyuanimage-2.1": ("hunyuanimage-2.1", 32, 32),
}

# shipped card -> (latent channels, spatial factor, output, scaling factor, per-channel values)
# of the real models (their diffusers vae/config.json).
SHIPPED = {
    "qwen-image": (16, 8, "moments", 1.0, 16),
    "wan2.1": (16, 8, "moments", 1.0, 16),
    "wan2.2": (48, 16, "moments", 1.0, 48),
    "sana": (32, 32, "latent", 0.41407, None),
    "hunyuanimage-2.1": (64, 32, "moments", 0.75289, None),
}

# The golden cases whose input image the binary reads unchanged: a 64x64 PNG at --size 64.
PNG_CASES = ("gradient_shapes_64x64", "grayscale_64x64")


def family_dir(shared: Path, family: str) -> Path:
    return require(shared / "models" / "families" / family, f"tiny {family} checkpoint folder")


def goldens(shared: Path, family: str) -> dict[str, dict[str, np.ndarray]]:
    npz = np.load(require(family_dir(shared, family) / "golden.npz", f"{family} golden.npz"))
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in npz.files:
        case, name = key.split("/")
        cases.setdefault(case, {})[name] = npz[key]
    return cases


def export(binary: Path, checkpoint: Path, out: Path, dtype: str) -> None:
    cmd = [str(binary), "export", "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"


@pytest.fixture(scope="module")
def exports(binary, shared, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = {}
    for family in FAMILIES:
        for dtype in ("f32", "f16"):
            d = tmp_path_factory.mktemp(f"{family}-{dtype}")
            export(binary, family_dir(shared, family), d, dtype)
            out[family, dtype] = d
    return out


def scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def normalize(card: dict, z: np.ndarray) -> np.ndarray:
    """The card's normalization of a [N, C, h, w] raw latent, in float64."""
    z = z.astype(np.float64)
    if "latents_mean" in card:
        mean = np.array(card["latents_mean"], np.float64)[None, :, None, None]
        std = np.array(card["latents_std"], np.float64)[None, :, None, None]
        z = (z - mean) / std
    return (z - card["shift_factor"]) * card["scaling_factor"]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_graphs_match_diffusers_for_every_case(family, dtype, exports, shared):
    d = exports[family, dtype]
    card = tomllib.loads((d / "card.toml").read_text())
    _, channels, factor = FAMILIES[family]
    assert (card["latent_channels"], card["spatial_factor"]) == (channels, factor)
    output = card["output"]
    assert output == ("latent" if family.startswith("dc-ae") else "moments")
    enc = ort.InferenceSession(str(d / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(d / "decoder.onnx"), providers=["CPUExecutionProvider"])
    io = np.float16 if dtype == "f16" else np.float32
    tol = F16_TOL if dtype == "f16" else F32_TOL
    errors = []
    for case, g in goldens(shared, family).items():
        x = (g["input"] * 2.0 - 1.0).astype(io)
        encoded = enc.run([output], {"image": x})[0]
        assert encoded.shape == g["encoder_output"].shape, f"{case}: {output} {encoded.shape}"
        mean = g["encoder_output"][:, :channels]
        image = dec.run(["image"], {"latent": mean.astype(io)})[0]
        assert image.shape == g["decoded"].shape, f"{case}: image {image.shape}"
        for name, got, want in [
            ("encoder_output", encoded, g["encoder_output"]),
            ("latent_normalized", normalize(card, encoded[:, :channels]), g["latent_normalized"]),
            ("decoded", image, g["decoded"]),
        ]:
            errors.append((scaled_error(got, want), case, name))
    worst = max(errors)
    assert worst[0] <= tol, f"{family} {dtype}: {worst[1]} {worst[2]} off by {worst[0]:.3g} of its scale"


@pytest.fixture(scope="module")
def pngs(shared, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("family-pngs")
    for case in PNG_CASES:
        src = require(shared / "models" / "golden" / "inputs" / f"{case}.png", "golden input image")
        shutil.copyfile(src, d / src.name)
    return d


def precompute(binary, pngs: Path, card: Path, out: Path) -> np.ndarray:
    run_precompute(binary, ["--input", pngs, "--out", out, "--model", card, "--size", 64,
                            "--dtype", "f32", "--threads", 2])
    table = read_shards(out, 64)
    assert table.column("key").to_pylist() == [f"{c}.png" for c in PNG_CASES]
    return tensor(table, "latent")


def shipped_card_on(export_dir: Path, name: str, out: Path) -> Path:
    """The shipped card models/<name>.toml with its ONNX paths pointing at `export_dir`."""
    text = require(REPO / "models" / f"{name}.toml", f"shipped card {name}").read_text()
    text = re.sub(r'(?m)^encoder = .*$', f'encoder = "{export_dir / "encoder.onnx"}"', text)
    text = re.sub(r'(?m)^decoder = .*$', f'decoder = "{export_dir / "decoder.onnx"}"', text)
    out.write_text(text)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_precompute_stores_the_normalized_latents(family, exports, shared, binary, pngs, tmp_path):
    d = exports[family, "f32"]
    g = goldens(shared, family)
    channels = FAMILIES[family][1]
    latents = precompute(binary, pngs, d / "card.toml", tmp_path / "exported")
    for i, case in enumerate(PNG_CASES):
        want = g[f"{case}_64x64"]["latent_normalized"][0]
        err = scaled_error(latents[i], want)
        assert err <= F32_TOL, f"{case}: stored latent off by {err:.3g} of its scale"

    name = FAMILIES[family][0]
    if name is None or SHIPPED[name][0] != channels:
        # No shipped card, or the real model's channels differ from the tiny checkpoint's
        # (HunyuanImage 2.1: 64, here 32).
        return
    shipped = shipped_card_on(d, name, tmp_path / "shipped.toml")
    card = tomllib.loads(shipped.read_text())
    latents = precompute(binary, pngs, shipped, tmp_path / "shipped")
    for i, case in enumerate(PNG_CASES):
        want = normalize(card, g[f"{case}_64x64"]["encoder_output"][:, :channels])[0]
        err = scaled_error(latents[i], want)
        assert err <= F32_TOL, f"{case}: shipped-card latent off by {err:.3g} of its scale"


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_cards_state_the_real_models_contracts(name):
    card = tomllib.loads(require(REPO / "models" / f"{name}.toml", f"shipped card {name}").read_text())
    channels, factor, output, scaling, per_channel = SHIPPED[name]
    assert (card["latent_channels"], card["spatial_factor"], card["output"]) == (channels, factor, output)
    assert (card["scaling_factor"], card["shift_factor"]) == (scaling, 0.0)
    if per_channel is None:
        assert "latents_mean" not in card and "latents_std" not in card
    else:
        assert len(card["latents_mean"]) == len(card["latents_std"]) == per_channel
        assert min(card["latents_std"]) > 0


def test_dist_mode_divides_the_std_by_latents_std(exports, shared, binary, pngs, tmp_path):
    d = exports["qwen-image", "f32"]
    card = tomllib.loads((d / "card.toml").read_text())
    run_precompute(binary, ["--input", pngs, "--out", tmp_path / "dist", "--model", d / "card.toml", "--size", 64,
                            "--dtype", "f32", "--threads", 2, "--latent-mode", "dist"])
    table = read_shards(tmp_path / "dist", 64)
    stds = tensor(table, "latent_std")
    std_c = np.array(card["latents_std"], np.float64)[:, None, None]
    g = goldens(shared, "qwen-image")
    for i, case in enumerate(PNG_CASES):
        logvar = g[f"{case}_64x64"]["encoder_output"][0, 16:].astype(np.float64)
        want = np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) / std_c
        rel = float((np.abs(stds[i] - want) / want).max())
        assert rel <= 1e-4, f"{case}: per-channel std max rel diff {rel:.3g}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(1.0 / mse)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_report_reconstructs_the_golden_decoded_image(family, exports, shared, binary, pngs, tmp_path):
    """The report undoes the card's normalization before decoding: its PSNR per image is that of
    diffusers' decoded golden against the input, from the images and from the shards."""
    d = exports[family, "f32"]
    g = goldens(shared, family)
    want = {}
    for case in PNG_CASES:
        c = g[f"{case}_64x64"]
        want[f"{case}.png"] = psnr(np.clip((c["decoded"] + 1.0) / 2.0, 0.0, 1.0), c["input"])
    shards = tmp_path / "shards"
    precompute(binary, pngs, d / "card.toml", shards)
    runs = {
        "images": ["--input", pngs, "--model", d / "card.toml", "--size", 64],
        "shards": ["--shards", shards, "--input", pngs, "--model", d / "card.toml"],
    }
    for origin, args in runs.items():
        out = tmp_path / f"report-{origin}"
        cmd = [str(binary), "report", *map(str, args), "--out", str(out), "--threads", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
        assert sorted(r["key"] for r in rows) == sorted(want)
        for r in rows:
            assert r["psnr"] == pytest.approx(want[r["key"]], abs=1e-3), f"{origin} {r['key']}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_checkpoint_that_is_not_the_configs_vae_is_refused_naming_the_tensor(family, shared, binary, tmp_path):
    src = family_dir(shared, family)
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    dropped = sorted(k for k in state if k.startswith("decoder."))[-1]
    cases = {
        "missing": ({k: v for k, v in state.items() if k != dropped}, dropped),
        "left-over": ({**state, "decoder.extra.weight": np.zeros(3, np.float32)}, "decoder.extra.weight"),
    }
    for what, (tensors, name) in cases.items():
        vae = tmp_path / what
        vae.mkdir()
        shutil.copyfile(src / "config.json", vae / "config.json")
        save_file(tensors, str(vae / "diffusion_pytorch_model.safetensors"))
        cmd = [str(binary), "export", "--checkpoint", str(vae), "--out", str(tmp_path / f"{what}-out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0, f"{what} tensor {name} was not refused"
        assert name in proc.stderr, proc.stderr
        assert not (tmp_path / f"{what}-out" / "card.toml").exists()


RESIDUAL = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
            "conv_shortcut.": "shortcut."}


def to_wan_original(name: str, group: int) -> str:
    """diffusers -> original Wan 2.1 names: the inverse of diffusers' convert_wan_to_diffusers.py
    `convert_vae`, written here from its table (G entries per decoder block)."""
    def residual(rest: str) -> str:
        return next((new + rest[len(old):] for old, new in RESIDUAL.items() if rest.startswith(old)), rest)

    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
             "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
             "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
             "decoder.conv_out.": "decoder.head.2."}
    for old, new in fixed.items():
        if name.startswith(old):
            return new + name[len(old):]
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", name):
        return f"{m[1]}.middle.{2 * int(m[2])}.{residual(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", name):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", name):
        return f"encoder.downsamples.{m[1]}.{residual(m[2])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        return f"decoder.upsamples.{int(m[1]) * group + int(m[2])}.{residual(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
        return f"decoder.upsamples.{int(m[1]) * group + group - 1}.{m[2]}"
    raise AssertionError(f"no original Wan name for {name}")


def test_a_single_file_in_original_wan_naming_exports_the_same_graphs(exports, shared, binary, tmp_path):
    """ComfyUI's qwen_image_vae.safetensors / wan_2.1_vae.safetensors use the original Wan names."""
    src = family_dir(shared, "qwen-image")
    config = json.loads((src / "config.json").read_text())
    group = config["num_res_blocks"] + 2
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    original = {to_wan_original(k, group): v for k, v in state.items()}
    assert len(original) == len(state)
    single = tmp_path / "qwen_image_vae.safetensors"
    save_file(original, str(single))
    out = tmp_path / "out"
    cmd = [str(binary), "export", "--checkpoint", str(single), "--config", str(src / "config.json"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "original Wan naming" in proc.stdout, proc.stdout
    reference = exports["qwen-image", "f32"]
    g = goldens(shared, "qwen-image")["gradient_shapes_64x64_96x64"]
    for graph, name, value in [("encoder", "image", g["input"] * 2 - 1),
                               ("decoder", "latent", g["encoder_output"][:, :16])]:
        runs = [ort.InferenceSession(str(d / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
                .run(None, {name: value.astype(np.float32)})[0] for d in (out, reference)]
        assert np.array_equal(runs[0], runs[1]), f"{graph} differs from the diffusers-named export"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sizes_off_the_factor_are_refused_with_the_sizes_to_use(family, exports, binary, pngs, tmp_path):
    factor = FAMILIES[family][2]
    size = 4 * factor + factor // 2
    cmd = [str(binary), "precompute", "--input", str(pngs), "--out", str(tmp_path / "out"),
           "--model", str(exports[family, "f32"] / "card.toml"), "--size", str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"use {4 * factor} or {5 * factor}" in proc.stderr, proc.stderr
