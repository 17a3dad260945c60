"""vae_pipeline.dataset (the loader in the Python package) on shard sets the binary just wrote.

Runs (all cheap): the 24 Kodak photos bucketed at 256 with avgpool8 and --flip, in f32 (several
shards per bucket) and in bf16; and tiny-kl in dist mode with --flip at 64 on a few photos.
Expected values come from pyarrow (read the documented way), Pillow and bucket_reference.py,
never from the module under test.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bucket_reference as br
from test_buckets import all_kodak, avgpool8, copy_kodak, pillow_window, read_bucketed
from vp_helpers import REPO, require, run_precompute, tensor

sys.path.insert(0, str(require(REPO / "python" / "vae_pipeline" / "dataset.py", "the dataset module").parents[1]))
_dont_write = sys.dont_write_bytecode
sys.dont_write_bytecode = True  # no pipelines/__pycache__ in the source tree
import vae_pipeline.dataset as lds  # noqa: E402

sys.dont_write_bytecode = _dont_write

THREADS = 2
CAPTIONS = {"kodim05.txt": "a red door between two windows", "kodim04.caption": "a girl in a red hat"}
DIST_IMAGES = ["kodim01.png", "kodim04.png", "kodim13.png", "kodim19.png"]


def _run(binary, cards, inp, out, model, *args):
    run_precompute(binary, ["--input", inp, "--out", out, "--model", cards[model], "--threads", THREADS, *args])
    return out


@pytest.fixture(scope="module")
def kodak_in(shared, tmp_path_factory):
    inp = tmp_path_factory.mktemp("ds_kodak") / "in"
    copy_kodak(shared, inp, all_kodak(shared))
    for name, text in CAPTIONS.items():
        (inp / name).write_text(text)
    return inp


@pytest.fixture(scope="module")
def f32_run(binary, cards, kodak_in, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_f32") / "out"
    return _run(binary, cards, kodak_in, out, "avgpool8", "--resize", "bucket", "--bucket-res", 256,
                "--flip", "--dtype", "f32", "--shard-rows", 4)


@pytest.fixture(scope="module")
def bf16_run(binary, cards, kodak_in, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_bf16") / "out"
    return _run(binary, cards, kodak_in, out, "avgpool8", "--resize", "bucket", "--bucket-res", 256,
                "--flip", "--dtype", "bf16")


@pytest.fixture(scope="module")
def dist_run(binary, cards, shared, tmp_path_factory):
    base = tmp_path_factory.mktemp("ds_dist")
    copy_kodak(shared, base / "in", DIST_IMAGES)
    return _run(binary, cards, base / "in", base / "out", "tiny-kl", "--size", 64, "--latent-mode", "dist",
                "--flip", "--dtype", "f32")


def pyarrow_rows(out: Path) -> dict[str, dict]:
    """key -> row dict with the tensor columns as numpy arrays (stored dtype) and the folder."""
    res = {}
    for bucket, t in read_bucketed(out).items():
        tens = {c: tensor(t, c) for c in t.column_names if c.startswith("latent")}
        scal = t.drop_columns(list(tens)).to_pylist()
        for i, row in enumerate(scal):
            row.update({c: a[i] for c, a in tens.items()})
            row["folder"] = bucket
            res[row["key"]] = row
    return res


# ------------------------------------------------------------------ items
def test_items_equal_pyarrow(f32_run):
    rows = pyarrow_rows(f32_run)
    ds = lds.LatentsDataset(f32_run, seed=0)
    assert len(ds) == len(rows) == 24
    assert ds.buckets == [(192, 320), (320, 192)]
    assert {b: len(r) for b, r in ds.bucket_ranges().items()} == {(192, 320): 6, (320, 192): 18}
    assert ds.latent_mode == "mean" and ds.dtype == "f32" and ds.scaling_factor == 1.0
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        row = rows[item["key"]]
        seen.add(item["key"])
        lat = item["latent"]
        assert isinstance(lat, np.ndarray) and lat.dtype == np.float32
        W, H = row["folder"]
        assert lat.shape == (4, H // 8, W // 8)
        np.testing.assert_array_equal(lat, row["latent"])
        assert item["original_size"] == (row["orig_height"], row["orig_width"])
        assert item["crop_top_left"] == (row["crop_top"], row["crop_left"])
        assert item["target_size"] == (row["height"], row["width"]) == (H, W)
        assert item["caption"] == row["caption"]
        assert item["bucket"] == row["folder"] == ds.bucket_of(i)
        assert item["flipped"] is False
        assert i in ds.bucket_ranges()[item["bucket"]]
    assert seen == set(rows)
    # sidecar captions came through the binary and the dataset
    by_key = {ds[i]["key"]: ds[i]["caption"] for i in range(len(ds))}
    assert by_key["kodim05.png"] == CAPTIONS["kodim05.txt"]
    assert by_key["kodim04.png"] == CAPTIONS["kodim04.caption"]
    assert by_key["kodim01.png"] is None
    # negative indices and bounds
    assert ds[-1]["key"] == ds[len(ds) - 1]["key"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bounded_cache_and_bucket_folder(f32_run):
    full = lds.LatentsDataset(f32_run)
    small = lds.LatentsDataset(f32_run, max_cached_shards=1)
    order = np.random.default_rng(0).permutation(len(full))
    for i in order:
        a, b = full[int(i)], small[int(i)]
        assert a["key"] == b["key"]
        np.testing.assert_array_equal(a["latent"], b["latent"])
    assert len(small._cache) == 1
    one = lds.LatentsDataset(Path(f32_run) / "320x192")
    assert len(one) == 18 and one.buckets == [(320, 192)]


def test_unfinished_set_refused(f32_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(f32_run, copy)
    (copy / "_SUCCESS").unlink()
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        lds.LatentsDataset(copy)
    assert len(lds.LatentsDataset(copy, require_success=False)) == 24


def test_torch_is_optional(f32_run):
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torch"):
            lds.LatentsDataset(f32_run, as_torch=True)
        return
    ds = lds.LatentsDataset(f32_run, as_torch=True)
    item = ds[0]
    assert isinstance(item["latent"], torch.Tensor) and item["latent"].dtype == torch.float32
    batch = lds.collate([ds[i] for i in range(3) if ds.bucket_of(i) == ds.bucket_of(0)])
    assert isinstance(batch["latent"], torch.Tensor)


# ------------------------------------------------------------------ sampler
def _shape_of(ds, i):
    return ds.latent_shape(ds.bucket_of(i))


def test_sampler_batches(f32_run):
    ds = lds.LatentsDataset(f32_run)
    s = lds.BucketBatchSampler(ds, batch_size=4, shuffle=True, seed=11, drop_last=False)
    batches = list(s)
    assert len(batches) == len(s) == 2 + 5  # ceil(6/4) + ceil(18/4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(ds))), "every index exactly once per epoch"
    for b in batches:
        assert 1 <= len(b) <= 4
        assert len({ds.bucket_of(i) for i in b}) == 1, f"batch {b} mixes buckets"
        items = [ds[i] for i in b]
        assert len({it["latent"].shape for it in items}) == 1
        batch = lds.collate(items)
        assert batch["latent"].shape == (len(b), *_shape_of(ds, b[0]))
        assert batch["original_size"].shape == (len(b), 2) and batch["original_size"].dtype == np.int64
    # deterministic: same seed and epoch -> same batches, in a fresh sampler too
    assert list(s) == batches
    assert list(lds.BucketBatchSampler(ds, 4, shuffle=True, seed=11)) == batches
    # a new epoch reshuffles; another seed differs
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != batches and sorted(i for b in e1 for i in b) == list(range(len(ds)))
    assert list(lds.BucketBatchSampler(ds, 4, shuffle=True, seed=12)) != batches
    # the buckets alternate across steps (18 landscape and 6 portrait: not all portrait batches last)
    kinds = [ds.bucket_of(b[0]) for b in batches]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True), kinds


def test_sampler_drop_last_and_no_shuffle(f32_run):
    ds = lds.LatentsDataset(f32_run)
    s = lds.BucketBatchSampler(ds, batch_size=4, shuffle=True, seed=0, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 1 + 4
    assert all(len(b) == 4 and len({ds.bucket_of(i) for i in b}) == 1 for b in batches)
    assert len({i for b in batches for i in b}) == 20
    plain = list(lds.BucketBatchSampler(ds, batch_size=5, shuffle=False))
    assert [i for b in plain for i in b] == list(range(len(ds)))
    assert all(len({ds.bucket_of(i) for i in b}) == 1 for b in plain)


# ------------------------------------------------------------------ flip
def test_flip_column_is_the_mirrored_window(f32_run, kodak_in):
    """latent_flip of the binary = avgpool8 of the horizontally mirrored crop window (Pillow)."""
    rows = pyarrow_rows(f32_run)
    for key in ("kodim01.png", "kodim04.png"):
        row = rows[key]
        assert "latent_flip" in row, f"no latent_flip column: {sorted(row)}"
        g = br.geometry("bucket", row["orig_width"], row["orig_height"], *row["folder"])
        want = avgpool8(pillow_window(kodak_in / key, "bucket", g)[:, ::-1])
        diff = np.abs(row["latent_flip"].astype(np.float64) - want)
        assert diff.max() <= 0.004, f"{key}: latent_flip vs mirrored window: max diff {diff.max():.4f}"


def test_flip_option(f32_run):
    rows = pyarrow_rows(f32_run)
    ds = lds.LatentsDataset(f32_run, flip=True, seed=5)
    idx = np.random.default_rng(1).integers(0, len(ds), 400)
    flips = []
    for i in idx:
        item = ds[int(i)]
        row = rows[item["key"]]
        g = br.geometry("bucket", row["orig_width"], row["orig_height"], *row["folder"])
        if item["flipped"]:
            np.testing.assert_array_equal(item["latent"], row["latent_flip"])
            assert item["crop_top_left"] == (row["crop_top"], br.mirrored_crop_left(g))
        else:
            np.testing.assert_array_equal(item["latent"], row["latent"])
            assert item["crop_top_left"] == (row["crop_top"], row["crop_left"])
        flips.append(item["flipped"])
    assert 0.4 <= np.mean(flips) <= 0.6, np.mean(flips)
    again = lds.LatentsDataset(f32_run, flip=True, seed=5)
    assert [again[int(i)]["flipped"] for i in idx] == flips, "same seed, different flips"


def test_flip_needs_the_column(tmp_path, binary, cards, shared):
    copy_kodak(shared, tmp_path / "in", ["kodim01.png"])
    out = _run(binary, cards, tmp_path / "in", tmp_path / "out", "avgpool8", "--size", 64)
    with pytest.raises(ValueError, match="--flip"):
        lds.LatentsDataset(out, flip=True)


# ------------------------------------------------------------------ bf16
def test_bf16_within_rounding_of_f32(f32_run, bf16_run):
    f = pq.ParquetFile(sorted((Path(bf16_run) / "320x192").glob("part-*.parquet"))[0])
    assert f.metadata.metadata[b"vae_pipeline.dtype"] == b"bf16"
    assert f.schema_arrow.field("latent").type.value_type == pa.uint16()
    f32 = lds.LatentsDataset(f32_run)
    a = {it["key"]: it for it in (f32[j] for j in range(len(f32)))}
    b = lds.LatentsDataset(bf16_run)
    assert b.dtype == "bf16" and len(b) == len(a)
    exact = total = 0
    for i in range(len(b)):
        item = b[i]
        ref = a[item["key"]]["latent"]
        got = item["latent"]
        assert got.dtype == np.float32 and got.shape == ref.shape
        # round-to-nearest bf16 (8 significant bits): |error| <= 2^-8 |x|
        bound = np.abs(ref) * 2.0**-8 + 1e-38
        err = np.abs(got.astype(np.float64) - ref)
        assert (err <= bound).all(), (
            f"{item['key']}: bf16 off by up to {(err / np.maximum(np.abs(ref), 1e-30)).max():.2e} relative (> 2^-8)")
        rne = _bf16_round_nearest_even(ref)
        exact += int((got == rne).sum())
        total += got.size
        for k in ("original_size", "crop_top_left", "target_size", "caption"):
            assert item[k] == a[item["key"]][k]
    assert exact / total >= 0.999, f"only {exact / total:.4%} of values equal round-to-nearest-even bf16"


def _bf16_round_nearest_even(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------ dist
def test_dist_resampling(dist_run):
    rows = pyarrow_rows(dist_run)
    ds = lds.LatentsDataset(dist_run, seed=123)
    assert ds.latent_mode == "dist" and len(ds) == len(DIST_IMAGES)
    i = 0
    key = lds.LatentsDataset(dist_run, resample=False)[i]["key"]  # leaves ds's Generator untouched
    mean, std = rows[key]["latent"].astype(np.float64), rows[key]["latent_std"].astype(np.float64)
    assert mean.shape == (4, 32, 32) and (std >= 0).all() and std.max() > 0
    n = 400
    draws = np.stack([ds[i]["latent"] for _ in range(n)]).astype(np.float64)
    assert not np.array_equal(draws[0], draws[1]), "two accesses gave the same sample"
    m, s = draws.mean(0), draws.std(0, ddof=1)
    pos = std > 0
    z = np.abs(m - mean)[pos] / (std[pos] / np.sqrt(n))  # ~|N(0, 1)|
    assert z.mean() <= 1.0 and z.max() <= 6.0, (z.mean(), z.max())
    ratio = s[pos] / std[pos]  # ~1 +- 1/sqrt(2n)
    assert 0.97 <= np.median(ratio) <= 1.03 and ratio.min() >= 0.7 and ratio.max() <= 1.3, (
        np.median(ratio), ratio.min(), ratio.max())
    np.testing.assert_array_equal(draws[:, ~pos], np.broadcast_to(mean[~pos], draws[:, ~pos].shape))
    # seeded: a fresh dataset with the same seed draws the same sequence; resample=False is the mean
    again = lds.LatentsDataset(dist_run, seed=123)
    np.testing.assert_array_equal(again[i]["latent"], draws[0].astype(np.float32))
    np.testing.assert_array_equal(lds.LatentsDataset(dist_run, resample=False)[i]["latent"], mean.astype(np.float32))


def test_dist_flip(dist_run):
    rows = pyarrow_rows(dist_run)
    row = next(iter(rows.values()))
    assert "latent_flip" in row and "latent_flip_std" in row, sorted(row)
    ds = lds.LatentsDataset(dist_run, flip=True, seed=9)
    i = next(j for j in range(len(ds)) if ds[j]["key"] == row["key"])
    got = {True: [], False: []}
    for _ in range(300):
        item = ds[i]
        got[item["flipped"]].append(item["latent"])
    for flipped, name in ((False, "latent"), (True, "latent_flip")):
        d = np.stack(got[flipped]).astype(np.float64)
        mean, std = row[name].astype(np.float64), row[name + "_std"].astype(np.float64)
        pos = std > 0
        z = np.abs(d.mean(0) - mean)[pos] / (std[pos] / np.sqrt(len(d)))
        assert len(d) >= 100 and z.mean() <= 1.0 and z.max() <= 6.0, (name, len(d), z.mean(), z.max())
