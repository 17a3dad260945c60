"""The shards open in real readers: pyarrow, polars, Hugging Face datasets.

One taef2 run at --size 64 over 6 Kodak images (one in sub/, one with a sidecar caption),
--shard-rows 4 so the 6 rows land in 2 shards. Expected values come from hashlib, Pillow and
pyarrow, never from the binary itself.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hf_recipe import hf_load_latents
from vp_helpers import (
    INT32_COLUMNS,
    METADATA_KEYS,
    expected_crop,
    file_metadata,
    read_shards,
    require,
    run_precompute,
    sha256_file,
    shard_dir,
    shard_files,
    tensor,
)

SIZE = 64
C, H, W = 32, SIZE // 8, SIZE // 8
# landscape 768x512 and portrait 512x768 images; kodim17 goes into a nested folder
IMAGES = {
    "kodim01.png": "kodim01.png",
    "kodim04.png": "kodim04.png",  # portrait
    "kodim05.png": "kodim05.png",
    "kodim09.png": "kodim09.png",  # portrait
    "kodim13.png": "kodim13.png",
    "sub/kodim17.png": "kodim17.png",  # portrait, nested
}
CAPTIONED = "kodim05.png"
CAPTION = "a red door between two windows"


def _make_input(shared: Path, dest: Path, keys) -> dict[str, Path]:
    kodak = require(shared / "data" / "kodak", "Kodak image folder")
    out = {}
    for key in keys:
        src = require(kodak / IMAGES[key], "Kodak image")
        dst = dest / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        out[key] = dst
    return out


@pytest.fixture(scope="module")
def kodak_run(binary, cards, shared, tmp_path_factory):
    base = tmp_path_factory.mktemp("readers")
    inp = base / "in"
    files = _make_input(shared, inp, IMAGES)
    (inp / Path(CAPTIONED).with_suffix(".txt")).write_text(CAPTION)
    out = base / "out"
    run_precompute(binary, [
        "--input", inp, "--out", out, "--model", cards["taef2"], "--size", SIZE,
        "--shard-rows", 4, "--threads", 2,
    ])
    return {"input": inp, "files": files, "out": out}


@pytest.fixture(scope="module")
def table(kodak_run) -> pa.Table:
    return read_shards(kodak_run["out"], SIZE)


# ---------------------------------------------------------------- layout and side files

def test_layout_and_side_files(kodak_run):
    out = kodak_run["out"]
    files = shard_files(out, SIZE)
    assert len(files) == 2, f"6 rows with --shard-rows 4 should give 2 shards, got {[f.name for f in files]}"
    assert files[0].name == "part-00000.parquet", [f.name for f in files]
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sorted(rows) == [2, 4], f"rows per shard {rows}, expected 4 and 2"
    assert (out / "_SUCCESS").is_file(), f"_SUCCESS missing in {sorted(p.name for p in out.iterdir())}"
    errors = require(out / "_errors.jsonl", "_errors.jsonl")
    assert errors.read_text().strip() == "", f"_errors.jsonl not empty:\n{errors.read_text()}"
    manifest = require(out / "_manifest.jsonl", "_manifest.jsonl")
    for i, line in enumerate(manifest.read_text().splitlines()):
        if line.strip():
            json.loads(line)  # every manifest line is JSON
    success_t = (out / "_SUCCESS").stat().st_mtime_ns
    for f in files:
        assert f.stat().st_mtime_ns <= success_t, f"{f.name} is newer than _SUCCESS (must be written last)"
    leftovers = [p.name for p in shard_dir(out, SIZE).iterdir() if not p.name.endswith(".parquet")]
    assert not leftovers, f"temporary files left in the shard folder: {leftovers}"


# ---------------------------------------------------------------- pyarrow

def test_pyarrow_schema_every_shard(kodak_run):
    for f in shard_files(kodak_run["out"], SIZE):
        schema = pq.read_schema(f)
        names = schema.names
        for col in ("key", "source_sha256", *INT32_COLUMNS, "latent", "caption"):
            assert col in names, f"{f.name}: column {col!r} missing; columns are {names}"
        assert "latent_std" not in names, f"{f.name}: latent_std present without --latent-mode dist"
        assert schema.field("key").type == pa.string(), schema.field("key").type
        assert schema.field("source_sha256").type == pa.binary(32), schema.field("source_sha256").type
        for col in INT32_COLUMNS:
            assert schema.field(col).type == pa.int32(), f"{col}: {schema.field(col).type}"
        assert schema.field("caption").type == pa.string(), schema.field("caption").type
        assert schema.field("caption").nullable
        lt = schema.field("latent").type
        assert isinstance(lt, pa.FixedShapeTensorType), (
            f"{f.name}: latent is {lt}, not arrow.fixed_shape_tensor (pyarrow dropped or never saw the extension)"
        )
        assert list(lt.shape) == [C, H, W], lt.shape
        assert lt.value_type == pa.float16(), lt.value_type
        # the documented one-liner
        arr = pq.read_table(f).column("latent").combine_chunks().to_numpy_ndarray()
        assert arr.shape == (pq.ParquetFile(f).metadata.num_rows, C, H, W) and arr.dtype == np.float16


def test_pyarrow_rows(kodak_run, table):
    files = kodak_run["files"]
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), f"duplicate keys: {keys}"
    assert set(keys) == set(files), f"keys {sorted(keys)} != input paths {sorted(files)}"
    rows = table.to_pylist()
    for row in rows:
        key = row["key"]
        path = files[key]
        assert row["source_sha256"] == sha256_file(path), f"{key}: source_sha256 is not sha256(file bytes)"
        with Image.open(path) as im:
            ow, oh = im.size
        assert (row["orig_width"], row["orig_height"]) == (ow, oh), f"{key}: orig size {row['orig_width']}x{row['orig_height']} != Pillow {ow}x{oh}"
        assert (row["width"], row["height"]) == (SIZE, SIZE), f"{key}: width/height {row['width']}x{row['height']}"
        _, _, left, top = expected_crop(ow, oh, SIZE)
        assert (row["crop_left"], row["crop_top"]) == (left, top), (
            f"{key} ({ow}x{oh}): crop_left/top = {row['crop_left']},{row['crop_top']}, expected {left},{top}"
        )
        expected_caption = CAPTION if key == CAPTIONED else None
        assert row["caption"] == expected_caption, f"{key}: caption {row['caption']!r}, expected {expected_caption!r}"
    lat = tensor(table, "latent")
    assert lat.shape == (len(files), C, H, W), lat.shape
    assert np.isfinite(lat).all()
    # real TAEF2 latents: not constant, typical magnitude |x| < ~6, and different images differ
    assert 0.05 < float(np.abs(lat.astype(np.float32)).mean()) < 6, float(np.abs(lat).mean())
    for i in range(1, len(lat)):
        assert not np.array_equal(lat[0], lat[i]), f"rows 0 and {i} have identical latents"


def test_pyarrow_metadata(kodak_run, shared):
    enc_sha = sha256_file(shared / "models" / "taef2_encoder.onnx").hex()
    hashes = set()
    for f in shard_files(kodak_run["out"], SIZE):
        md = file_metadata(f)
        missing = [k for k in METADATA_KEYS if k not in md]
        assert not missing, f"{f.name}: metadata keys missing {missing}; present: {sorted(md)}"
        assert md["vae_pipeline.encoder_sha256"].lower() == enc_sha, (
            f"encoder_sha256 {md['vae_pipeline.encoder_sha256']} != sha256(taef2_encoder.onnx) {enc_sha}"
        )
        assert md["vae_pipeline.model"] == "taef2", md["vae_pipeline.model"]
        assert md["vae_pipeline.dtype"] == "f16", md["vae_pipeline.dtype"]
        assert float(md["vae_pipeline.scaling_factor"]) == 1.0, md["vae_pipeline.scaling_factor"]
        assert float(md["vae_pipeline.shift_factor"]) == 0.0, md["vae_pipeline.shift_factor"]
        hashes.add(md["vae_pipeline.identity_hash"])
        # README's one-liner: the Arrow schema carries the same metadata as the Parquet footer.
        schema_md = {k.decode(): v.decode() for k, v in (pq.read_schema(f).metadata or {}).items()}
        assert schema_md == {k: v for k, v in md.items() if k.startswith("vae_pipeline.")}, sorted(schema_md)
        # FORMAT.md: identity_hash is the sha256 of the identity's TOML, which says what made the latents.
        assert hashlib.sha256(md["vae_pipeline.identity"].encode()).hexdigest() == md["vae_pipeline.identity_hash"]
        identity = tomllib.loads(md["vae_pipeline.identity"])
        assert identity["framing"]["size"] == SIZE and identity["model"]["encoder_sha256"] == enc_sha, identity
        assert md["vae_pipeline.format_version"] == "2"
    assert len(hashes) == 1, f"shards of one run disagree on identity_hash: {hashes}"


# ---------------------------------------------------------------- polars

def test_polars_reads_same_rows(kodak_run, table):
    import polars as pl

    pattern = str(shard_dir(kodak_run["out"], SIZE) / "*.parquet")
    df = pl.read_parquet(pattern).sort("key")
    assert df.height == table.num_rows, (df.height, table.num_rows)
    assert df["key"].to_list() == table.column("key").to_pylist()
    assert df["caption"].to_list() == table.column("caption").to_pylist()
    assert df["crop_left"].to_list() == table.column("crop_left").to_pylist()
    lat = df["latent"].to_numpy()
    if lat.dtype == object:  # tolerate a list-of-arrays representation
        lat = np.stack([np.asarray(x) for x in lat])
    assert lat.shape[0] == table.num_rows and lat[0].size == C * H * W, f"polars latent numpy shape {lat.shape}"
    ref = tensor(table, "latent")
    np.testing.assert_array_equal(lat.reshape(ref.shape).astype(np.float32), ref.astype(np.float32))


# ---------------------------------------------------------------- Hugging Face datasets

def test_hf_plain_load_dataset_fails(kodak_run, tmp_path):
    from datasets import load_dataset

    files = [str(f) for f in shard_files(kodak_run["out"], SIZE)]
    with pytest.raises(Exception, match="datasets dtype equivalent|fixed_shape_tensor"):
        load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))


def test_hf_recipe(kodak_run, table, tmp_path):
    files = shard_files(kodak_run["out"], SIZE)
    ds, tensors = hf_load_latents(files, cache_dir=str(tmp_path / "hf"))
    lat = tensors["latent"]
    assert ds.num_rows == table.num_rows
    assert lat.dtype == np.float32 and lat.shape == (table.num_rows, C, H, W), (lat.dtype, lat.shape)
    # HF keeps file order; map its rows onto the key-sorted pyarrow table
    order = np.argsort(np.array(ds["key"], dtype=object))
    assert [ds["key"][i] for i in order] == table.column("key").to_pylist()
    ref = tensor(table, "latent").astype(np.float32)  # f16 -> f32 is exact
    np.testing.assert_array_equal(lat[order], ref)
    assert [ds["source_sha256"][i] for i in order] == table.column("source_sha256").to_pylist()
    assert [ds["caption"][i] for i in order] == table.column("caption").to_pylist()


# ---------------------------------------------------------------- dtypes: f32 and bf16

DTYPE_KEYS = ("kodim01.png", "kodim04.png")


@pytest.fixture(scope="module")
def dtype_runs(binary, cards, shared, tmp_path_factory):
    base = tmp_path_factory.mktemp("dtypes")
    inp = base / "in"
    _make_input(shared, inp, DTYPE_KEYS)
    outs = {}
    for dt in ("f32", "bf16"):
        outs[dt] = base / f"out-{dt}"
        run_precompute(binary, [
            "--input", inp, "--out", outs[dt], "--model", cards["taef2"], "--size", SIZE,
            "--dtype", dt, "--threads", 2,
        ])
    return outs


def test_dtype_f32(dtype_runs, table):
    files = shard_files(dtype_runs["f32"], SIZE)
    lt = pq.read_schema(files[0]).field("latent").type
    assert isinstance(lt, pa.FixedShapeTensorType) and lt.value_type == pa.float32(), lt
    assert file_metadata(files[0])["vae_pipeline.dtype"] == "f32"
    t32 = read_shards(dtype_runs["f32"], SIZE)
    assert t32.column("key").to_pylist() == sorted(DTYPE_KEYS)
    z32 = tensor(t32, "latent")
    assert z32.dtype == np.float32 and z32.shape == (2, C, H, W)
    # the default f16 run holds the same images: it must be the f32 latents rounded to f16
    keys16 = table.column("key").to_pylist()
    z16 = tensor(table, "latent")
    for i, key in enumerate(sorted(DTYPE_KEYS)):
        np.testing.assert_allclose(
            z16[keys16.index(key)].astype(np.float32), z32[i], rtol=1e-3, atol=1e-4,
            err_msg=f"{key}: f16 run is not the f32 run rounded to f16",
        )


def test_dtype_bf16(dtype_runs, tmp_path):
    files = shard_files(dtype_runs["bf16"], SIZE)
    lt = pq.read_schema(files[0]).field("latent").type
    assert isinstance(lt, pa.FixedShapeTensorType), lt
    assert lt.value_type == pa.uint16(), f"bf16 must be stored as uint16 bits, got {lt.value_type}"
    assert list(lt.shape) == [C, H, W]
    assert file_metadata(files[0])["vae_pipeline.dtype"] == "bf16"
    tb = read_shards(dtype_runs["bf16"], SIZE)
    t32 = read_shards(dtype_runs["f32"], SIZE)
    assert tb.column("key").to_pylist() == t32.column("key").to_pylist()
    bits = tensor(tb, "latent")
    assert bits.dtype == np.uint16
    zb = (bits.astype(np.uint32) << 16).view(np.float32)
    z32 = tensor(t32, "latent")
    np.testing.assert_allclose(zb, z32, rtol=1e-2, atol=1e-6, err_msg="bf16 bits are not the f32 latents rounded to bf16")
    # the HF recipe handles bf16 too
    ds, tensors = hf_load_latents(files, cache_dir=str(tmp_path / "hf"))
    order = np.argsort(np.array(ds["key"], dtype=object))
    np.testing.assert_array_equal(tensors["latent"][order], zb)


def test_hf_recipe_reads_flips_and_json_columns(binary, cards, shared, tmp_path):
    """--flip adds tensor columns and JSON sidecars add typed columns: the recipe reads both."""
    inp = tmp_path / "in"
    _make_input(shared, inp, DTYPE_KEYS)
    (inp / "kodim01.json").write_text(json.dumps({"aesthetic": 6.5, "source": "kodak", "nsfw": False}))
    (inp / "kodim04.json").write_text(json.dumps({"aesthetic": 5, "width_px": 512}))
    out = tmp_path / "out"
    run_precompute(binary, [
        "--input", inp, "--out", out, "--model", cards["taef2"], "--size", SIZE, "--flip",
        "--threads", 2,
    ])
    files = shard_files(out, SIZE)
    ds, tensors = hf_load_latents(files, cache_dir=str(tmp_path / "hf"))
    assert sorted(tensors) == ["latent", "latent_flip"]
    t = read_shards(out, SIZE)
    order = np.argsort(np.array(ds["key"], dtype=object))
    for name in tensors:
        assert tensors[name].shape == (2, C, H, W)
        np.testing.assert_array_equal(tensors[name][order], tensor(t, name).astype(np.float32))
    rows = {ds["key"][i]: i for i in range(ds.num_rows)}
    assert ds["aesthetic"][rows["kodim01.png"]] == 6.5 and ds["aesthetic"][rows["kodim04.png"]] == 5.0
    assert ds["source"][rows["kodim01.png"]] == "kodak" and ds["source"][rows["kodim04.png"]] is None
    assert ds["nsfw"][rows["kodim01.png"]] is False and ds["width_px"][rows["kodim04.png"]] == 512


def test_python_guide_quotes_the_tested_hf_recipe():
    """The Hugging Face recipe in docs/python.md is exactly the code these tests run."""
    import inspect

    import hf_recipe
    from vp_helpers import REPO

    guide = (REPO / "docs" / "python.md").read_text()
    assert inspect.getsource(hf_recipe.hf_load_latents) in guide
