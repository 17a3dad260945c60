"""Many-worker runs at scale, on paper backed by measurement (docs/many-machines.md).

1. `plan` over a listing of U units (one-byte `.jpg` files in folders of 1,000; no image is read)
   into P partitions: wall time and peak RSS.
2. The resume index of one worker at U committed rows: a shard set holding one row per unit
   (synthesized with pyarrow from a real shard's schema and metadata), resumed by `precompute`
   over the same folder, which skips every row as committed: wall time and peak RSS.
3. `status` and `finalize` over P partitions: P done markers and P one-row shards.

    python benches/partition_scale.py BINARY AVGPOOL8_CARD KODAK_IMAGE [UNITS] [PARTITIONS] [--plan-only]

Defaults: 1,000,000 units, 10,000 partitions. `--plan-only` measures step 1 alone, over zero-byte
files (no data blocks: 10 million fit on a small disk). Prints one JSON line per measurement.
"""
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def measure(name: str, cmd: list[str], expect_ok: bool = True) -> dict:
    """Wall time and peak RSS of `cmd`, run in a fresh child so ru_maxrss is its own."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.monotonic(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(r.returncode, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stderr[-2000:])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *map(str, cmd)], capture_output=True, text=True, check=True)
    rc, seconds, kib = out.stdout.split()
    if expect_ok and rc != "0":
        sys.exit(f"{name} failed ({rc}):\n{out.stderr}")
    result = {"step": name, "seconds": round(float(seconds), 2), "peak_rss_mib": round(int(kib) / 1024, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    plan_only = "--plan-only" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--plan-only"]
    binary, card, image = args[:3]
    units = int(args[3]) if len(args) > 3 else 1_000_000
    partitions = int(args[4]) if len(args) > 4 else 10_000
    flags = ["--model", card, "--size", "8", "--threads", "2"]
    with tempfile.TemporaryDirectory(prefix="vp-scale-") as tmp:
        tmp = Path(tmp)
        listing = tmp / "in"
        keys = []
        for i in range(units):
            d = listing / f"d{i // 1000:04d}"
            if i % 1000 == 0:
                d.mkdir(parents=True)
            name = f"f{i:07d}.jpg"
            if plan_only:
                (d / name).touch()
            else:
                (d / name).write_bytes(b"x")
            keys.append(f"{d.name}/{name}")

        # 1. The plan over every unit.
        measure(f"plan {units} units", [binary, "plan", "--input", listing, "--out", tmp / "planned", *flags,
                                        "--partitions", partitions])
        if plan_only:
            return

        # 2. A worker's resume index at `units` committed rows.
        one = tmp / "one"
        one.mkdir()
        shutil.copy(image, one / "x.png")
        real = tmp / "set"
        subprocess.run([binary, "precompute", "--input", one, "--out", real, *flags], check=True,
                       capture_output=True)
        shard = next(real.glob("*/part-*.parquet"))
        schema = pq.read_schema(shard)
        shard.unlink()
        (real / "_SUCCESS").unlink()
        content = hashlib.sha256(b"x").digest()
        latent_type = schema.field("latent").type
        rows = 65536
        for n, start in enumerate(range(0, units, rows)):
            k = keys[start:start + rows]
            storage = pa.array([[0.0] * 4] * len(k), pa.list_(pa.float16(), 4))
            columns = {
                "key": pa.array(k),
                "source_sha256": pa.array([content] * len(k), pa.binary(32)),
                **{c: pa.array([0] * len(k), pa.int32()) for c in
                   ("orig_width", "orig_height", "crop_top", "crop_left", "width", "height")},
                "latent": pa.ExtensionArray.from_storage(latent_type, storage),
                "caption": pa.array([None] * len(k), pa.string()),
            }
            pq.write_table(pa.table(columns, schema=schema), shard.parent / f"part-{n:05d}.parquet")
        measure(f"resume {units} committed rows", [binary, "precompute", "--input", listing, "--out", real, *flags])

        # 3. status and finalize over `partitions` done partitions.
        planned = tmp / "planned"
        small = next(real.glob("*/part-00000.parquet"))
        one_row = pq.read_table(small).slice(0, 1)
        shape_dir = planned / small.parent.name
        shape_dir.mkdir()
        (planned / "_partitions").mkdir(exist_ok=True)
        shutil.copy(real / "_config.toml", planned / "_config.toml")
        buf = pa.BufferOutputStream()
        pq.write_table(one_row, buf)
        body = buf.getvalue().to_pybytes()
        for p in range(partitions):
            (shape_dir / f"part-p{p:05d}-00000.parquet").write_bytes(body)
            (planned / "_partitions" / f"p{p:05d}.json").write_text(json.dumps({
                "partition": p, "rows": 1, "encoded": 1, "failures": {}, "keys_sha256": "",
                "shards": [{"path": f"{shape_dir.name}/part-p{p:05d}-00000.parquet", "rows": 1}],
                "finished": "", "host": ""}))
        measure(f"status over {partitions} partitions", [binary, "status", planned, "--json"])
        measure(f"finalize over {partitions} partitions", [binary, "finalize", planned])


if __name__ == "__main__":
    main()
