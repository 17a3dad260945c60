"""vae-pipeline from Python: the binary that ships in this wheel, and readers for its shard sets.

- `find_bin()`: the installed `vae-pipeline` executable (as uv's `find_uv_bin`).
- `read(shards)`: a shard set (or one shape folder of it) as a pyarrow Table whose tensor
  columns are ready for `to_numpy_ndarray()`.
- `vae_pipeline.dataset`: a PyTorch-style dataset, sampler and collate for training.
"""
from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["find_bin", "read", "FORMAT_VERSION"]

#: The shard format these readers understand (FORMAT.md in the repository).
FORMAT_VERSION = "2"

_SHAPE_DIR = re.compile(r"^(\d+)x(\d+)$")


def find_bin() -> str:
    """The `vae-pipeline` executable installed with this package."""
    exe = "vae-pipeline" + (sysconfig.get_config_var("EXE") or "")
    candidates = [Path(sysconfig.get_path("scripts")) / exe]
    user_scheme = f"{os.name}_user" if sys.version_info < (3, 10) else sysconfig.get_preferred_scheme("user")
    candidates.append(Path(sysconfig.get_path("scripts", scheme=user_scheme)) / exe)
    # pip install --target: the scripts land in <target>/bin beside the package.
    candidates.append(Path(__file__).resolve().parents[1] / "bin" / exe)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        "the vae-pipeline executable was not found; looked in " + ", ".join(map(str, candidates))
    )


def _shape_folders(root: Path) -> list[Path]:
    if _SHAPE_DIR.match(root.name) and any(root.glob("part-*.parquet")):
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and _SHAPE_DIR.match(d.name))


def read(shards, shape: str | None = None) -> pa.Table:
    """Read a shard set's rows into one pyarrow Table, tensor columns combined into single
    chunks: `read(s).column("latent").chunk(0).to_numpy_ndarray()` is `(N, C, h, w)`.

    `shards` is a `precompute --out` folder or one of its `<W>x<H>` folders. A set with several
    window sizes (buckets) holds tensors of several shapes: pass `shape="WxH"` to pick one.
    """
    root = Path(shards)
    folders = _shape_folders(root)
    if shape is not None:
        folders = [f for f in folders if f.name == shape]
    if not folders:
        raise FileNotFoundError(f"no <W>x<H>/part-*.parquet shards under {root}" + (f" for {shape}" if shape else ""))
    if len(folders) > 1:
        names = ", ".join(f.name for f in folders)
        raise ValueError(f"{root} holds several window sizes ({names}): pass shape= one of them")
    files = sorted(folders[0].glob("part-*.parquet"))
    for f in files:
        meta = pq.read_metadata(f).metadata or {}
        version = meta.get(b"vae_pipeline.format_version", b"1").decode()
        if version != FORMAT_VERSION:
            raise ValueError(f"{f}: shard format {version}, this reader reads format {FORMAT_VERSION}")
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return table.combine_chunks()
