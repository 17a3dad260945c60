"""Latent column storage: size and speed of `--latent-compression` none, zstd:L and split-zstd:L.

Usage: python benches/latent_compression.py SHARDS [--copies N]

SHARDS is the --out folder of a precompute run (real latents: their bytes decide what
compresses). Its `latent` column is tiled N times (compressibility is per value, so copies
only make the timing measurable) and written by pyarrow with each setting; every file is read
back and checked equal. Prints one table: MiB, ratio to plain, write and read MB/s of raw
latent bytes (fastest of --repeat). pyarrow's zstd and BYTE_STREAM_SPLIT are the same algorithms as the Rust writer's;
the ranking, not the absolute speed, is what carries over.
"""

import argparse
import glob
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

SETTINGS = [("none", None, False)] + [
    (f"{name}:{level}", level, split)
    for level in (1, 3, 9)
    for name, split in (("zstd", False), ("split-zstd", True))
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="the fastest of this many writes and reads")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.shards, "*", "*.parquet")))
    if not files:
        raise SystemExit(f"no shards under {args.shards}/*/: run precompute first")
    chunks = [c for f in files for c in pq.read_table(f, columns=["latent"])["latent"].chunks]
    latent = pa.concat_arrays([getattr(c, "storage", c) for c in chunks])
    table = pa.table({"latent": pa.concat_arrays([latent] * args.copies)})
    kind = table.schema.field("latent").type
    raw = table.num_rows * kind.list_size * kind.value_type.byte_width
    print(f"{table.num_rows} latents ({latent.type}), {raw / 2**20:.1f} MiB of raw values")
    print(f"{'setting':<14} {'MiB':>8} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
    plain = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, level, split in SETTINGS:
            path = os.path.join(tmp, "t.parquet")
            writes, reads = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                write(table, path, level, split)
                t1 = time.perf_counter()
                back = pq.read_table(path)
                writes.append(t1 - t0)
                reads.append(time.perf_counter() - t1)
            assert back["latent"].combine_chunks() == table["latent"].combine_chunks(), name
            size = os.path.getsize(path)
            plain = plain or size
            print(
                f"{name:<14} {size / 2**20:8.2f} {size / plain:6.3f} "
                f"{raw / min(writes) / 1e6:11.0f} {raw / min(reads) / 1e6:10.0f}"
            )


def write(table, path, level, split):
    pq.write_table(
        table,
        path,
        compression="none" if level is None else "zstd",
        compression_level=level,
        use_dictionary=False,
        write_statistics=False,
        use_byte_stream_split=["latent.list.element", "latent.list.item"] if split else False,
    )


if __name__ == "__main__":
    main()
