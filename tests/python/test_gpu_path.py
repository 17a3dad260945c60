"""The host side of the GPU path, on the CPU: fp16 batches and latent column storage.

- `--latent-compression` stores tensor columns plain, zstd or BYTE_STREAM_SPLIT + zstd; every
  setting holds the same latents, to the bit, read by pyarrow, and `verify` accepts the set.
- An fp16 encoder's run (f16 batches written by the batcher, f16 latents converted on the write
  pool) stores the same latents as the fp32 path within fp16 tolerance.
- benches/gpu/vae_checkpoint.py writes diffusers' names and shapes (checked against a real
  diffusers checkpoint), and its SDXL and FLUX.2 configs, shrunk, export and encode.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from vp_helpers import REPO, read_shards, run_precompute, shard_files, tensor

SIZE = 64


@pytest.fixture(scope="module")
def kodak4(shared, tmp_path_factory):
    """Four Kodak photos (the first ones), as a folder."""
    d = tmp_path_factory.mktemp("kodak4")
    for src in sorted((shared / "data" / "kodak").glob("kodim*.png"))[:4]:
        (d / src.name).symlink_to(src)
    return d


def encodings(path):
    """Parquet encodings and compression of each tensor column chunk."""
    md = pq.ParquetFile(path).metadata
    out = {}
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            if col.path_in_schema.startswith("latent"):
                out[col.path_in_schema] = (set(col.encodings), col.compression)
    return out


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_latent_compression_settings_store_the_same_latents(binary, cards, kodak4, tmp_path, dtype):
    latents = {}
    for setting, encoding, codec in [
        ("zstd:3", "PLAIN", "ZSTD"),
        ("split-zstd:3", "BYTE_STREAM_SPLIT", "ZSTD"),
        ("none", "PLAIN", "UNCOMPRESSED"),
    ]:
        out = tmp_path / setting.replace(":", "-")
        run_precompute(binary, [
            "--input", kodak4, "--out", out, "--model", cards["avgpool8"], "--size", SIZE,
            "--dtype", dtype, "--flip", "--threads", 2, "--latent-compression", setting,
        ])
        for column, (found, compression) in encodings(shard_files(out, SIZE)[0]).items():
            assert encoding in found and compression == codec, (setting, column, found, compression)
        table = read_shards(out, SIZE)
        latents[setting] = [tensor(table, c) if dtype == "f16" else table.column(c).combine_chunks()
                            for c in ("latent", "latent_flip")]
        verify = subprocess.run([str(binary), "verify", str(out)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
    first = latents["zstd:3"]
    for setting, got in latents.items():
        for a, b in zip(first, got):
            assert (a == b).all() if dtype == "f16" else a.equals(b), setting


def test_unknown_latent_compression_is_refused_with_the_choices(binary, cards, kodak4, tmp_path):
    proc = subprocess.run(
        [str(binary), "precompute", "--input", str(kodak4), "--out", str(tmp_path / "o"),
         "--model", str(cards["avgpool8"]), "--latent-compression", "gzip"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "none, zstd, zstd:LEVEL, split-zstd" in proc.stderr, proc.stderr


def test_fp16_encoder_run_matches_fp32_within_fp16_tolerance(binary, cards, kodak4, tmp_path):
    got = {}
    for model in ("taef2", "taef2-fp16"):
        out = tmp_path / model
        run_precompute(binary, [
            "--input", kodak4, "--out", out, "--model", cards[model], "--size", SIZE,
            "--threads", 2, "--batch-size", 3,
        ])
        got[model] = tensor(read_shards(out, SIZE), "latent").astype(np.float32)
    diff = np.abs(got["taef2"] - got["taef2-fp16"])
    assert got["taef2"].shape == (4, 32, SIZE // 8, SIZE // 8)
    assert diff.max() <= 0.1 and diff.mean() <= 0.01, (diff.max(), diff.mean())


def checkpoint_writer():
    import importlib.util

    path = REPO / "benches" / "gpu" / "vae_checkpoint.py"
    spec = importlib.util.spec_from_file_location("vae_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_writer_names_and_shapes_match_a_diffusers_checkpoint(shared):
    writer = checkpoint_writer()
    config = json.loads((shared / "models" / "tiny_kl_config.json").read_text())
    want = {k: tuple(v.shape) for k, v in load_file(shared / "models" / "tiny_kl.safetensors").items()}
    assert writer.shapes(config) == want


@pytest.mark.parametrize("preset", ["sdxl", "flux2"])
def test_tiny_sd_class_checkpoints_export_and_encode(preset, binary, kodak4, tmp_path):
    """The bench's SDXL and FLUX.2 configs, shrunk (two 32/64-channel levels), export and encode."""
    writer = checkpoint_writer()
    config = {**writer.PRESETS[preset], "block_out_channels": [32, 64], "layers_per_block": 1,
              "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    vae = writer.write(config, tmp_path / "vae")
    onnx = tmp_path / "onnx"
    proc = subprocess.run([str(binary), "export", "--checkpoint", str(vae), "--out", str(onnx), "--dtype", "f16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run_precompute(binary, ["--input", kodak4, "--out", tmp_path / "out", "--model", onnx / "card.toml",
                            "--size", SIZE, "--threads", 2])
    latents = tensor(read_shards(tmp_path / "out", SIZE), "latent")
    channels = config["latent_channels"] * (4 if preset == "flux2" else 1)
    side = SIZE // 2 // (2 if preset == "flux2" else 1)
    assert latents.shape == (4, channels, side, side)
    assert np.isfinite(latents.astype(np.float32)).all() and latents.std() > 0
