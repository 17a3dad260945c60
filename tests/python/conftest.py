"""Fixtures for the Python half of the vae-pipeline tests.

- `shared`: the read-only test material at <repo>/../shared (models, golden tensors, Kodak).
- `binary`: the vae-pipeline executable ($VAE_PIPELINE_BIN, else <repo>/target/release/vae-pipeline).
- `cards`: model-card TOMLs written to a tmp dir, pointing at absolute paths in shared/models,
  so the tests do not depend on `make models` having filled <repo>/models/onnx.

A missing file is a test failure with a clear message, never a skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vp_helpers import REPO, SHARED, require

# Hugging Face `datasets` must never try the network in these tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared() -> Path:
    require(SHARED, "shared test material (expected at <repo>/../shared)")
    require(SHARED / "models", "shared models folder")
    return SHARED


@pytest.fixture(scope="session")
def binary() -> Path:
    env = os.environ.get("VAE_PIPELINE_BIN")
    path = Path(env) if env else REPO / "target" / "release" / "vae-pipeline"
    if not path.is_file():
        how = "$VAE_PIPELINE_BIN" if env else "the default path (build it with `cargo build --release`)"
        pytest.fail(f"vae-pipeline binary not found at {path} ({how})", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"vae-pipeline binary at {path} is not executable", pytrace=False)
    return path


# name -> (onnx file, input_range, output kind, latent_channels, spatial_factor, scaling, shift)
CARD_SPECS = {
    "taef2": ("taef2_encoder.onnx", (0.0, 1.0), "latent", 32, 8, 1.0, 0.0),
    "taef2-fp16": ("taef2_encoder_fp16.onnx", (0.0, 1.0), "latent", 32, 8, 1.0, 0.0),
    "tiny-kl": ("tiny_kl_encoder.onnx", (-1.0, 1.0), "moments", 4, 2, 0.18215, 0.0),
    "avgpool8": ("avgpool8_encoder.onnx", (0.0, 1.0), "latent", 4, 8, 1.0, 0.0),
}


@pytest.fixture(scope="session")
def cards(shared, tmp_path_factory) -> dict[str, Path]:
    """Card name -> path of a card TOML pointing at the absolute ONNX path in shared/models."""
    d = tmp_path_factory.mktemp("cards")
    out = {}
    for name, (onnx, rng, kind, ch, factor, scale, shift) in CARD_SPECS.items():
        enc = require(shared / "models" / onnx, f"ONNX encoder for card {name}")
        text = (
            f'name = "{name}"\n'
            f'encoder = "{enc.resolve()}"\n'
            f"input_range = [{rng[0]!r}, {rng[1]!r}]\n"
            f'output = "{kind}"\n'
            f"latent_channels = {ch}\n"
            f"spatial_factor = {factor}\n"
            f"scaling_factor = {scale!r}\n"
            f"shift_factor = {shift!r}\n"
        )
        p = d / f"{name}.toml"
        p.write_text(text)
        out[name] = p
    return out
