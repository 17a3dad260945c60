"""Peak RSS of a prune against the run's own peak (docs/performance.md).

Makes N distinct small PNGs, encodes them with avgpool8 at 1024² in f32 into one shard of N rows
(4x128x128 f32 = 256 KiB per row), changes one image and reruns: the rerun re-encodes that image
and rewrites the shard without its old row. Prints both runs' peak RSS (ru_maxrss of the child).

    python benches/prune_rss.py BINARY CARD [N]
"""
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def peak_rss_mib(cmd: list[str]) -> float:
    """Runs cmd in a fresh Python child so ru_maxrss is that command's alone."""
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    kib = int(out.stdout.strip())
    if kib < 0:
        raise RuntimeError(out.stderr)
    return kib / 1024


def noise_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def measure(binary: str, card: str, n: int, work: Path) -> dict:
    images = work / "in"
    images.mkdir()
    for i in range(n):
        noise_png(images / f"{i:05d}.png", i)
    out = work / "out"
    cmd = [binary, "precompute", "--input", str(images), "--out", str(out), "--model", card,
           "--size", "1024", "--dtype", "f32", "--shard-rows", str(n), "--threads", "2"]
    first = peak_rss_mib(cmd)
    noise_png(images / "00000.png", n + 1)
    prune = peak_rss_mib(cmd)
    largest = max(f.stat().st_size for f in out.glob("1024x1024/part-*.parquet"))
    return {"rows": n, "shard_mib": round(largest / 2**20, 1),
            "first_run_peak_mib": round(first, 1), "prune_run_peak_mib": round(prune, 1)}


if __name__ == "__main__":
    binary, card = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(measure(binary, card, n, Path(d))))
