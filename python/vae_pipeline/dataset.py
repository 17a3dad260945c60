"""Read a vae-pipeline shard set as a map-style dataset, with a bucket-aware batch sampler.

Needs only pyarrow and numpy. PyTorch is optional: the dataset has `__len__` and `__getitem__`,
so `torch.utils.data.DataLoader` takes it as it is, and `as_torch=True` returns tensors.

A shard set is the `--out` folder of `vae-pipeline precompute`: one `<W>x<H>/` folder per input
shape (one per bucket with `--resize bucket`), each holding `part-*.parquet` files whose `latent`
column is an `arrow.fixed_shape_tensor` [C, H/f, W/f]. See FORMAT.md in the repository.

Each item is a dict:

    latent         float32 (C, h, w), (C, T', h, w) for clip windows: numpy array, or torch
                   tensor with as_torch=True
    original_size  (orig_height, orig_width)      SDXL's original_size
    crop_top_left  (crop_top, crop_left)          SDXL's crops_coords_top_left (mirrored if flipped)
    target_size    (height, width)                SDXL's target_size
    caption        str or None
    key            path of the source image relative to --input
    bucket         (W, H) of the shard folder, (W, H, T) for clip windows of T frames
    flipped        whether the horizontally mirrored latent (`latent_flip`) was returned
    frame_start, frame_count, frame_indices, source_fps, fps
                   clip windows only: the window's frames (FORMAT.md "Clips")

Training loop (SDXL-style micro-conditioning; batches never mix shapes):

    from vae_pipeline.dataset import LatentsDataset, BucketBatchSampler, collate, worker_init_fn

    ds = LatentsDataset("shards/", flip=True, seed=0, as_torch=True)
    sampler = BucketBatchSampler(ds, batch_size=16, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=4, worker_init_fn=worker_init_fn)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                 # a new shuffle each epoch, same on every rank
        for batch in loader:
            z = batch["latent"].to(device)       # (B, C, h, w), already scaled for diffusion
            add_time_ids = torch.cat([batch["original_size"], batch["crop_top_left"],
                                      batch["target_size"]], dim=1)   # (B, 6), SDXL order
            ...

Latent modes (file metadata `vae_pipeline.latent_mode`):
- `mean` / `sample`: the stored latent is returned as it is.
- `dist`: the shards hold `latent` (scaled mean) and `latent_std` (scaled std); every access draws
  `latent + latent_std * eps`, eps ~ N(0, 1), from the dataset's numpy Generator (seed=...), so
  each epoch sees a fresh sample of the posterior, as training from images would.

Flip (`flip=True`, needs shards written with `precompute --flip`): each access returns the latent
of the mirrored crop (`latent_flip`, and `latent_flip_std` in dist mode) with probability 1/2,
from the same Generator. The crop offset is mirrored with it: crop_left becomes
`resized_width - width - crop_left`, with the resized width recomputed from the shards' resize
policy (center-crop, random-crop, bucket: cover; pad: fit; stretch: the target).

Randomness and DataLoader workers: each worker process gets a copy of the dataset and so of its
Generator; pass `worker_init_fn=worker_init_fn` (it reseeds each worker's copy from torch's
per-worker seed) so the workers do not draw the same noise and flips.

Memory: only the footers are read up front (row counts, schema, metadata). A shard file's columns
are read (memory-mapped, then decompressed) on the first access to one of its rows and kept in an
LRU cache of `max_cached_shards` files (None = keep all). The BucketBatchSampler visits the
buckets in a shuffled order, so with a bounded cache prefer shard files no larger than what you
can hold a few of, or leave the cache unbounded when the latents fit in RAM.

bf16 shards (`vae_pipeline.dtype = "bf16"`) store the 16 bits as uint16; they are decoded to
float32 exactly: `(bits.astype(uint32) << 16).view(float32)`.
"""
from __future__ import annotations

import bisect
import json
import operator
import re
import threading
from collections import OrderedDict
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_pipeline import FORMAT_VERSION  # the shard format this loader reads (FORMAT.md "Versions")
from vae_pipeline import ShardRoot, unfinished

__all__ = ["LatentsDataset", "BucketBatchSampler", "collate", "worker_init_fn", "decode_latents"]

# <W>x<H> (images) or <W>x<H>x<T> (clip windows of T frames): the bucket is (W, H) or (W, H, T).
_BUCKET_DIR = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")
_TENSOR_COLUMNS = ("latent", "latent_std", "latent_flip", "latent_flip_std")
_SCALAR_COLUMNS = ("orig_width", "orig_height", "crop_top", "crop_left", "width", "height")
# A clip set's window columns (FORMAT.md "Clips"), handed on with each item when present.
_WINDOW_COLUMNS = ("frame_start", "frame_count", "frame_indices", "source_fps", "fps")
_META = "vae_pipeline."


