"""Shared helpers for the Python reader tests of vae-pipeline.

Everything here reads the binary's output with third-party readers (pyarrow, Pillow, hashlib)
so that the tests compare the binary against independent references, never against itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"

#: Parquet key-value metadata keys every shard must carry (the contract).
METADATA_KEYS = (
    "vae_pipeline.version",
    "vae_pipeline.model",
    "vae_pipeline.encoder_sha256",
    "vae_pipeline.scaling_factor",
    "vae_pipeline.shift_factor",
    "vae_pipeline.latent_mode",
    "vae_pipeline.dtype",
    "vae_pipeline.resize",
    "vae_pipeline.format_version",
    "vae_pipeline.normalization",
    "vae_pipeline.identity_hash",
    "vae_pipeline.identity",
)

INT32_COLUMNS = ("orig_width", "orig_height", "crop_top", "crop_left", "width", "height")


def require(path: Path, what: str) -> Path:
    """Fail (never skip) with a clear message when a needed file is missing."""
    path = Path(path)
    if not path.exists():
        pytest.fail(f"missing {what}: {path} does not exist", pytrace=False)
    return path


def sha256_file(path: Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def pooling_encoder(path: Path, channels: int, seed: int = 0) -> Path:
    """A real ONNX encoder built with onnx's own helpers: x [N,3,H,W] -> AveragePool 8x8 -> 1x1 conv
    to `channels` (fixed random weights). It stands in for autoencoders of other channel counts
    (FLUX.1's 16, FLUX.2's 32) at their factor 8."""
    import onnx
    from onnx import TensorProto, helper

    w = np.random.default_rng(seed).standard_normal((channels, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
         helper.make_node("Conv", ["pooled", "w"], ["latent"])],
        "pooling_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["n", channels, "h8", "w8"])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.flatten())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_precompute(binary: Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `vae-pipeline precompute ARGS`; fail with the command, exit code and stderr if it fails."""
    cmd = [str(binary), "precompute", *[str(a) for a in args]]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstderr:\n{e.stderr}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"vae-pipeline exited with {proc.returncode}\ncommand: {' '.join(cmd)}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-3000:]}",
            pytrace=False,
        )
    return proc


def shard_dir(out: Path, size: int) -> Path:
    return require(Path(out) / f"{size}x{size}", f"shard folder for {size}x{size} in the run output")


def shard_files(out: Path, size: int) -> list[Path]:
    files = sorted(shard_dir(out, size).glob("part-*.parquet"))
    assert files, f"no part-*.parquet files in {shard_dir(out, size)}: {os.listdir(shard_dir(out, size))}"
    return files


def read_shards(out: Path, size: int) -> pa.Table:
    """All shards of one shape, concatenated and sorted by key (pyarrow)."""
    tables = [pq.read_table(f) for f in shard_files(out, size)]
    table = pa.concat_tables(tables)
    return table.sort_by("key")


def tensor(table: pa.Table, column: str) -> np.ndarray:
    """(N, C, h, w) numpy array of a fixed_shape_tensor column, read the documented pyarrow way."""
    col = table.column(column).combine_chunks()
    assert isinstance(col.type, pa.FixedShapeTensorType), (
        f"column {column!r} is {col.type}, not arrow.fixed_shape_tensor"
    )
    return col.to_numpy_ndarray()


def file_metadata(path: Path) -> dict[str, str]:
    """The Parquet footer's key-value metadata (raw, as every Parquet reader sees it)."""
    md = pq.ParquetFile(path).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in md.items()}


def expected_crop(orig_w: int, orig_h: int, size: int) -> tuple[int, int, int, int]:
    """Contract's center-crop geometry: (resized_w, resized_h, crop_left, crop_top)."""
    if orig_w <= orig_h:  # shorter side is the width
        short, long = orig_w, orig_h
    else:
        short, long = orig_h, orig_w
    new_long = (long * size + short // 2) // short
    off = (new_long - size) // 2
    if orig_w <= orig_h:
        return size, new_long, 0, off
    return new_long, size, off, 0


@contextlib.contextmanager
def moto_server(**env):
    """A real S3 API on loopback: `moto_server` (PyPI moto[server]) on a free port, stopped on exit.
    `env` goes to the server (e.g. INITIAL_NO_AUTH_ACTION_COUNT="0" makes it check credentials).
    Yields the endpoint URL."""
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_bin = require(Path(sys.executable).with_name("moto_server"), "moto_server (tests/requirements.txt)")
    server = subprocess.Popen(
        [str(server_bin), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"moto_server did not start on {endpoint}", pytrace=False)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def s3_env(endpoint: str, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    """The environment an S3 client (ours, boto3, pyarrow) needs for `endpoint`."""
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """`os.environ` updated with `env` inside the block, restored after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
