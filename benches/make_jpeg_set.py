#!/usr/bin/env python3
"""Generate a benchmark set of N distinct Kodak-like JPEGs.

    benches/make_jpeg_set.py OUT_DIR N [--kodak DIR] [--jobs J]

Writes OUT_DIR/img-00000.jpg ... img-{N-1}.jpg: baseline JPEG, quality 90, 4:2:0, 768x512 or
512x768 (the size of the source photo). File i is Kodak photo i % 24, copy k = i // 24:
  - copy 0 is the photo itself;
  - copy k > 0 is a crop of a few pixels (amounts derived from k) resized back to the original
    size with Lanczos, mirrored when k is odd, so every file has distinct pixels and bytes.
File i depends only on (i, generator version), so a larger set extends a smaller one.

Idempotent: OUT_DIR/.jpegset.json records the generator version and N. When it matches and all
N files are there, nothing is done; when only N differs, extra files are removed and missing
ones written; when the version differs, the set is rebuilt. An OUT_DIR that holds other files
and no stamp is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

from PIL import Image

VERSION = 1
STAMP = ".jpegset.json"
QUALITY = 90
REPO = Path(__file__).resolve().parents[1]
DEFAULT_KODAK = REPO.parent / "shared" / "data" / "kodak"


def name_of(i: int) -> str:
    return f"img-{i:05d}.jpg"


def variation(k: int) -> tuple[tuple[int, int, int, int], bool]:
    """(left, top, right, bottom) crop margins in pixels and mirror flag for copy k.

    Distinct k give distinct (margins, mirror) pairs for k < 2 * 4**4 = 512 copies
    (12288 files); beyond that the margins repeat with a larger step, still distinct.
    """
    if k == 0:
        return (0, 0, 0, 0), False
    mirror = bool(k & 1)
    m = k >> 1  # 0.. ; digits in base 4 give the four margins (1..4 px)
    digits = []
    for _ in range(4):
        digits.append(m % 4)
        m //= 4
    step = 1 + m  # only grows past 511 copies
    margins = tuple(1 + d * step for d in digits)
    return margins, mirror  # type: ignore[return-value]


_SOURCES: list[Image.Image] = []


def _init(paths: list[str]) -> None:
    global _SOURCES
    _SOURCES = []
    for p in paths:
        with Image.open(p) as im:
            _SOURCES.append(im.convert("RGB"))


def _make(args: tuple[int, str]) -> str:
    i, out = args
    src = _SOURCES[i % len(_SOURCES)]
    k = i // len(_SOURCES)
    (l, t, r, b), mirror = variation(k)
    img = src
    if (l, t, r, b) != (0, 0, 0, 0):
        w, h = src.size
        img = src.crop((l, t, w - r, h - b)).resize((w, h), Image.LANCZOS)
    if mirror:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    path = Path(out) / name_of(i)
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, "JPEG", quality=QUALITY, subsampling=2, optimize=False, progressive=False)
    os.replace(tmp, path)
    return path.name


def sources_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--kodak", type=Path, default=DEFAULT_KODAK, help="folder of kodim*.png (default: ../shared/data/kodak)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error("N must be >= 1")
    srcs = sorted(a.kodak.glob("*.png"))
    if not srcs:
        print(f"make_jpeg_set: no *.png in {a.kodak}", file=sys.stderr)
        return 2
    stamp = {"generator": "make_jpeg_set", "version": VERSION, "quality": QUALITY, "sources": sources_digest(srcs)}
    out: Path = a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stamp_path = out / STAMP
    ours = {p.name for p in out.glob("img-*.jpg")}
    others = {p.name for p in out.iterdir()} - ours - {STAMP}
    old = None
    if stamp_path.exists():
        try:
            old = json.loads(stamp_path.read_text())
        except ValueError:
            old = None
    elif ours or others:
        print(f"make_jpeg_set: {out} is not empty and has no {STAMP}; refusing to touch it", file=sys.stderr)
        return 2
    if others:
        print(f"make_jpeg_set: {out} holds files this script did not write: {sorted(others)[:5]}", file=sys.stderr)
        return 2
    want = {name_of(i) for i in range(a.n)}
    same_gen = old is not None and {k: old.get(k) for k in stamp} == stamp
    if same_gen and old.get("n") == a.n and ours == want:
        print(f"make_jpeg_set: {out} already holds {a.n} images (version {VERSION}); nothing to do")
        return 0
    stamp_path.unlink(missing_ok=True)  # the set is in flux until the stamp is rewritten
    if not same_gen:
        for name in ours:
            (out / name).unlink()
        ours = set()
    for name in ours - want:
        (out / name).unlink()
    todo = sorted(int(n[4:9]) for n in want - ours)
    if todo:
        jobs = max(1, min(a.jobs, len(todo)))
        with mp.Pool(jobs, initializer=_init, initargs=([str(p) for p in srcs],)) as pool:
            for _ in pool.imap_unordered(_make, [(i, str(out)) for i in todo], chunksize=8):
                pass
    # Guard the "distinct" promise.
    digests = {}
    for i in range(a.n):
        d = hashlib.sha256((out / name_of(i)).read_bytes()).digest()
        if d in digests:
            print(f"make_jpeg_set: {name_of(i)} is byte-identical to {digests[d]}", file=sys.stderr)
            return 1
        digests[d] = name_of(i)
    stamp_path.write_text(json.dumps({**stamp, "n": a.n}) + "\n")
    print(f"make_jpeg_set: wrote {len(todo)} of {a.n} images into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
