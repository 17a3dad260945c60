"""Bucket assignment and resize geometry, end to end, against bucket_reference.py.

bucket_reference.py restates the contract's rules (issue 6) in exact integer arithmetic; it is
checked here first against kohya-ss' make_bucket_resolutions and hand-computed cases (no binary
needed), then every row the binary writes is compared with it: bucket folder, width/height, crop
offsets, original size. The avgpool8 card (8x8 average pool + fixed 1x1 conv, linear) costs
nothing and lets the latents be recomputed from Pillow's Lanczos resize at the reference geometry,
so the recorded offsets are checked against the pixels actually encoded, and `pad`'s border
against the contract's mid-grey fill.
"""
from __future__ import annotations

import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

import bucket_reference as br
from vp_helpers import require, run_precompute, sha256_file, tensor

THREADS = 2
# avgpool8_encoder.onnx (models/README.md): latent[o] = sum_c W[o, c] * avgpool8(x)[c] + B, x in [0, 1]
W_AVG = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.33, 0.33, 0.34]], dtype=np.float64)
B_AVG = -0.5
ATOL = 0.004  # ~1 level of 255 through avgpool8 (rows of W sum to 1), as test_center_crop_end_to_end
MID_GREY = 0.5  # pad fill: the input range's midpoint, 127.5/255 on [0, 1]
PAD_FILL_LATENT = MID_GREY * W_AVG.sum(axis=1) + B_AVG  # = 0 for every channel

# synthetic upright sizes (w, h): extreme aspects, tiny, exact 4:1, near-square, odd sizes
SYNTH = [
    (2000, 100), (100, 2000), (400, 4), (4, 400), (20, 20), (64, 64), (1, 1), (300, 200),
    (200, 300), (257, 255), (1000, 999), (640, 64), (65, 63), (500, 125), (125, 500), (300, 300),
    (333, 100), (100, 333), (130, 520), (600, 150), (200, 120),
]


# ============================================================== reference self-checks (no binary)
def test_generation_matches_kohya_at_1024():
    """Generated list for R=1024, S=64, A=4 == kohya's make_bucket_resolutions with min_size=512,
    max_size=2048 (the sides an aspect of at most 4 allows at 1024^2)."""
    ours = br.generate_buckets(1024, 64, 4.0)
    kohya = br.kohya_make_bucket_resolutions((1024, 1024), min_size=512, max_size=2048, divisible=64)
    assert ours == kohya
    assert set(ours) == {(h, w) for w, h in ours}, "closed under transposition"
    # every pair keeps ~R^2 pixels (within one step of one side) and the aspect limit
    for w, h in ours:
        assert w * h <= 1024 * 1024 and (w * (h + 64) > 1024 * 1024 or (w + 64) * h > 1024 * 1024), (w, h)
        assert max(w, h) <= 4 * min(w, h)


def test_kohya_default_list_at_1024():
    """kohya's defaults (min 256, max 1024) for 1024^2, as sd-scripts prints them."""
    k = br.kohya_make_bucket_resolutions((1024, 1024))
    assert len(k) == 25
    assert k[:3] == [(256, 1024), (320, 1024), (384, 1024)] and k[-1] == (1024, 1024)


