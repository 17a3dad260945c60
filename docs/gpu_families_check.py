"""GPU check of the 2025-2026 families: CUDA vs CPU on the same exported graphs.

On the GPU machine, from the repo root, with the ONNX Runtime CUDA bundle set up as
benches/gpu/device_check.sh does (LD_LIBRARY_PATH, ORT_DYLIB_PATH) and the tiny configs of
../shared/models/families copied to CONFIGS/<family>.json:

    python3 docs/gpu_families_check.py /path/to/vae-pipeline CONFIGS OUT_DIR

For each family it writes a random-weight checkpoint of the tiny config (shapes from
docs/random_checkpoint.py; the safetensors file is written here, as the GPU machine has no
safetensors package), exports it f32 and f16, precomputes 8 generated 256x256 images with
--device cpu and --device cuda, and prints the max difference of the stored latents relative to
their scale. Nothing here asserts a time.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def save_file(tensors: dict[str, np.ndarray], path) -> None:
    """A safetensors file of f32 tensors: 8-byte header length, JSON header, data."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        data = np.ascontiguousarray(value, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)


# random_checkpoint imports safetensors.numpy.save_file; this one stands in for it.
sys.modules["safetensors"] = types.ModuleType("safetensors")
sys.modules["safetensors.numpy"] = types.SimpleNamespace(save_file=save_file)
sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402

# The generator covers the RMS-norm DC-AE layout (Sana), not the batch-norm `-in` one.
SHAPES = {"qwen-image": rc.wan, "wan2.2": rc.wan, "dc-ae-f32c32-sana": rc.dcae, "hunyuanimage-2.1": rc.hunyuan}


def latents(shards: Path) -> np.ndarray:
    table = pq.read_table(sorted(shards.rglob("*.parquet"))[0]).sort_by("key")
    return np.stack([np.asarray(v, np.float64) for v in table.column("latent").to_pylist()])


def main() -> None:
    binary, configs, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    work = Path("/tmp/families-gpu")
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    for i in range(8):
        img = np.stack([np.sin(x * 0.03 * (i + 1)), np.cos(y * 0.02 * (i + 2)), np.sin((x + y) * 0.01)], -1)
        Image.fromarray(np.clip(img * 100 + 128, 0, 255).astype(np.uint8)).save(images / f"{i}.png")
    results = []
    for family, shapes in SHAPES.items():
        config = json.loads((configs / f"{family}.json").read_text())
        for key in ("encoder_block_types", "decoder_block_types"):
            if isinstance(config.get(key), str):
                config[key] = [config[key]] * len(config["encoder_block_out_channels"])
        rng = np.random.default_rng(0)
        tensors = {}
        for name, shape in shapes(config).items():
            last = name.rsplit(".", 1)[-1]
            if last == "bias":
                tensors[name] = np.zeros(shape, np.float32)
            elif last == "gamma" or len(shape) == 1:
                tensors[name] = np.ones(shape, np.float32)
            else:
                tensors[name] = rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))
        checkpoint = work / family
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "config.json").write_text(json.dumps(config))
        save_file(tensors, checkpoint / "diffusion_pytorch_model.safetensors")
        for dtype in ("f32", "f16"):
            export = work / f"{family}-{dtype}"
            subprocess.run([binary, "export", "--checkpoint", checkpoint, "--out", export, "--dtype", dtype], check=True)
            stored = {}
            for device in ("cpu", "cuda"):
                shards = work / f"{family}-{dtype}-{device}"
                subprocess.run([binary, "precompute", "--input", images, "--out", shards, "--model",
                                export / "card.toml", "--size", "256", "--dtype", "f32", "--device", device,
                                "--batch-size", "4"], check=True)
                stored[device] = latents(shards)
            err = float(np.abs(stored["cuda"] - stored["cpu"]).max() / np.abs(stored["cpu"]).max())
            results.append({"family": family, "dtype": dtype, "cuda_vs_cpu": err,
                            "finite": bool(np.isfinite(stored["cuda"]).all())})
            print(f"{family} {dtype}: CUDA vs CPU max |diff| / max |cpu| = {err:.2e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
