"""vae-pipeline from Python: the binary that ships in this wheel, and readers for its shard sets.

- `find_bin()`: the installed `vae-pipeline` executable (as uv's `find_uv_bin`).
- `read(shards)`: a shard set (or one shape folder of it) as a pyarrow Table whose tensor
  columns are ready for `to_numpy_ndarray()`.
- `ShardRoot`: where a set lives, a folder or `s3://bucket/prefix` (pyarrow's S3 file system,
  configured from the usual `AWS_*` environment, `AWS_ENDPOINT_URL` included).
- `vae_pipeline.dataset`: a PyTorch-style dataset, sampler and collate for training.
"""
from __future__ import annotations

import json
import os
import re
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["find_bin", "read", "unfinished", "ShardRoot", "FORMAT_VERSION"]

#: The shard format these readers understand (FORMAT.md in the repository).
FORMAT_VERSION = "2"

# <W>x<H> (images) or <W>x<H>x<T> (clip windows of T frames).
_SHAPE_DIR = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")
_DONE_MARKER = re.compile(r"^p(\d+)\.json$")


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


class ShardRoot:
    """A shard set's root (or one of its `<W>x<H>` folders): a local folder or an object-store
    URL such as `s3://bucket/prefix`, read through one pyarrow file system."""

    def __init__(self, location):
        text = str(location)
        if "://" in text:
            self.fs, path = pafs.FileSystem.from_uri(text)
        else:
            self.fs, path = pafs.LocalFileSystem(), str(Path(text).resolve())
        self.path = path.rstrip("/")
        self.uri = text
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def folders(self) -> list[tuple[str, str]]:
        """(name, path) of the folders directly under the root."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((i.base_name, i.path) for i in infos if i.type == pafs.FileType.Directory)

    def parts(self, folder: str) -> list[str]:
        """The `part-*.parquet` shards in a folder, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return sorted(i.path for i in infos
                      if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                      and i.base_name.endswith(".parquet"))

    def parquet_file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(path, filesystem=self.fs)

    def read_table(self, path: str, columns=None) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.fs, memory_map=self.local)


def _shape_folders(root: ShardRoot) -> list[tuple[str, str]]:
    if _SHAPE_DIR.match(root.name) and root.parts(root.path):
        return [(root.name, root.path)]
    return [(n, p) for n, p in root.folders() if _SHAPE_DIR.match(n)]


def unfinished(root: ShardRoot) -> str | None:
    """Why the set at `root` is unfinished (no `_SUCCESS`) and how to finish it, or None."""
    if root.exists("_SUCCESS"):
        return None
    if not root.exists("_plan.json"):
        return (f"{root.uri}/_SUCCESS is missing: the precompute run did not finish "
                "(run it again with the same settings, it resumes)")
    with root.fs.open_input_stream(f"{root.path}/_plan.json") as f:
        partitions = int(json.load(f)["partitions"])
    infos = root.fs.get_file_info(pafs.FileSelector(f"{root.path}/_partitions", allow_not_found=True))
    done = {int(m.group(1)) for i in infos if (m := _DONE_MARKER.match(i.base_name))}
    missing = [p for p in range(partitions) if p not in done]
    if not missing:
        return (f"{root.uri}/_SUCCESS is missing: all {partitions} partitions are done but the run was "
                f"not finalized (run `vae-pipeline finalize {root.uri}`)")
    shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
    return (f"{root.uri}/_SUCCESS is missing: {partitions - len(missing)} of {partitions} partitions are "
            f"done, partitions {shown} are not (finish them, then run `vae-pipeline finalize {root.uri}`)")


def read(shards, shape: str | None = None, *, require_success: bool = True) -> pa.Table:
    """Read a shard set's rows into one pyarrow Table, tensor columns combined into single
    chunks: `read(s).column("latent").chunk(0).to_numpy_ndarray()` is `(N, C, h, w)`.

    `shards` is a `precompute --out` folder or one of its `<W>x<H>` folders, local or an
    `s3://bucket/prefix` URL. A set with several window sizes (buckets) holds tensors of several
    shapes: pass `shape="WxH"` to pick one. As `LatentsDataset`, a set whose run has not
    finished (no `_SUCCESS`, partitions missing) is refused unless `require_success=False`.
    """
    root = ShardRoot(shards)
    if require_success and not (_SHAPE_DIR.match(root.name) and root.parts(root.path)):
        why = unfinished(root)
        if why is not None:
            raise FileNotFoundError(why + "; or pass require_success=False to read the rows there are")
    folders = _shape_folders(root)
    if shape is not None:
        folders = [f for f in folders if f[0] == shape]
    if not folders:
        raise FileNotFoundError(f"no <W>x<H>/part-*.parquet shards under {root.uri}" + (f" for {shape}" if shape else ""))
    if len(folders) > 1:
        names = ", ".join(name for name, _ in folders)
        raise ValueError(f"{root.uri} holds several window sizes ({names}): pass shape= one of them")
    files = root.parts(folders[0][1])
    for f in files:
        meta = root.parquet_file(f).metadata.metadata or {}
        version = meta.get(b"vae_pipeline.format_version", b"1").decode()
        if version != FORMAT_VERSION:
            raise ValueError(f"{f}: shard format {version}, this reader reads format {FORMAT_VERSION}")
    table = pa.concat_tables(root.read_table(f) for f in files)
    return table.combine_chunks()