def test_generation_small_and_odd():
    assert br.generate_buckets(256) == [(128, 384), (128, 448), (128, 512), (192, 320), (256, 256),
                                        (320, 192), (384, 128), (448, 128), (512, 128)]
    # R not a multiple of S: the square is floor(R/S)*S
    assert (192, 192) in br.generate_buckets(200)
    assert br.generate_buckets(256, 32, 2.0) == [(192, 320), (224, 288), (256, 256), (288, 224), (320, 192)]
    assert br.generate_buckets(256, 32, "2") == br.generate_buckets(256, 32, 2)
    for w, h in br.generate_buckets(256, 32, 2.0):
        assert w % 32 == 0 and h % 32 == 0 and max(w, h) <= 2 * min(w, h)
        assert h == (256 * 256 // (w * 32)) * 32 or w == (256 * 256 // (h * 32)) * 32 or w == h == 256
    with pytest.raises(ValueError):
        br.generate_buckets(0)


def test_sdxl_list():
    s = list(br.SDXL_BUCKETS)
    assert len(s) == 41 and s == sorted(set(s))
    assert set(br.SDXL_OFFICIAL_NINE) <= set(s)
    assert all((h, w) in s for w, h in s), "closed under transposition"
    assert all(w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048 for w, h in s)
    assert all(abs(w * h - 1024 * 1024) <= 0.1 * 1024 * 1024 for w, h in s)
    assert (512, 2048) in s and (2048, 512) in s and (1344, 704) in s and (704, 1344) in s


def test_parse_bucket_text():
    text = "# buckets\n320x192\n 192X320  # portrait\n\n320x192\n"
    assert br.parse_bucket_text(text) == [(192, 320), (320, 192)]
    for bad in ("320", "320x", "0x64", "axb"):
        with pytest.raises(ValueError):
            br.parse_bucket_text(bad)


def test_choice_known_cases():
    g256 = br.generate_buckets(256)
    assert br.choose_bucket(768, 512, g256) == (320, 192)
    assert br.choose_bucket(512, 768, g256) == (192, 320)
    assert br.choose_bucket(2000, 100, g256) == (512, 128)
    assert br.choose_bucket(100, 2000, g256) == (128, 512)
    assert br.choose_bucket(1, 1, g256) == (256, 256)
    assert br.choose_bucket(333, 100, g256) == (448, 128)  # 3.33: 3.5 beats 3.0 in log distance
    g1024 = br.generate_buckets(1024)
    assert br.choose_bucket(768, 512, g1024) == (1216, 832)
    assert br.choose_bucket(1920, 1080, list(br.SDXL_BUCKETS)) == (1344, 768)
    assert br.choose_bucket(1344, 700, list(br.SDXL_BUCKETS)) == (1344, 704)
    # ties: equal log distance -> larger area -> smaller W
    assert br.choose_bucket(300, 300, [(320, 192), (192, 320)]) == (192, 320)
    assert br.choose_bucket(300, 200, [(160, 96), (320, 192)]) == (320, 192)
    # no-upscale: only buckets inside the image; else its own bucket; else too small
    assert br.choose_bucket(300, 200, g256, no_upscale=True) == (256, 192)
    assert br.choose_bucket(600, 150, g256, no_upscale=True) == (512, 128)
    assert br.choose_bucket(2000, 100, g256, no_upscale=True) == (1984, 64)
    assert br.choose_bucket(64, 64, g256, no_upscale=True) == (64, 64)
    assert br.choose_bucket(63, 640, g256, no_upscale=True) == br.TOO_SMALL
    assert br.choose_bucket(20, 20, g256, no_upscale=True) == br.TOO_SMALL
    assert br.choose_bucket(768, 512, g256, no_upscale=True) == (320, 192)


def test_geometry_known_cases():
    g = br.geometry("bucket", 768, 512, 320, 192)
    assert (g.rw, g.rh, g.crop_left, g.crop_top) == (320, 213, 0, 10)
    g = br.geometry("center-crop", 512, 768, 64, 64)
    assert (g.rw, g.rh, g.crop_left, g.crop_top) == (64, 96, 0, 16)
    g = br.geometry("bucket", 2000, 100, 512, 128)
    assert (g.rw, g.rh, g.crop_left, g.crop_top) == (2560, 128, 1024, 0)
    g = br.geometry("pad", 768, 512, 64, 64)
    assert (g.rw, g.rh, g.crop_left, g.crop_top, g.width, g.height) == (64, 43, 0, -10, 64, 64)
    g = br.geometry("pad", 1, 1000, 64, 64)
    assert (g.rw, g.rh, g.crop_left, g.crop_top) == (1, 64, -31, 0)  # width 0.064 -> at least 1
    g = br.geometry("stretch", 768, 512, 64, 64)
    assert (g.rw, g.rh, g.crop_left, g.crop_top) == (64, 64, 0, 0)
    # round half up, exactly: 3x2 -> height 64 gives width 96; 5x2 at 64 high: 160; 3x4 at 10 wide: 13.33
    assert br.cover_size(3, 2, 64, 64) == (96, 64)
    assert br.cover_size(2, 1, 3, 3) == (6, 3)
    assert br.cover_size(4, 3, 2, 2) == (3, 2)  # 2.666 -> 3
    assert br.cover_size(8, 3, 2, 2) == (5, 2)  # 5.333 -> 5
    assert br.cover_size(12, 8, 3, 3) == (5, 3)  # 4.5 -> 5 (half up)
    # the existing square center-crop helper agrees
    from vp_helpers import expected_crop
    for w, h in [(768, 512), (512, 768), (48, 40), (90, 120), (1001, 77), (77, 1001)]:
        g = br.geometry("center-crop", w, h, 64, 64)
        assert expected_crop(w, h, 64) == (g.rw, g.rh, g.crop_left, g.crop_top), (w, h)
    # mirrored offsets
    g = br.geometry("bucket", 2000, 100, 512, 128)
    assert br.mirrored_crop_left(g) == 2560 - 512 - 1024
    g = br.geometry("pad", 768, 512, 64, 64)
    assert br.mirrored_crop_left(g) == 0


# ============================================================== helpers for binary runs
def _smooth_rgb(w: int, h: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 127 + 120 * np.sin((xx + 2 * yy) / (7 + seed))
    img = np.stack([r, g, b], -1)
    cy, cx, rad = h * 0.3, w * 0.65, max(min(w, h) * 0.2, 1)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad**2] = (20, 200, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def synth_name(w: int, h: int) -> str:
    return f"s_{w:04d}x{h:04d}.png"


def write_synthetic(dest: Path, sizes) -> dict[str, tuple[int, int]]:
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (w, h) in enumerate(sizes):
        name = synth_name(w, h)
        Image.fromarray(_smooth_rgb(w, h, i), "RGB").save(dest / name)
        out[name] = (w, h)
    return out


def copy_kodak(shared: Path, dest: Path, names) -> dict[str, tuple[int, int]]:
    kodak = require(shared / "data" / "kodak", "Kodak image folder")
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        src = require(kodak / name, "Kodak image")
        shutil.copyfile(src, dest / name)
        with Image.open(src) as im:
            out[name] = im.size
    return out


def all_kodak(shared: Path) -> list[str]:
    kodak = require(shared / "data" / "kodak", "Kodak image folder")
    names = sorted(p.name for p in kodak.glob("kodim*.png"))
    assert len(names) == 24, names
    return names


_FOLDER = re.compile(r"^(\d+)x(\d+)$")


def read_bucketed(out: Path) -> dict[tuple[int, int], pa.Table]:
    """{(W, H): table sorted by key} for every <W>x<H> folder of a run (pyarrow)."""
    out = Path(out)
    res = {}
    for d in sorted(out.iterdir()):
        m = _FOLDER.match(d.name)
        if not (d.is_dir() and m):
            continue
        files = sorted(d.glob("part-*.parquet"))
        assert files, f"bucket folder {d} has no part-*.parquet files: {sorted(p.name for p in d.iterdir())}"
        res[(int(m.group(1)), int(m.group(2)))] = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")
    assert res, f"no <W>x<H> shard folders in {out}: {sorted(p.name for p in out.iterdir())}"
    return res


def rows_by_key(tables: dict[tuple[int, int], pa.Table]) -> dict[str, tuple[tuple[int, int], dict, int]]:
    """key -> (folder bucket, row without tensors, row index in that bucket's table)."""
    res = {}
    for b, t in tables.items():
        scal = t.drop_columns([c for c in t.column_names if c.startswith("latent")])
        for i, row in enumerate(scal.to_pylist()):
            assert row["key"] not in res, f"key {row['key']} is in two buckets"
            res[row["key"]] = (b, row, i)
    return res


def read_errors(out: Path) -> dict[str, str]:
    p = Path(out) / "_errors.jsonl"
    if not p.exists():
        return {}
    res = {}
    for line in p.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            res[e["key"]] = e["kind"]
    return res


def summary_histogram(proc) -> dict[tuple[int, int], int]:
    """The `buckets: 1024x1024 12, 1216x832 7, ...` summary line (stdout or stderr), parsed."""
    text = (proc.stdout or "") + "\n" + (proc.stderr or "")
    lines = [ln for ln in text.splitlines() if re.search(r"\bbuckets:", ln)]
    assert lines, (f"no 'buckets:' line in the run summary:\n--- stdout ---\n{proc.stdout[-3000:]}\n"
                   f"--- stderr ---\n{proc.stderr[-3000:]}")
    body = lines[-1].split("buckets:", 1)[1]
    hist = {}
    for w, h, n in re.findall(r"(\d+)x(\d+)\s*[:=]?\s*(\d+)", body):
        hist[(int(w), int(h))] = int(n)
    return hist


def run(binary, cards, inp: Path, out: Path, *args, model="avgpool8"):
    return run_precompute(binary, [
        "--input", inp, "--out", out, "--model", cards[model], "--threads", THREADS, *args,
    ])


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        img = ImageOps.exif_transpose(im)
    return img.convert("RGB")


def pillow_window(path: Path, policy: str, g: br.Geometry) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1]: what the encoder should see for this geometry (Pillow LANCZOS)."""
    img = load_rgb(path)
    if policy == "stretch":
        return np.asarray(img.resize((g.width, g.height), Image.LANCZOS), dtype=np.float64) / 255.0
    resized = np.asarray(img.resize((g.rw, g.rh), Image.LANCZOS), dtype=np.float64) / 255.0
    if policy == "pad":
        canvas = np.full((g.height, g.width, 3), MID_GREY)
        top, left = -g.crop_top, -g.crop_left
        canvas[top:top + g.rh, left:left + g.rw] = resized
        return canvas
    t, l = g.crop_top, g.crop_left
    win = resized[t:t + g.height, l:l + g.width]
    assert win.shape == (g.height, g.width, 3), (win.shape, g)
    return win


def avgpool8(x: np.ndarray) -> np.ndarray:
    h, w, _ = x.shape
    pooled = x.reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
    return np.einsum("oc,yxc->oyx", W_AVG, pooled) + B_AVG


def assert_latent_close(key: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL):
    assert got.shape == want.shape, f"{key}: latent shape {got.shape}, want {want.shape}"
    diff = np.abs(got.astype(np.float64) - want)
    worst = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
    assert float(diff.max()) <= atol and float(diff.mean()) <= atol / 4, (
        f"{key}: avgpool8 latent vs Pillow at the reference geometry: max abs diff {diff.max():.4f} at "
        f"{worst} (got {got[worst]:.4f}, want {want[worst]:.4f}), mean {diff.mean():.5f}"
    )


def check_run_against_reference(out: Path, inp: Path, sizes: dict[str, tuple[int, int]], expect_bucket,
                                policy: str = "bucket", check_latents=(), factor: int = 8):
    """Every input is either a row in the reference's bucket with the reference geometry, or a
    `too_small` error when the reference refuses it. Returns (tables, rows)."""
    tables = read_bucketed(out)
    rows = rows_by_key(tables)
    errors = read_errors(out)
    problems = []
    for key, (w, h) in sorted(sizes.items()):
        b = expect_bucket(w, h)
        if b == br.TOO_SMALL:
            if key in rows:
                problems.append(f"{key} ({w}x{h}): expected too_small, got a row in {rows[key][0]}")
            elif errors.get(key) != "too_small":
                problems.append(f"{key} ({w}x{h}): expected a too_small error, _errors.jsonl has {errors.get(key)!r}")
            continue
        if key not in rows:
            problems.append(f"{key} ({w}x{h}): no row (error: {errors.get(key)!r}); expected bucket {b}")
            continue
        folder, row, _ = rows[key]
        g = br.geometry(policy, w, h, *b)
        want = dict(folder=b, orig_width=w, orig_height=h, width=g.width, height=g.height,
                    crop_left=g.crop_left, crop_top=g.crop_top)
        got = dict(folder=folder, orig_width=row["orig_width"], orig_height=row["orig_height"],
                   width=row["width"], height=row["height"], crop_left=row["crop_left"], crop_top=row["crop_top"])
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            problems.append(f"{key} ({w}x{h}): (got, expected) {diff}")
        if row["source_sha256"] != sha256_file(inp / key):
            problems.append(f"{key}: source_sha256 differs from hashlib")
    assert not problems, "binary vs bucket_reference:\n" + "\n".join(problems)
    for (W, H), t in tables.items():
        lat = tensor(t, "latent")
        assert lat.shape[2:] == (H // factor, W // factor), f"{W}x{H}: latent shape {lat.shape}"
        assert set(t.column("width").to_pylist()) == {W} and set(t.column("height").to_pylist()) == {H}
    for key in check_latents:
        folder, row, i = rows[key]
        g = br.geometry(policy, row["orig_width"], row["orig_height"], *folder)
        want = avgpool8(pillow_window(inp / key, policy, g))
        assert_latent_close(key, tensor(tables[folder], "latent")[i], want)
    return tables, rows


# ============================================================== binary: bucket mode
@pytest.fixture(scope="module")
def kodak_inputs(shared, tmp_path_factory):
    inp = tmp_path_factory.mktemp("bk_kodak") / "in"
    return inp, copy_kodak(shared, inp, all_kodak(shared))


@pytest.fixture(scope="module")
def synth_inputs(tmp_path_factory):
    inp = tmp_path_factory.mktemp("bk_synth") / "in"
    return inp, write_synthetic(inp, SYNTH)


def test_kodak_buckets_256(binary, cards, kodak_inputs, tmp_path):
    inp, sizes = kodak_inputs
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--bucket-res", 256, "--dtype", "f32")
    buckets = br.generate_buckets(256)
    expect = lambda w, h: br.choose_bucket(w, h, buckets)  # noqa: E731
    tables, rows = check_run_against_reference(tmp_path / "out", inp, sizes, expect,
                                               check_latents=["kodim01.png", "kodim04.png"])
    want_hist = br.histogram(expect(w, h) for w, h in sizes.values())
    assert want_hist == {(320, 192): 18, (192, 320): 6}
    assert {b: t.num_rows for b, t in tables.items()} == want_hist
    assert summary_histogram(proc) == want_hist


def test_synthetic_buckets_default_res(binary, cards, synth_inputs, tmp_path):
    """--bucket-res defaults to --size; extreme aspects, tiny and odd sizes."""
    inp, sizes = synth_inputs
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--size", 256, "--dtype", "f32")
    buckets = br.generate_buckets(256)
    expect = lambda w, h: br.choose_bucket(w, h, buckets)  # noqa: E731
    check_run_against_reference(tmp_path / "out", inp, sizes, expect, check_latents=[
        synth_name(2000, 100), synth_name(100, 2000), synth_name(300, 200), synth_name(257, 255),
        synth_name(333, 100), synth_name(65, 63), synth_name(20, 20),
    ])
    assert summary_histogram(proc) == br.histogram(expect(w, h) for w, h in sizes.values())


def test_synthetic_no_upscale(binary, cards, synth_inputs, shared, tmp_path):
    sinp, sizes = synth_inputs
    inp = tmp_path / "in"
    shutil.copytree(sinp, inp)
    allsizes = {**sizes, **copy_kodak(shared, inp, ["kodim01.png", "kodim04.png"])}
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--bucket-res", 256,
               "--no-upscale", "--dtype", "f32")
    buckets = br.generate_buckets(256)
    expect = lambda w, h: br.choose_bucket(w, h, buckets, no_upscale=True)  # noqa: E731
    tables, rows = check_run_against_reference(tmp_path / "out", inp, allsizes, expect, check_latents=[
        synth_name(300, 200), synth_name(2000, 100), synth_name(600, 150), "kodim04.png",
    ])
    refused = sorted(k for k, (w, h) in allsizes.items() if expect(w, h) == br.TOO_SMALL)
    # 65x63: no bucket fits inside and its own bucket would be 64x0
    assert refused == sorted([synth_name(20, 20), synth_name(1, 1), synth_name(400, 4), synth_name(4, 400),
                              synth_name(65, 63)])
    # no image is upscaled: the bucket fits inside the image
    for key, (folder, row, _) in rows.items():
        assert folder[0] <= row["orig_width"] and folder[1] <= row["orig_height"], (key, folder)
    assert summary_histogram(proc) == br.histogram(expect(w, h) for w, h in allsizes.values())


def test_synthetic_step_and_aspect(binary, cards, synth_inputs, tmp_path):
    inp, sizes = synth_inputs
    run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--bucket-res", 256,
        "--bucket-step", 32, "--max-aspect", 2)
    buckets = br.generate_buckets(256, 32, 2)
    expect = lambda w, h: br.choose_bucket(w, h, buckets, step=32)  # noqa: E731
    tables, _ = check_run_against_reference(tmp_path / "out", inp, sizes, expect)
    assert set(tables) <= set(buckets)


BUCKET_FILE = """\
# custom bucket list: no square, so square images tie between 320x192 and 192x320
320x192
192x320   # portrait
384x128
128x384

160x96
"""


def test_bucket_file(binary, cards, synth_inputs, tmp_path):
    inp, sizes = synth_inputs
    f = tmp_path / "buckets.txt"
    f.write_text(BUCKET_FILE)
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--buckets", f)
    buckets = br.parse_bucket_text(BUCKET_FILE)
    expect = lambda w, h: br.choose_bucket(w, h, buckets)  # noqa: E731
    # the tie rules are exercised: a square goes to the smaller-W twin, 5:3 to the larger twin
    assert expect(300, 300) == (192, 320) and expect(64, 64) == (192, 320)
    assert expect(200, 120) == (320, 192)
    tables, _ = check_run_against_reference(tmp_path / "out", inp, sizes, expect,
                                            check_latents=[synth_name(300, 300), synth_name(200, 120)])
    assert set(tables) <= set(buckets)
    assert summary_histogram(proc) == br.histogram(expect(w, h) for w, h in sizes.values())
    assert all(t.schema.metadata[b"vae_pipeline.resize"] == f"bucket {f}".encode() for t in tables.values())


def test_bucket_file_no_upscale(binary, cards, synth_inputs, tmp_path):
    inp, sizes = synth_inputs
    f = tmp_path / "buckets.txt"
    f.write_text(BUCKET_FILE)
    run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--buckets", f, "--no-upscale")
    buckets = br.parse_bucket_text(BUCKET_FILE)
    expect = lambda w, h: br.choose_bucket(w, h, buckets, no_upscale=True)  # noqa: E731
    assert expect(200, 120) == (160, 96)  # 320x192 would upscale
    check_run_against_reference(tmp_path / "out", inp, sizes, expect)


def test_sdxl_buckets(binary, cards, shared, tmp_path):
    inp = tmp_path / "in"
    sizes = copy_kodak(shared, inp, ["kodim01.png", "kodim04.png"])
    extra = [(2000, 500), (1000, 1000), (700, 1344), (1344, 700), (1920, 1080), (1080, 1920), (300, 40)]
    sizes.update(write_synthetic(inp, extra))
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--buckets", "sdxl")
    buckets = list(br.SDXL_BUCKETS)
    expect = lambda w, h: br.choose_bucket(w, h, buckets)  # noqa: E731
    assert expect(1344, 700) == (1344, 704) and expect(700, 1344) == (704, 1344)
    tables, _ = check_run_against_reference(tmp_path / "out", inp, sizes, expect,
                                            check_latents=["kodim01.png", synth_name(1344, 700)])
    assert set(tables) <= set(buckets)
    assert summary_histogram(proc) == br.histogram(expect(w, h) for w, h in sizes.values())
    assert all(t.schema.metadata[b"vae_pipeline.resize"] == b"bucket sdxl" for t in tables.values())


def _probe_sizes(buckets, div=32):
    """One small image per bucket and per transpose, with exactly that aspect ratio (W/div x H/div)."""
    probes = set()
    for w, h in buckets:
        probes.add((w // div, h // div))
        probes.add((h // div, w // div))
    return sorted(probes)


@pytest.mark.parametrize("spec", ["sdxl", "generated-1024"])
def test_bucket_list_probes(binary, cards, tmp_path, spec):
    """An image with exactly a bucket's aspect lands in that bucket: every bucket of the reference
    list exists in the binary's list (and the transposes go where the reference sends them)."""
    if spec == "sdxl":
        buckets, args = list(br.SDXL_BUCKETS), ["--buckets", "sdxl"]
    else:
        buckets, args = br.generate_buckets(1024), ["--bucket-res", 1024]
    inp = tmp_path / "in"
    sizes = write_synthetic(inp, _probe_sizes(buckets))
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", *args)
    expect = lambda w, h: br.choose_bucket(w, h, buckets)  # noqa: E731
    for w, h in buckets:
        assert expect(w // 32, h // 32) == (w, h)
    tables, _ = check_run_against_reference(tmp_path / "out", inp, sizes, expect)
    assert set(buckets) <= set(tables) and set(tables) <= set(buckets)
    assert summary_histogram(proc) == br.histogram(expect(w, h) for w, h in sizes.values())


def test_kodak_buckets_1024(binary, cards, kodak_inputs, tmp_path):
    inp, sizes = kodak_inputs
    proc = run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--bucket-res", 1024)
    buckets = br.generate_buckets(1024)
    expect = lambda w, h: br.choose_bucket(w, h, buckets)  # noqa: E731
    tables, _ = check_run_against_reference(tmp_path / "out", inp, sizes, expect)
    want_hist = br.histogram(expect(w, h) for w, h in sizes.values())
    assert want_hist == {(1216, 832): 18, (832, 1216): 6}
    assert {b: t.num_rows for b, t in tables.items()} == want_hist
    assert summary_histogram(proc) == want_hist
    # The metadata names the bucket area (--bucket-res), not --size (256 here).
    for t in tables.values():
        assert t.schema.metadata[b"vae_pipeline.resize"] == b"bucket 1024"


def test_bucket_random_crop(binary, cards, kodak_inputs, tmp_path):
    """--resize bucket --crop random: same buckets and resize, offsets anywhere inside the bounds,
    and the encoded pixels are the window at the recorded offsets."""
    inp, sizes = kodak_inputs
    run(binary, cards, inp, tmp_path / "out", "--resize", "bucket", "--bucket-res", 256, "--crop", "random",
        "--seed", 3, "--dtype", "f32")
    buckets = br.generate_buckets(256)
    tables = read_bucketed(tmp_path / "out")
    rows = rows_by_key(tables)
    assert sorted(rows) == sorted(sizes)
    centred = 0
    for key, (folder, row, i) in rows.items():
        w, h = sizes[key]
        b = br.choose_bucket(w, h, buckets)
        g = br.geometry("random-crop", w, h, *b)
        assert folder == b and (row["width"], row["height"]) == b, key
        assert 0 <= row["crop_left"] <= g.max_left and 0 <= row["crop_top"] <= g.max_top, (key, row, g)
        centred += (row["crop_left"], row["crop_top"]) == (g.crop_left, g.crop_top)
    assert centred < len(rows), "every random crop is the centre crop"
    for key in ("kodim01.png", "kodim04.png"):
        folder, row, i = rows[key]
        g0 = br.geometry("random-crop", *sizes[key], *folder)
        g = br.Geometry(g0.rw, g0.rh, row["crop_left"], row["crop_top"], g0.width, g0.height)
        assert_latent_close(key, tensor(tables[folder], "latent")[i], avgpool8(pillow_window(inp / key, "bucket", g)))


# ============================================================== binary: square policies
POLICY_SIZE = 64
POLICY_SYNTH = [(100, 30), (30, 100), (1, 1000), (65, 64)]


@pytest.fixture(scope="module")
def policy_inputs(shared, tmp_path_factory):
    inp = tmp_path_factory.mktemp("policies") / "in"
    sizes = copy_kodak(shared, inp, ["kodim01.png", "kodim04.png", "kodim13.png"])
    sizes.update(write_synthetic(inp, POLICY_SYNTH))
    return inp, sizes


@pytest.mark.parametrize("policy", ["center-crop", "stretch", "pad"])
def test_square_policy_geometry(binary, cards, policy_inputs, tmp_path, policy):
    inp, sizes = policy_inputs
    run(binary, cards, inp, tmp_path / "out", "--resize", policy, "--size", POLICY_SIZE, "--dtype", "f32")
    square = (POLICY_SIZE, POLICY_SIZE)
    tables, rows = check_run_against_reference(tmp_path / "out", inp, sizes, lambda w, h: square,
                                               policy=policy, check_latents=sorted(sizes))
    assert list(tables) == [square]


def test_pad_border_is_mid_grey(binary, cards, policy_inputs, tmp_path):
    """Latent cells whose 8x8 pixels are all padding equal avgpool8(mid-grey) (= 0 here), and the
    picture's cells do not."""
    inp, sizes = policy_inputs
    run(binary, cards, inp, tmp_path / "out", "--resize", "pad", "--size", POLICY_SIZE, "--dtype", "f32")
    tables = read_bucketed(tmp_path / "out")
    t = tables[(POLICY_SIZE, POLICY_SIZE)]
    lat = tensor(t, "latent").astype(np.float64)
    checked = 0
    for i, row in enumerate(t.drop_columns(["latent"]).to_pylist()):
        g = br.geometry("pad", row["orig_width"], row["orig_height"], POLICY_SIZE, POLICY_SIZE)
        assert (row["crop_left"], row["crop_top"]) == (g.crop_left, g.crop_top), row["key"]
        mask = np.zeros((POLICY_SIZE, POLICY_SIZE), bool)  # True = picture
        top, left = -g.crop_top, -g.crop_left
        mask[top:top + g.rh, left:left + g.rw] = True
        cells = ~mask.reshape(POLICY_SIZE // 8, 8, POLICY_SIZE // 8, 8).any(axis=(1, 3))  # all padding
        if not cells.any():
            continue
        border = lat[i][:, cells]  # (4, n)
        want = PAD_FILL_LATENT[:, None]
        err = np.abs(border - want).max()
        assert err <= 1e-4, (
            f"{row['key']}: padded latent cells = {border.mean(axis=1)} per channel, want {PAD_FILL_LATENT} "
            f"(fill 0.5 = 127.5/255); off by {err:.5f} (128/255 would be off by {0.5 / 255:.5f})"
        )
        checked += cells.sum()
    assert checked >= 20, f"only {checked} all-padding latent cells checked"


def test_random_crop_seeds(binary, cards, shared, tmp_path):
    inp = tmp_path / "in"
    sizes = copy_kodak(shared, inp, all_kodak(shared))
    offs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run(binary, cards, inp, tmp_path / name, "--resize", "random-crop", "--size", POLICY_SIZE,
            "--seed", seed, "--dtype", "f32")
        tables = read_bucketed(tmp_path / name)
        assert list(tables) == [(POLICY_SIZE, POLICY_SIZE)]
        rows = rows_by_key(tables)
        assert sorted(rows) == sorted(sizes)
        offs[name] = {}
        for key, (_, row, i) in rows.items():
            w, h = sizes[key]
            g = br.geometry("random-crop", w, h, POLICY_SIZE, POLICY_SIZE)
            got = (row["orig_width"], row["orig_height"], row["width"], row["height"])
            assert got == (w, h, POLICY_SIZE, POLICY_SIZE), (key, got)
            assert 0 <= row["crop_left"] <= g.max_left and 0 <= row["crop_top"] <= g.max_top, (key, row, g)
            offs[name][key] = (row["crop_left"], row["crop_top"])
        if name == "a":  # the encoded pixels are the window at the recorded offsets
            t = tables[(POLICY_SIZE, POLICY_SIZE)]
            for key in ("kodim01.png", "kodim04.png"):
                _, row, i = rows[key]
                g0 = br.geometry("random-crop", *sizes[key], POLICY_SIZE, POLICY_SIZE)
                g = br.Geometry(g0.rw, g0.rh, row["crop_left"], row["crop_top"], POLICY_SIZE, POLICY_SIZE)
                assert_latent_close(key, tensor(t, "latent")[i], avgpool8(pillow_window(inp / key, "random-crop", g)))
    assert offs["a"] == offs["b"], "same --seed gave different crops"
    differ = [k for k in offs["a"] if offs["a"][k] != offs["c"][k]]
    assert differ, "--seed 7 and --seed 8 gave the same crop for all 24 images"
    # the offsets are spread, not stuck at the centre or an edge
    lefts = {offs["a"][k][0] for k in offs["a"] if sizes[k][0] > sizes[k][1]}
    assert len(lefts) >= 4, lefts


def test_fraction_is_exact():  # guard for the reference's own arithmetic
    assert br.aspect_distance(3, 2, 2, 3) == Fraction(9, 4)
