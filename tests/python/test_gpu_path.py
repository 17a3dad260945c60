"""The host side of the GPU path, on the CPU: fp16 batches and latent column storage.

- `--latent-compression` stores tensor columns plain, zstd or BYTE_STREAM_SPLIT + zstd; every
  setting holds the same latents, to the bit, read by pyarrow, and `verify` accepts the set.
- An fp16 encoder's run (f16 batches written by the batcher, f16 latents converted on the write
  pool) stores the same latents as the fp32 path within fp16 tolerance, for f16 and bf16.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from vp_helpers import read_shards, run_precompute, shard_files, tensor

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
