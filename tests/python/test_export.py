"""`vae-pipeline export` against references computed by other code.

- The shared tiny AutoencoderKL, renamed here to the original latent-diffusion key naming (this
  file's own rename, the inverse of diffusers' `convert_ldm_vae_checkpoint`) and written with the
  `safetensors` package, exports to the same ONNX outputs as the diffusers-named checkpoint, and
  both match the diffusers golden tensors (run with the `onnxruntime` Python package).
- FLUX.2's normalization (2x2 patchify, then batch-norm statistics) of the stored latents equals a
  numpy re-derivation from diffusers' golden moments.
- `export --inspect` drafts a working card for an Optimum-style encoder (`sample` ->
  `latent_parameters`), renamed here with the `onnx` package.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file, save_file

from vp_helpers import read_shards, require, run_precompute, tensor

CASES = ("gradient_shapes_64x64", "grayscale_64x64")
ATOL = 1e-4  # golden fp32 tolerance (models/README.md)
KL_SCALE = 0.18215


def golden(shared: Path, case: str, name: str) -> np.ndarray:
    return np.load(require(shared / "models" / "golden" / case / f"{name}.npy", f"golden {case}/{name}"))


def export(binary: Path, *args) -> subprocess.CompletedProcess:
    cmd = [str(binary), "export", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr}", pytrace=False)
    return proc


def to_original(state: dict[str, np.ndarray], up_blocks: int) -> dict[str, np.ndarray]:
    """diffusers names -> original latent-diffusion names (decoder up blocks numbered in reverse,
    attention projections as 1x1 convs)."""
    out = {}
    rev = lambda m: str(up_blocks - 1 - int(m))  # noqa: E731
    for name, t in state.items():
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", name)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{rev(m[1])}.block.{m[2]}.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{rev(m[1])}.upsample.", n)
        n = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", n)
        n = n.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
        for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            n = n.replace(f".mid_block.attentions.0.{new}.", f".mid.attn_1.{old}.")
        n = n.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if ".mid.attn_1." in n and n.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[n] = np.ascontiguousarray(t)
    return out


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def tiny(shared):
    state = load_file(require(shared / "models" / "tiny_kl.safetensors", "tiny AutoencoderKL checkpoint"))
    config = require(shared / "models" / "tiny_kl_config.json", "tiny AutoencoderKL config")
    return state, config


@pytest.fixture(scope="module")
def diffusers_export(binary, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-diffusers")
    state, config = tiny
    export(binary, "--checkpoint", config.parent / "tiny_kl.safetensors", "--config", config, "--out", out)
    return out


def outputs(out: Path, shared: Path) -> dict[str, np.ndarray]:
    got = {}
    for case in CASES:
        got[f"{case}/moments"] = run_onnx(out / "encoder.onnx", golden(shared, case, "kl_input"))
        mean = np.ascontiguousarray(golden(shared, case, "kl_moments")[:, :4])
        got[f"{case}/decoded"] = run_onnx(out / "decoder.onnx", mean)
    return got


@pytest.mark.parametrize("layout", ["original", "full-sd-checkpoint"])
def test_original_naming_exports_identical_graphs(layout, binary, tiny, shared, diffusers_export, tmp_path):
    state, config = tiny
    original = to_original(state, up_blocks=len(json.loads(config.read_text())["up_block_types"]))
    assert not [k for k in original if "_blocks" in k or "mid_block" in k], "rename left diffusers names"
    assert "decoder.up.1.block.0.conv1.weight" in original and original["encoder.mid.attn_1.q.weight"].ndim == 4
    if layout == "full-sd-checkpoint":
        # A whole SD checkpoint: the VAE under first_stage_model., plus other models and the
        # VAE's training losses, which export ignores.
        original = {f"first_stage_model.{k}": v for k, v in original.items()}
        original["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, 2), np.float32)
        original["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
    path = tmp_path / "vae.safetensors"
    save_file(original, str(path))
    out = tmp_path / "onnx"
    proc = export(binary, "--checkpoint", path, "--config", config, "--out", out)
    assert "original latent-diffusion naming" in proc.stdout, proc.stdout

    want, got = outputs(diffusers_export, shared), outputs(out, shared)
    for key in want:
        assert np.array_equal(got[key], want[key]), f"{key}: original naming differs by {np.abs(got[key] - want[key]).max():.3g}"
    for case in CASES:
        for key, ref in (("moments", "kl_moments"), ("decoded", "kl_decoded")):
            diff = float(np.abs(got[f"{case}/{key}"] - golden(shared, case, ref)).max())
            assert diff <= ATOL, f"{case} {key}: max abs diff vs diffusers {diff:.3g}"


@pytest.fixture(scope="module")
def golden_pngs(shared, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("golden-pngs")
    for case in CASES:
        src = require(shared / "models" / "golden" / "inputs" / f"{case}.png", "golden input image")
        shutil.copyfile(src, d / src.name)
    return d


def precompute(binary, pngs: Path, card: Path, out: Path, *extra):
    run_precompute(binary, ["--input", pngs, "--out", out, "--model", card, "--size", 64,
                            "--dtype", "f32", "--threads", 2, *extra])
    table = read_shards(out, 64)
    assert table.column("key").to_pylist() == [f"{c}.png" for c in CASES]
    return table


def patchify(z: np.ndarray) -> np.ndarray:
    """diffusers' Flux2Pipeline._patchify_latents for one [C, H, W] latent."""
    c, h, w = z.shape
    return z.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3).reshape(c * 4, h // 2, w // 2)


def test_flux2_batch_norm_normalization_matches_numpy(binary, tiny, shared, golden_pngs, tmp_path):
    # The tiny AutoencoderKL's weights as an AutoencoderKLFlux2 (same encoder/decoder; batch-norm
    # statistics added), so that diffusers' golden moments are this VAE's moments.
    state, config = tiny
    cfg = json.loads(config.read_text())
    cfg.update({"_class_name": "AutoencoderKLFlux2", "batch_norm_eps": 1e-4, "patch_size": [2, 2]})
    rng = np.random.default_rng(7)
    mean = rng.normal(0.0, 0.5, 16).astype(np.float32)
    var = rng.uniform(0.2, 3.0, 16).astype(np.float32)
    vae = tmp_path / "flux2" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text(json.dumps(cfg))
    save_file({**state, "bn.running_mean": mean, "bn.running_var": var,
               "bn.num_batches_tracked": np.array(1000, np.int64)},
              str(vae / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "onnx"
    export(binary, "--checkpoint", vae.parent, "--out", out)
    card = tomllib.loads((out / "card.toml").read_text())
    assert card["name"] == "flux2", "the card is named after the family the config names, not --out"
    assert card["batch_norm"]["patch_size"] == 2 and card["batch_norm"]["eps"] == pytest.approx(1e-4)
    assert np.array_equal(np.float32(card["batch_norm"]["running_mean"]), mean)
    assert np.array_equal(np.float32(card["batch_norm"]["running_var"]), var)
    assert (card["scaling_factor"], card["shift_factor"]) == (1.0, 0.0)

    table = precompute(binary, golden_pngs, out / "card.toml", tmp_path / "shards", "--latent-mode", "dist")
    assert list(table.schema.field("latent").type.shape) == [16, 16, 16]
    latents, stds = tensor(table, "latent"), tensor(table, "latent_std")
    inv = 1.0 / np.sqrt(var.astype(np.float64) + 1e-4)
    for i, case in enumerate(CASES):
        moments = golden(shared, case, "kl_moments")[0].astype(np.float64)
        want = (patchify(moments[:4]) - mean[:, None, None]) * inv[:, None, None]
        diff = float(np.abs(latents[i] - want).max())
        assert diff <= ATOL, f"{case}: FLUX.2-normalized latent max abs diff {diff:.3g}"
        want_std = patchify(np.exp(0.5 * np.clip(moments[4:], -30.0, 20.0))) * inv[:, None, None]
        rel = float((np.abs(stds[i] - want_std) / want_std).max())
        assert rel <= 1e-4, f"{case}: FLUX.2-normalized std max rel diff {rel:.3g}"


def test_inspect_drafts_a_working_card_for_an_optimum_encoder(binary, shared, golden_pngs, tmp_path):
    model = onnx.load(str(require(shared / "models" / "tiny_kl_encoder.onnx", "tiny KL encoder")))
    renames = {"image": "sample", "moments": "latent_parameters"}  # Optimum's vae_encoder names
    for value in [*model.graph.input, *model.graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.checker.check_model(model)
    path = tmp_path / "vae_encoder" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))

    draft = export(binary, "--inspect", path).stdout
    card = tomllib.loads(draft)
    assert (card["input_name"], card["output_name"], card["output"]) == ("sample", "latent_parameters", "moments"), draft
    assert (card["latent_channels"], card["spatial_factor"], card["input_range"]) == (4, 2, [-1.0, 1.0]), draft
    assert card["scaling_factor"] == KL_SCALE and "CHECK" in draft, draft
    card_path = tmp_path / "draft.toml"
    card_path.write_text(draft)
    latents = tensor(precompute(binary, golden_pngs, card_path, tmp_path / "shards"), "latent")
    for i, case in enumerate(CASES):
        diff = float(np.abs(latents[i] - golden(shared, case, "kl_mean_scaled")[0]).max())
        assert diff <= ATOL, f"{case}: latent through the drafted card, max abs diff {diff:.3g}"


def test_inspect_keeps_every_channel_of_a_latent_output(binary, shared, golden_pngs, cards, tmp_path):
    """TAEF2's encoder outputs `latent` with 32 channels: all latent, never 16 mean + 16 logvar.
    The draft (with the input range its CHECK line asks for) stores what the shipped card stores."""
    draft = export(binary, "--inspect", require(shared / "models" / "taef2_encoder.onnx", "TAEF2")).stdout
    card = tomllib.loads(draft)
    assert (card["output"], card["latent_channels"], card["spatial_factor"]) == ("latent", 32, 8), draft
    assert card["scaling_factor"] == 1.0 and card["shift_factor"] == 0.0, draft
    assert "CHECK" in draft, draft
    card_path = tmp_path / "draft.toml"
    card_path.write_text(draft.replace("input_range = [-1.0, 1.0]", "input_range = [0.0, 1.0]"))
    drafted = tensor(precompute(binary, golden_pngs, card_path, tmp_path / "drafted"), "latent")
    shipped = tensor(precompute(binary, golden_pngs, cards["taef2"], tmp_path / "shipped"), "latent")
    assert drafted.shape == shipped.shape and drafted.shape[1] == 32
    np.testing.assert_array_equal(drafted, shipped)
