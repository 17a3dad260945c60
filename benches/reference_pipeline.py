#!/usr/bin/env python3
"""A competent Python peer of `vae-pipeline precompute` (default settings), for benchmarks.

    benches/reference_pipeline.py --input DIR --out DIR --model {avgpool8,taef2} \\
        [--size 256] [--threads T] [--batch-size B] [--shard-rows R] [--draft [--draft-gap G]]

What it does, as the binary does by default:
  * walks --input recursively, image files sorted by key (path relative to --input, '/'-separated);
  * T worker processes (multiprocessing.Pool(T), ordered imap with a bounded in-flight window) read
    each file's bytes and sha256, decode with Pillow, apply ImageOps.exif_transpose, convert to RGB
    (alpha composited on white, gray replicated) and apply the center-crop policy of
    tests/python/pillow_center_crop.py: scale to cover SIZE x SIZE with Image.LANCZOS (shorter side
    SIZE, long side (long*SIZE + short//2)//short), crop the centre at ((new - SIZE)//2). Only the
    kept window is resampled (Image.resize's `box`), which is the same filter at the same sample
    positions as resize-then-crop; workers hand back uint8 HWC windows;
  * the main process normalizes a batch of B to float32 NCHW in [0, 1] and runs ONNX Runtime
    (CPU; intra_op_num_threads=T, inter_op_num_threads=1, ORT_ENABLE_ALL, no spinning, as the
    binary), while the workers decode the next images;
  * a writer thread stores rows (key, source_sha256, geometry, latent as float16
    arrow.fixed_shape_tensor [C, h, w]) in zstd (level 3) Parquet shards OUT/SxS/part-NNNNN.parquet
    of at most R rows; failures go to OUT/_errors.jsonl; OUT/_SUCCESS gets the summary.

--draft is a second, faster-but-lossier variant: JPEGs are decoded with Image.draft("RGB", ...) at
the smallest DCT scale (1/2, 1/4, 1/8) whose result is still at least GAP times the cover size
(GAP = --draft-gap, default 2.0 like Image.thumbnail's reducing_gap), then resized as above.
Note: for 768x512 inputs at --size 256 the cover is 384x256, so GAP 2 requests the full size and
draft changes nothing; GAP 1 decodes at 1/2 scale (384x256) and skips most of the resampling.

Prints one JSON line: images, failed, seconds, images_per_second and where the time went.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = 178956970  # Pillow's bomb limit, as --max-pixels


# ---------------------------------------------------------------------------------------------
# Decode + resize (worker processes)
# ---------------------------------------------------------------------------------------------

def cover_size(w: int, h: int, size: int) -> tuple[int, int]:
    """Resized (w, h) that covers size x size: shorter side = size, the long side rounded."""
    if w <= h:
        return size, (h * size + w // 2) // w
    return (w * size + h // 2) // h, size


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with gray replicated and alpha (if any) composited on white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


_SIZE = 256
_DRAFT_GAP = 0.0  # 0 = no draft


def _init_worker(size: int, draft_gap: float) -> None:
    global _SIZE, _DRAFT_GAP
    _SIZE, _DRAFT_GAP = size, draft_gap


def decode_resize(job: tuple[str, str]):
    """(key, path) -> (key, sha256, geometry tuple, window bytes) or (key, sha256, None, error)."""
    key, path = job
    size = _SIZE
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return key, b"", None, f"io: {e}"
    sha = hashlib.sha256(data).digest()
    if not data:
        return key, sha, None, "empty: zero-byte file"
    try:
        im = Image.open(io.BytesIO(data))
        raw_w, raw_h = im.size
        orientation = im.getexif().get(0x0112, 1)
        upright_w, upright_h = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
        if _DRAFT_GAP > 0 and im.format == "JPEG":
            cw, ch = cover_size(raw_w, raw_h, size)  # the cover is symmetric under transposition
            im.draft("RGB", (int(cw * _DRAFT_GAP), int(ch * _DRAFT_GAP)))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        img = to_rgb(im)
        w, h = img.size  # may be smaller than upright_* after draft
        nw, nh = cover_size(upright_w, upright_h, size)
        left, top = (nw - size) // 2, (nh - size) // 2
        sx, sy = w / nw, h / nh  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        out = img.resize((size, size), Image.LANCZOS, box=box)
        return key, sha, (upright_w, upright_h, top, left), out.tobytes()
    except Exception as e:  # noqa: BLE001 - a bad image is recorded, never fatal
        return key, sha, None, f"corrupt: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# Writing (a background thread)
# ---------------------------------------------------------------------------------------------

class ShardWriter(threading.Thread):
    """Consumes (keys, shas, geoms, latents f16) batches; writes zstd Parquet shards."""

    def __init__(self, out: Path, size: int, shard_rows: int, model: str, row_group_rows: int = 1024):
        super().__init__(name="writer", daemon=True)
        self.pa = None  # imported in run(): the import overlaps the session start-up
        self.pq = None
        self.dir = out / f"{size}x{size}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.shard_rows = shard_rows
        self.row_group_rows = min(row_group_rows, shard_rows)
        self.model = model
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.busy = 0.0
        self.shards = 0
        self.rows = 0
        self._pending: list = []
        self._pending_rows = 0
        self._writer = None
        self._rows_in_shard = 0
        self._tmp: Path | None = None
        self._final: Path | None = None

    def put(self, item) -> None:
        if self.error is not None:
            raise RuntimeError("writer failed") from self.error
        self.q.put(item)

    def run(self) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.pa, self.pq = pa, pq
            while True:
                item = self.q.get()
                if item is None:
                    break
                t0 = time.perf_counter()
                self._add(*item)
                self.busy += time.perf_counter() - t0
            t0 = time.perf_counter()
            self._flush()
            self._close_shard()
            self.busy += time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            self.error = e
            while True:  # keep draining so the producer never blocks forever
                if self.q.get() is None:
                    break

    def _add(self, keys, shas, geoms, lat16) -> None:
        # Arrays are built from buffers: pa.array() on Python or numpy input imports pandas when
        # it is installed (~0.4 s of start-up that has nothing to do with the work).
        pa = self.pa
        n = len(keys)
        buf = lambda a: pa.py_buffer(np.ascontiguousarray(a))  # noqa: E731
        i32 = lambda a: pa.Array.from_buffers(pa.int32(), n, [None, buf(np.asarray(a, np.int32))])  # noqa: E731
        g = np.asarray(geoms, dtype=np.int32).reshape(n, 4)
        encoded = [k.encode() for k in keys]
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum([len(k) for k in encoded], out=offsets[1:])
        shape = list(lat16.shape[1:])
        flat = pa.Array.from_buffers(pa.float16(), lat16.size, [None, buf(lat16)])
        latent = pa.ExtensionArray.from_storage(
            pa.fixed_shape_tensor(pa.float16(), shape),
            pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape))),
        )
        cols = {
            "key": pa.Array.from_buffers(pa.string(), n, [None, buf(offsets), pa.py_buffer(b"".join(encoded))]),
            "source_sha256": pa.Array.from_buffers(pa.binary(32), n, [None, pa.py_buffer(b"".join(shas))]),
            "orig_width": i32(g[:, 0]),
            "orig_height": i32(g[:, 1]),
            "crop_top": i32(g[:, 2]),
            "crop_left": i32(g[:, 3]),
            "width": i32(np.full(n, self.size)),
            "height": i32(np.full(n, self.size)),
            "latent": latent,
        }
        batch = pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))
        start = 0
        while start < n:  # split at shard boundaries
            room = self.shard_rows - self._rows_in_shard - self._pending_rows
            take = min(room, n - start)
            self._pending.append(batch.slice(start, take))
            self._pending_rows += take
            start += take
            if self._rows_in_shard + self._pending_rows >= self.shard_rows:
                self._flush()
                self._close_shard()
            elif self._pending_rows >= self.row_group_rows:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        pq = self.pq
        table = self.pa.Table.from_batches(self._pending)
        if self._writer is None:
            self._final = self.dir / f"part-{self.shards:05d}.parquet"
            self._tmp = self.dir / f".{self._final.name}.tmp"
            schema = table.schema.with_metadata({
                "vae_pipeline.model": self.model,
                "vae_pipeline.dtype": "f16",
                "vae_pipeline.resize": "center-crop",
                "vae_pipeline.producer": "benches/reference_pipeline.py",
            })
            self._writer = pq.ParquetWriter(
                self._tmp, schema, compression="zstd", compression_level=3,
                use_dictionary=["key"], write_statistics=["key"],
            )
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata),
                                 row_group_size=self._pending_rows)
        self._rows_in_shard += self._pending_rows
        self.rows += self._pending_rows
        self._pending, self._pending_rows = [], 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._final)
        self._writer = None
        self._rows_in_shard = 0
        self.shards += 1


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def discover(root: Path) -> list[tuple[str, str]]:
    jobs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTS:
                p = Path(dirpath) / name
                jobs.append((p.relative_to(root).as_posix(), str(p)))
    jobs.sort()
    return jobs


def model_path(model: str) -> Path:
    p = Path(model)
    if p.suffix == ".onnx" and p.exists():
        return p
    return REPO / "models" / "onnx" / f"{model}_encoder.onnx"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", required=True, help="avgpool8, taef2 (models/onnx/<m>_encoder.onnx) or an .onnx path")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--draft", action="store_true", help="JPEG DCT-domain downscaling (Image.draft) before the resize")
    ap.add_argument("--draft-gap", type=float, default=2.0, help="with --draft: decode to >= GAP x the cover size (default 2.0)")
    ap.add_argument("--overwrite", action="store_true", help="accepted for symmetry; the output folder is always replaced")
    a = ap.parse_args(argv)
    if a.size % 8 or a.size <= 0:
        ap.error("--size must be a positive multiple of 8")
    if a.threads < 1 or a.batch_size < 1 or a.shard_rows < 1:
        ap.error("--threads, --batch-size and --shard-rows must be >= 1")
    if a.draft and a.draft_gap <= 0:
        ap.error("--draft-gap must be > 0")
    if not a.input.is_dir():
        ap.error(f"--input {a.input} is not a folder")
    onnx_file = model_path(a.model)
    if not onnx_file.exists():
        ap.error(f"no encoder for --model {a.model}: {onnx_file} does not exist")

    t_start = time.perf_counter()
    jobs = discover(a.input)
    if a.out.exists():
        import shutil
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)

    T, B, S = a.threads, a.batch_size, a.size
    # Fork the workers before ONNX Runtime starts its threads.
    pool = mp.Pool(T, initializer=_init_worker, initargs=(S, a.draft_gap if a.draft else 0.0))
    writer = ShardWriter(a.out, S, a.shard_rows, a.model)
    writer.start()

    # Bounded in-flight window: Pool.imap has no back-pressure of its own, and decoded windows
    # would pile up in the parent when the encoder is the slower stage.
    chunksize = max(1, min(8, B // T))
    window = threading.Semaphore(2 * B + 2 * chunksize * T)
    stop = threading.Event()

    def feed():
        for job in jobs:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield job

    # Decoding starts now, overlapping the ONNX Runtime import and session start-up.
    it = pool.imap(decode_resize, feed(), chunksize)

    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = T
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
        in_name = sess.get_inputs()[0].name
        out_name = sess.get_outputs()[0].name

        batch_u8 = np.empty((B, S, S, 3), np.uint8)
        keys: list[str] = []
        shas: list[bytes] = []
        geoms: list[tuple] = []
        errors: list[dict] = []
        busy = {"wait_decode": 0.0, "normalize": 0.0, "encode": 0.0}
        encoded = 0

        def run_batch() -> None:
            nonlocal encoded, keys, shas, geoms
            n = len(keys)
            if n == 0:
                return
            t0 = time.perf_counter()
            x = np.empty((n, 3, S, S), np.float32)
            np.divide(batch_u8[:n].transpose(0, 3, 1, 2), np.float32(255.0), out=x)
            t1 = time.perf_counter()
            lat = sess.run([out_name], {in_name: x})[0]
            t2 = time.perf_counter()
            busy["normalize"] += t1 - t0
            busy["encode"] += t2 - t1
            writer.put((keys, shas, geoms, lat.astype(np.float16)))
            encoded += n
            keys, shas, geoms = [], [], []

        while True:
            t0 = time.perf_counter()
            try:
                key, sha, geom, payload = next(it)
            except StopIteration:
                break
            finally:
                busy["wait_decode"] += time.perf_counter() - t0
            window.release()
            if geom is None:
                kind, _, msg = payload.partition(": ")
                errors.append({"key": key, "kind": kind, "message": msg})
                continue
            batch_u8[len(keys)] = np.frombuffer(payload, np.uint8).reshape(S, S, 3)
            keys.append(key)
            shas.append(sha)
            geoms.append(geom)
            if len(keys) == B:
                run_batch()
        run_batch()
    finally:
        stop.set()
        writer.q.put(None)
        writer.join()
        pool.terminate()
        pool.join()
    if writer.error is not None:
        raise RuntimeError("writer failed") from writer.error
    assert "pandas" not in sys.modules, "pandas got imported: a pa.array() call crept in"

    with open(a.out / "_errors.jsonl", "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
    seconds = time.perf_counter() - t_start
    summary = {
        "peer": "reference_pipeline.py" + (f" --draft (gap {a.draft_gap:g})" if a.draft else ""),
        "model": a.model,
        "images": encoded,
        "failed": len(errors),
        "seconds": round(seconds, 4),
        "images_per_second": round(encoded / seconds, 3) if seconds > 0 else None,
        "threads": T,
        "batch_size": B,
        "shards": writer.shards,
        "busy_seconds": {k: round(v, 4) for k, v in {**busy, "write": writer.busy}.items()},
    }
    (a.out / "_SUCCESS").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
