#!/usr/bin/env python3
"""Independent references for `vae-pipeline report`, written with code nobody here wrote
(scikit-image, Pillow, onnxruntime, numpy).

    python report_reference.py metrics DIR

DIR holds image pairs NAME.a.npy / NAME.b.npy (float32, HWC, values in [0, 1]). Prints one JSON
object: NAME -> {"psnr", "ssim", "win_size", "skimage_default_raises"} (psnr "inf" when equal), where
  psnr = skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0)  (inf for identical images)
  ssim = skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1.0,
         gaussian_weights=True, sigma=1.5, use_sample_covariance=False[, win_size=s])
Images with a side under 11 make skimage's default call raise; for them win_size=s is passed, s
being the largest odd number <= the shorter side (the behaviour vae-pipeline documents).
Both images are converted to float64 first, so skimage computes in float64.

As a module it also gives `reconstruct(...)`: the Python round trip the report's numbers are
checked against (Pillow resize, onnxruntime encoder and decoder, numpy PSNR), and the helpers the
report tests share (`report_card`, `run_report`).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_KW = dict(channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def ssim_window(h: int, w: int) -> int:
    s = min(h, w, 11)
    return s if s % 2 == 1 else s - 1


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, int, bool]:
    """(ssim, win_size used, whether skimage's default call raises) for HWC float images."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    h, w = a.shape[:2]
    try:
        value = structural_similarity(a, b, **SSIM_KW)
        return float(value), 11, False
    except ValueError:
        s = ssim_window(h, w)
        return float(structural_similarity(a, b, win_size=s, **SSIM_KW)), s, True


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR with data range 1 over all pixels and channels: 10*log10(1/MSE), inf when equal."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if np.array_equal(a, b):
        return math.inf  # skimage divides by zero here (with a warning) and gives inf too
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def metrics(folder: Path) -> dict:
    out = {}
    for a_path in sorted(folder.glob("*.a.npy")):
        name = a_path.name[: -len(".a.npy")]
        a = np.load(a_path)
        b = np.load(folder / f"{name}.b.npy")
        value, win, raises = skimage_ssim(a, b)
        p = psnr(a, b)
        out[name] = {
            "psnr": p if math.isfinite(p) else "inf",  # JSON has no infinity
            "ssim": value,
            "win_size": win,
            "skimage_default_raises": raises,
        }
    return out


def reconstruct(image_path: Path, size: int, encoder, decoder, input_range=(0.0, 1.0)):
    """(original, reconstruction, raw latent) for one image, the way the report defines it.

    original: Pillow center crop (tests/python/pillow_center_crop.py) as float32 HWC in [0, 1];
    reconstruction: decoder(encoder(x)) mapped from input_range to [0, 1] and clamped, HWC;
    encoder/decoder: onnxruntime InferenceSessions (single input, single output).
    """
    from pillow_center_crop import center_crop

    u8, _ = center_crop(image_path, size)
    x01 = u8.astype(np.float32) / np.float32(255)
    lo, hi = input_range
    x = (lo + x01 * (hi - lo)).transpose(2, 0, 1)[None].astype(np.float32)
    z = encoder.run(None, {encoder.get_inputs()[0].name: x})[0]
    y = decoder.run(None, {decoder.get_inputs()[0].name: z})[0][0]
    y01 = np.clip((y - lo) / (hi - lo), 0.0, 1.0).transpose(1, 2, 0)
    return x01, y01.astype(np.float32), z[0]


def report_card(shared: Path, folder: Path) -> Path:
    """A TAEF2 card with its decoder, pointing at shared/models (no `make models` needed)."""
    from vp_helpers import require as _require

    m = shared / "models"
    card = folder / "taef2.toml"
    card.write_text(
        'name = "taef2"\n'
        f'encoder = "{_require(m / "taef2_encoder.onnx", "TAEF2 encoder").resolve()}"\n'
        f'decoder = "{_require(m / "taef2_decoder.onnx", "TAEF2 decoder").resolve()}"\n'
        'input_range = [0.0, 1.0]\noutput = "latent"\nlatent_channels = 32\nspatial_factor = 8\n'
        "scaling_factor = 1.0\nshift_factor = 0.0\n"
    )
    return card


def run_report(binary: Path, args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `vae-pipeline report ARGS`; fail the test with its stderr when it fails."""
    import pytest

    cmd = [str(binary), "report", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}", pytrace=False)
    return proc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "metrics":
        print(__doc__, file=sys.stderr)
        return 2
    json.dump(metrics(Path(argv[1])), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