def decode_latents(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored latent values (f16, f32, or bf16 bits as uint16) as a new float32 array."""
    if dtype == "bf16":
        if stored.dtype != np.uint16:
            raise TypeError(f"bf16 shards must store uint16 bits, got {stored.dtype}")
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)  # always a copy: callers may modify it


def _resized_width(policy: str, ow: int, oh: int, W: int, H: int) -> Optional[int]:
    """Width the source was resized to before the W x H window was cut, per the resize contract.

    cover (center-crop, random-crop, bucket): scale = max(W/ow, H/oh), round half up, >= W;
    fit (pad): scale = min(W/ow, H/oh), round half up, in [1, W]; stretch: W. None if unknown.
    """
    p = policy.strip().lower()
    if p.startswith("stretch"):
        return W
    cover = p.startswith(("center", "random", "bucket", "crop"))
    fit = p.startswith("pad")
    if not (cover or fit):
        return None
    width_decides = (W * oh >= H * ow) if cover else (W * oh <= H * ow)
    rw = W if width_decides else (2 * ow * H + oh) // (2 * oh)
    return max(rw, W) if cover else min(max(rw, 1), W)


def _bucket(m: re.Match) -> tuple[int, ...]:
    """(W, H), or (W, H, T) for a folder of clip windows."""
    return tuple(int(g) for g in m.groups() if g is not None)


class _Shard:
    __slots__ = ("path", "bucket", "start", "rows")

    def __init__(self, path: str, bucket: tuple[int, int], start: int, rows: int):
        self.path, self.bucket, self.start, self.rows = path, bucket, start, rows


class LatentsDataset:
    """Map-style dataset over a shard set folder (see the module docstring).

    Args:
        root: the `precompute --out` folder (with `<W>x<H>/` subfolders), or one `<W>x<H>` folder;
            local, or an `s3://bucket/prefix` URL (pyarrow's S3 file system, `AWS_*` environment).
        flip: return the mirrored latent with probability 1/2 (needs a `latent_flip` column).
        resample: in `dist` mode, draw latent + std * eps on each access (False: the mean).
        seed: seed of the numpy Generator for dist resampling and flips (None: fresh entropy).
        as_torch: return `latent` as a torch.Tensor (needs torch).
        max_cached_shards: decoded shard files kept in memory (None: all that were touched).
        require_success: refuse a shard set whose `_SUCCESS` is missing (an unfinished run).
    """

    def __init__(self, root, *, flip: bool = False, resample: bool = True, seed: Optional[int] = None,
                 as_torch: bool = False, max_cached_shards: Optional[int] = None,
                 require_success: bool = True):
        self._store = ShardRoot(root)
        self.root = self._store.uri
        if not self._store.is_dir():
            raise FileNotFoundError(f"shard set folder not found: {self.root}")
        self.flip = bool(flip)
        self.resample = bool(resample)
        self.as_torch = bool(as_torch)
        if self.as_torch:
            try:
                import torch  # noqa: F401
            except ImportError as e:  # torch stays optional
                raise ImportError("as_torch=True needs PyTorch; install torch or use numpy items") from e
        if max_cached_shards is not None and max_cached_shards < 1:
            raise ValueError("max_cached_shards must be >= 1 or None")
        self.max_cached_shards = max_cached_shards
        self._rng = np.random.default_rng(seed)
        self._cache: "OrderedDict[int, dict[str, Any]]" = OrderedDict()
        self._lock = threading.Lock()

        folders = self._bucket_folders(require_success)
        self._shards: list[_Shard] = []
        self._bucket_ranges: "OrderedDict[tuple[int, int], range]" = OrderedDict()
        self._latent_shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        meta0: Optional[dict[str, str]] = None
        columns0: Optional[set[str]] = None
        total = 0
        for bucket, folder in folders:
            files = self._store.parts(folder)
            first = total
            for f in files:
                pf = self._store.parquet_file(f)
                meta = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()
                        if k.decode().startswith(_META)}
                names = set(pf.schema_arrow.names)
                if meta.get(_META + "format_version") != FORMAT_VERSION:
                    raise ValueError(f"{f}: shard format {meta.get(_META + 'format_version', '1')!r}, this loader "
                                     f"reads format {FORMAT_VERSION} (FORMAT.md); rewrite the set with this version")
                if meta0 is None:
                    meta0, columns0 = meta, names
                else:
                    for k in ("latent_mode", "dtype", "scaling_factor", "shift_factor", "identity_hash"):
                        if meta.get(_META + k) != meta0.get(_META + k):
                            raise ValueError(f"{f}: {_META}{k} = {meta.get(_META + k)!r} differs from "
                                             f"{meta0.get(_META + k)!r} in the first shard: mixed shard sets")
                    if names != columns0:
                        raise ValueError(f"{f}: columns {sorted(names)} differ from {sorted(columns0)}")
                ltype = pf.schema_arrow.field("latent").type
                if not isinstance(ltype, pa.FixedShapeTensorType):
                    raise TypeError(f"{f}: latent is {ltype}, not arrow.fixed_shape_tensor")
                shape = tuple(ltype.shape)
                if self._latent_shapes.setdefault(bucket, shape) != shape:
                    raise ValueError(f"{f}: latent shape {shape} differs from {self._latent_shapes[bucket]}")
                rows = pf.metadata.num_rows
                if rows:
                    self._shards.append(_Shard(f, bucket, total, rows))
                    total += rows
            if total > first:
                self._bucket_ranges[bucket] = range(first, total)
        if meta0 is None:
            raise FileNotFoundError(f"no part-*.parquet shards under {self.root}")
        self._len = total
        self._starts = [s.start for s in self._shards]
        self.metadata: dict[str, str] = {k[len(_META):]: v for k, v in meta0.items()}
        self.latent_mode = self.metadata.get("latent_mode", "mean")
        self.dtype = self.metadata.get("dtype", "f16")
        self.scaling_factor = float(self.metadata.get("scaling_factor", "1"))
        self.shift_factor = float(self.metadata.get("shift_factor", "0"))
        self.resize_policy = self.metadata.get("resize", "center-crop")
        self.columns = sorted(columns0)
        self._dist = self.latent_mode == "dist" and self.resample
        if self.latent_mode == "dist" and "latent_std" not in columns0:
            raise ValueError("latent_mode is dist but the shards have no latent_std column")
        if self.flip:
            if "latent_flip" not in columns0:
                raise ValueError("flip=True needs shards written with `precompute --flip` (no latent_flip column)")
            if self._dist and "latent_flip_std" not in columns0:
                raise ValueError("dist shards with latent_flip lack latent_flip_std")
        needed = {"latent", "key", "caption", *_SCALAR_COLUMNS, *_WINDOW_COLUMNS}
        if self._dist:
            needed.add("latent_std")
        if self.flip:
            needed.add("latent_flip")
            if self._dist:
                needed.add("latent_flip_std")
        self._read_columns = [c for c in self._store.parquet_file(self._shards[0].path).schema_arrow.names
                              if c in needed] if self._shards else []

    # ------------------------------------------------------------------ discovery and layout
    def _bucket_folders(self, require_success: bool) -> list[tuple[tuple[int, int], str]]:
        store = self._store
        m = _BUCKET_DIR.match(store.name)
        if m and store.parts(store.path):  # one bucket folder given directly
            return [(_bucket(m), store.path)]
        why = unfinished(store) if require_success else None
        if why is not None:
            raise FileNotFoundError(why + "; or pass require_success=False to read what is there")
        out = []
        for name, path in store.folders():
            m = _BUCKET_DIR.match(name)
            if m:
                out.append((_bucket(m), path))
        return sorted(out)  # by (W, H)

    def __len__(self) -> int:
        return self._len

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(W, H) of every non-empty bucket, sorted."""
        return list(self._bucket_ranges)

    def bucket_ranges(self) -> "OrderedDict[tuple[int, int], range]":
        """bucket (W, H) -> the contiguous range of dataset indices in it."""
        return OrderedDict(self._bucket_ranges)

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self._shards[self._locate(index)[0]].bucket

    def latent_shape(self, bucket: tuple[int, int]) -> tuple[int, ...]:
        """(C, h, w) of the latents in one bucket."""
        return self._latent_shapes[tuple(bucket)]

    def reseed(self, seed) -> None:
        """Replace the Generator (seed: int, sequence of ints or SeedSequence)."""
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ loading
    def _locate(self, index: int) -> tuple[int, int]:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for {self._len} items")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._shards[s].start

    def _load(self, s: int) -> dict[str, Any]:
        with self._lock:
            data = self._cache.get(s)
            if data is not None:
                self._cache.move_to_end(s)
                return data
        table = self._store.read_table(self._shards[s].path, columns=self._read_columns)
        data = {}
        for name in self._read_columns:
            col = table.column(name)
            if name in _TENSOR_COLUMNS:
                arr = col.combine_chunks()
                if not isinstance(arr.type, pa.FixedShapeTensorType):
                    raise TypeError(f"{self._shards[s].path}: {name} is {arr.type}, not arrow.fixed_shape_tensor")
                data[name] = arr.to_numpy_ndarray()  # (N, C, h, w), stored dtype
            elif name in _SCALAR_COLUMNS:
                data[name] = col.to_numpy()
            else:
                data[name] = col.to_pylist()
        with self._lock:
            self._cache[s] = data
            if self.max_cached_shards is not None:
                while len(self._cache) > self.max_cached_shards:
                    self._cache.popitem(last=False)
        return data

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, r = self._locate(index)
        data = self._load(s)
        flipped = bool(self.flip and self._rng.random() < 0.5)
        name = "latent_flip" if flipped else "latent"
        latent = decode_latents(data[name][r], self.dtype)
        if self._dist:
            std = decode_latents(data[name + "_std"][r], self.dtype)
            latent += std * self._rng.standard_normal(latent.shape, dtype=np.float32)
        ow, oh = int(data["orig_width"][r]), int(data["orig_height"][r])
        W, H = int(data["width"][r]), int(data["height"][r])
        top, left = int(data["crop_top"][r]), int(data["crop_left"][r])
        if flipped:
            rw = _resized_width(self.resize_policy, ow, oh, W, H)
            if rw is not None:
                left = rw - W - left
        if self.as_torch:
            import torch
            latent = torch.from_numpy(latent)
        item = {
            "latent": latent,
            "original_size": (oh, ow),
            "crop_top_left": (top, left),
            "target_size": (H, W),
            "caption": data["caption"][r],
            "key": data["key"][r],
            "bucket": self._shards[s].bucket,
            "flipped": flipped,
        }
        for name in _WINDOW_COLUMNS:
            if name in data:
                item[name] = data[name][r]
        return item

    def __repr__(self) -> str:
        return (f"LatentsDataset({str(self.root)!r}, {self._len} items, buckets={self.buckets}, "
                f"mode={self.latent_mode}, dtype={self.dtype}, flip={self.flip})")


class BucketBatchSampler:
    """Batches of dataset indices, each batch from one bucket (so its latents stack).

    Each epoch: the indices of every bucket are shuffled (shuffle=True), cut into batches of
    `batch_size` (the last, shorter batch of a bucket is dropped with drop_last=True), and the
    batches of all buckets are shuffled together, so consecutive steps alternate between bucket
    shapes as in SDXL's multi-aspect training. Without drop_last every index appears exactly once
    per epoch.

    The order is a function of (seed, epoch) only: call `set_epoch(epoch)` at the start of every
    epoch (as with torch's DistributedSampler) for a new order; the same seed and epoch give the
    same batches in any process. Pass it as `DataLoader(ds, batch_sampler=sampler, ...)`.
    """

    def __init__(self, dataset: LatentsDataset, batch_size: int, shuffle: bool = True,
                 seed: Optional[int] = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        self.epoch = 0
        self._ranges = [(b, r) for b, r in dataset.bucket_ranges().items()]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for _, rg in self._ranges:
            idx = np.arange(rg.start, rg.stop)
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append(chunk.tolist())
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        n = 0
        for _, rg in self._ranges:
            full, rest = divmod(len(rg), self.batch_size)
            n += full + (1 if rest and not self.drop_last else 0)
        return n


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a one-bucket batch: latent (B, C, h, w); sizes as (B, 2) int64; lists for the rest.

    Arrays are numpy, or torch tensors when the items' latents are tensors.
    """
    if not items:
        raise ValueError("empty batch")
    shapes = {tuple(it["latent"].shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"a batch mixes latent shapes {sorted(shapes)}: use BucketBatchSampler")
    first = items[0]["latent"]
    if isinstance(first, np.ndarray):
        stack, ints = np.stack, (lambda v: np.asarray(v, dtype=np.int64))
    else:
        import torch
        stack, ints = torch.stack, (lambda v: torch.as_tensor(v, dtype=torch.int64))
    out = {"latent": stack([it["latent"] for it in items])}
    for k in ("original_size", "crop_top_left", "target_size"):
        out[k] = ints([it[k] for it in items])
    for k in ("caption", "key", "bucket", "flipped"):
        out[k] = [it[k] for it in items]
    return out


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker's dataset copy its own Generator.

    torch seeds each worker with base_seed + worker_id (base_seed drawn anew every epoch from the
    main process' torch RNG, so `torch.manual_seed` makes the whole run reproducible).
    """
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed([info.seed % (1 << 63), worker_id])


if __name__ == "__main__":  # python -m vae_pipeline.dataset SHARDS: a short description of a shard set
    import sys

    ds = LatentsDataset(sys.argv[1])
    print(ds)
    for b, rg in ds.bucket_ranges().items():
        print(f"  {b[0]}x{b[1]}: {len(rg)} rows, latent {ds.latent_shape(b)}")
    print(json.dumps({k: v for k, v in ds.metadata.items() if k != "identity"}, indent=1))
    item = ds[0]
    print({k: (v.shape if hasattr(v, "shape") else v) for k, v in item.items()})
