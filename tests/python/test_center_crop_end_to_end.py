"""Decode + center-crop resize, end to end, against Pillow.

The avgpool8 "encoder" is linear (8x8 average pool, then a fixed 1x1 conv 3->4 with bias -0.5),
so its latents can be recomputed in numpy from Pillow's center crop (pillow_center_crop.py). This
checks, through the binary, the contract's decode rules (gray replicated, alpha composited on white,
EXIF orientation applied), the crop geometry and the antialiased Lanczos3 resize, with no ONNX
Runtime on the Python side.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillow_center_crop import center_crop
from vp_helpers import read_shards, require, run_precompute, sha256_file, tensor

SIZE = 64
# avgpool8_encoder.onnx (models/README.md): latent[o] = sum_c W[o, c] * avgpool8(x)[c] + B[o]
W = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.33, 0.33, 0.34]], dtype=np.float64)
B = -0.5
# per-pixel Pillow-vs-Rust differences of d levels move a pooled latent by at most d/255 (rows of W sum to 1)
ATOL_PNG = 0.004  # ~1 level (measured: <= 6e-4, i.e. 0.15 level)
ATOL_JPEG = 0.008  # plus JPEG decoder differences (up to ~2 levels per pixel, FACTS.md)


def avgpool8_reference(rgb_u8: np.ndarray) -> np.ndarray:
    x = rgb_u8.astype(np.float64) / 255.0  # (H, W, 3)
    h, w, _ = x.shape
    pooled = x.reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))  # (h/8, w/8, 3)
    return np.einsum("oc,yxc->oyx", W, pooled) + B  # (4, h/8, w/8)


def _smooth_rgb(w: int, h: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 127 + 120 * np.sin((xx + 2 * yy) / (7 + seed))
    img = np.stack([r, g, b], -1)
    # a hard-edged disc so crop offsets and orientation matter
    cy, cx, rad = h * 0.3, w * 0.65, min(w, h) * 0.2
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad**2] = (20, 200, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def crop_run(binary, cards, shared, tmp_path_factory):
    base = tmp_path_factory.mktemp("crop")
    inp = base / "in"
    inp.mkdir()
    kodak = require(shared / "data" / "kodak", "Kodak image folder")
    for name in ("kodim01.png", "kodim04.png"):
        shutil.copyfile(require(kodak / name, "Kodak image"), inp / name)
    # 8-bit gray, 100x80
    Image.fromarray(_smooth_rgb(100, 80, 1)[..., 1], "L").save(inp / "gray_100x80.png")
    # RGBA with an alpha ramp and a fully transparent stripe, 90x120
    rgba = np.dstack([_smooth_rgb(90, 120, 2), np.tile(np.linspace(0, 255, 90).astype(np.uint8), (120, 1))])
    rgba[40:60, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(inp / "alpha_90x120.png")
    # upscaling: 48x40 RGB
    Image.fromarray(_smooth_rgb(48, 40, 3), "RGB").save(inp / "small_48x40.png")
    # JPEG stored 120x80 with EXIF orientation 6 (rotate 90 CW to display): upright 80x120
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_smooth_rgb(120, 80, 4), "RGB").save(
        inp / "exif6_120x80.jpg", "JPEG", quality=95, subsampling=0, exif=exif
    )
    out = base / "out"
    run_precompute(binary, [
        "--input", inp, "--out", out, "--model", cards["avgpool8"], "--size", SIZE,
        "--dtype", "f32", "--threads", 2,
    ])
    return inp, read_shards(out, SIZE)


def test_rows_and_geometry(crop_run):
    inp, table = crop_run
    expected = sorted(p.name for p in inp.iterdir())
    assert table.column("key").to_pylist() == expected
    for row in table.to_pylist():
        path = inp / row["key"]
        _, g = center_crop(path, SIZE)
        got = (row["orig_width"], row["orig_height"], row["crop_left"], row["crop_top"], row["width"], row["height"])
        want = (g["orig_w"], g["orig_h"], g["crop_left"], g["crop_top"], SIZE, SIZE)
        assert got == want, f"{row['key']}: (orig_w, orig_h, crop_left, crop_top, w, h) = {got}, Pillow/contract says {want}"
        assert row["source_sha256"] == sha256_file(path), row["key"]


@pytest.mark.parametrize(
    "key",
    ["kodim01.png", "kodim04.png", "gray_100x80.png", "alpha_90x120.png", "small_48x40.png", "exif6_120x80.jpg"],
)
def test_latent_matches_pillow_center_crop(crop_run, key):
    inp, table = crop_run
    keys = table.column("key").to_pylist()
    assert key in keys, f"{key} missing from the shards (keys: {keys})"
    lat = tensor(table, "latent")[keys.index(key)].astype(np.float64)
    assert lat.shape == (4, SIZE // 8, SIZE // 8), lat.shape
    ref = avgpool8_reference(center_crop(inp / key, SIZE)[0])
    diff = np.abs(lat - ref)
    atol = ATOL_JPEG if key.endswith(".jpg") else ATOL_PNG
    worst = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
    assert float(diff.max()) <= atol, (
        f"{key}: avgpool8 latent vs Pillow center crop: max abs diff {diff.max():.4f} at {worst} "
        f"(got {lat[worst]:.4f}, want {ref[worst]:.4f}), mean abs diff {diff.mean():.4f}; "
        f"~{diff.max() * 255:.1f} levels (> {atol * 255:.1f})"
    )
    assert float(diff.mean()) <= atol / 4, f"{key}: mean abs diff {diff.mean():.4f}"
