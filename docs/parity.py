"""Parity of exported graphs with diffusers' goldens, per case and tensor (the numbers of
docs/families.md; tests/python/test_export_families.py asserts the same within tolerances).

    python docs/parity.py ../shared/models/families/qwen-image EXPORT_DIR

EXPORT_DIR is what `vae-pipeline export --checkpoint <that folder> --out EXPORT_DIR` wrote (f32
or `--dtype f16`). Prints max |a − b| and max |a − b| / max |golden| for `encoder_output`,
`latent_normalized` (the card's normalization applied here) and `decoded` (the decoder on the
golden mean).
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort


def normalize(card: dict, z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    if "latents_mean" in card:
        z = (z - np.array(card["latents_mean"])[None, :, None, None]) / np.array(card["latents_std"])[None, :, None, None]
    return (z - card["shift_factor"]) * card["scaling_factor"]


def main() -> None:
    family, export = Path(sys.argv[1]), Path(sys.argv[2])
    golden = np.load(family / "golden.npz")
    card = tomllib.loads((export / "card.toml").read_text())
    enc = ort.InferenceSession(str(export / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(export / "decoder.onnx"), providers=["CPUExecutionProvider"])
    io = np.float16 if enc.get_inputs()[0].type == "tensor(float16)" else np.float32
    channels = card["latent_channels"]
    print(f"{family.name} ({export}): max abs / max rel per tensor")
    for case in sorted({k.split("/")[0] for k in golden.files}):
        g = {name: golden[f"{case}/{name}"] for name in ("input", "encoder_output", "latent_normalized", "decoded")}
        encoded = enc.run(None, {"image": (g["input"] * 2 - 1).astype(io)})[0].astype(np.float64)
        image = dec.run(None, {"latent": g["encoder_output"][:, :channels].astype(io)})[0].astype(np.float64)
        row = []
        for name, got in (("encoder_output", encoded), ("latent_normalized", normalize(card, encoded[:, :channels])),
                          ("decoded", image)):
            err = np.abs(got - g[name]).max()
            row.append(f"{name} {err:.1e} / {err / np.abs(g[name]).max():.1e}")
        print(f"  {case:30s} " + " | ".join(row))


if __name__ == "__main__":
    main()
