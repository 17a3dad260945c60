"""`vae-pipeline convert`: trainers' own caches, read back by independent code.

The trainers' rules are transcribed in Python from their sources (kohya sd-scripts
library/model_util.py `make_bucket_resolutions` in bucket_reference.py, library/train_util.py `BucketManager.select_bucket`
and `get_crop_ltrb`; musubi-tuner dataset/bucket.py `BucketSelector`), independently of the Rust
code. Files are read with numpy (npz), safetensors and Hugging Face datasets. The encoders are
real ONNX graphs: avgpool8 from ../shared, and 16- and 32-channel pooling encoders built here
with onnx's own helpers to stand in for the FLUX.1 and FLUX.2 autoencoders' channel counts.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bucket_reference as br
from PIL import Image
from vp_helpers import REPO, pooling_encoder, require, run_precompute, tensor

sys.path.insert(0, str(REPO / "python"))
from vae_pipeline import read  # noqa: E402

KODAK = [f"kodim{i:02d}.png" for i in range(1, 25)]


def convert(binary, *args, ok=True):
    r = subprocess.run([str(binary), "convert", *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def rows_by_key(out):
    files = sorted(out.glob("*/part-*.parquet"))
    tables = [pq.read_table(f) for f in files]
    rows = {}
    for t in tables:
        lat = tensor(t, "latent")
        flip = tensor(t, "latent_flip") if "latent_flip" in t.column_names else None
        for i, key in enumerate(t.column("key").to_pylist()):
            rows[key] = {c: t.column(c)[i].as_py() for c in ("orig_width", "orig_height", "crop_top", "crop_left", "width", "height", "caption")}
            rows[key]["latent"] = lat[i].astype(np.float32)
            rows[key]["flip"] = None if flip is None else flip[i].astype(np.float32)
    return rows


# ------------------------------------------------------------- the trainers' rules, transcribed

def kohya_buckets(res, min_reso=256, max_reso=1024, steps=64):
    """make_bucket_resolutions after train_util's adjust_min_max_bucket_reso_by_steps."""
    return br.kohya_make_bucket_resolutions(res, min_reso - min_reso % steps, math.ceil(max_reso / steps) * steps, steps)


def kohya_select(resos, w, h):
    """BucketManager.select_bucket (predefined buckets, no bucket_no_upscale)."""
    if (w, h) in resos:
        reso = (w, h)
    else:
        ars = np.array([bw / bh for bw, bh in resos])
        reso = resos[int(np.argmin(np.abs(ars - w / h)))]
    scale = reso[1] / h if w / h > reso[0] / reso[1] else reso[0] / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    return reso, resized, ((resized[0] - reso[0]) // 2, (resized[1] - reso[1]) // 2)


def kohya_select_no_upscale(w, h, max_area, steps=64):
    """BucketManager.select_bucket with bucket_no_upscale."""
    ar = w / h

    def round_to_steps(x):
        x = int(x + 0.5)
        return x - x % steps

    if w * h > max_area:
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        bwr = round_to_steps(rw)
        ar_wr = bwr / round_to_steps(bwr / ar)
        bhr = round_to_steps(rh)
        ar_hr = round_to_steps(bhr * ar) / bhr
        resized = (bwr, int(bwr / ar + 0.5)) if abs(ar_wr - ar) < abs(ar_hr - ar) else (int(bhr * ar + 0.5), bhr)
    else:
        resized = (w, h)
    reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return reso, resized, ((resized[0] - reso[0]) // 2, (resized[1] - reso[1]) // 2)


def musubi_select(resolution, w, h, steps=16, no_upscale=False):
    """musubi-tuner BucketSelector (enable_bucket) + resize_image_to_bucket."""
    area = resolution[0] * resolution[1]
    if no_upscale and w * h <= area:
        reso = (w - w % steps, h - h % steps)
        scale = max(reso[0] / w, reso[1] / h)
        resized = (int(w * scale + 0.5), int(h * scale + 0.5))
        return reso, resized, ((resized[0] - reso[0]) // 2, (resized[1] - reso[1]) // 2)
    sqrt_size = int(math.sqrt(area))
    min_size = sqrt_size // 2 - (sqrt_size // 2) % steps
    resos = set()
    for bw in range(min_size, sqrt_size + steps, steps):
        bh = area // bw - (area // bw) % steps
        resos |= {(bw, bh), (bh, bw)}
    resos = sorted(resos)
    reso = resos[int(np.argmin(np.abs(np.array([a / b for a, b in resos]) - w / h)))]
    scale = max(reso[0] / w, reso[1] / h)
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    return reso, resized, ((resized[0] - reso[0]) // 2, (resized[1] - reso[1]) // 2)


def kohya_crop_ltrb(bucket, size):
    """BucketManager.get_crop_ltrb."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = size[0] / size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return [left, top, left + rw, top + rh]


# ------------------------------------------------------------------------- encoders and cards

def card(path, name, encoder, channels, scale, shift=0.0, extra=""):
    path.write_text(
        f'name = "{name}"\nencoder = "{encoder}"\ninput_range = [-1.0, 1.0]\noutput = "latent"\n'
        f"latent_channels = {channels}\nspatial_factor = 8\nscaling_factor = {scale!r}\n"
        f"shift_factor = {shift!r}\n{extra}"
    )
    return path


@pytest.fixture(scope="module")
def kodak(shared, tmp_path_factory):
    d = tmp_path_factory.mktemp("kodak")
    for name in KODAK:
        shutil.copyfile(require(shared / "data" / "kodak" / name, "Kodak photo"), d / name)
    (d / "kodim03.txt").write_text("parrots")
    return d


@pytest.fixture(scope="module")
def sdxl_like(shared, tmp_path_factory):
    """avgpool8 (4 channels) with SDXL's scaling, so the unscaling is checked."""
    d = tmp_path_factory.mktemp("sdxl-card")
    enc = require(shared / "models" / "avgpool8_encoder.onnx", "avgpool8")
    return card(d / "sdxl-like.toml", "sdxl-like", enc.resolve(), 4, 0.13025)


# ------------------------------------------------------------------------------------ kohya

@pytest.fixture(scope="module")
def bucketed(binary, kodak, sdxl_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("bucketed") / "shards"
    run_precompute(binary, ["--input", kodak, "--out", out, "--model", sdxl_like, "--size", 1024,
                            "--resize", "bucket", "--flip", "--dtype", "f32", "--threads", 2])
    return out


def test_kohya_sdxl_round_trip_on_kodak_buckets(binary, bucketed, kodak, tmp_path):
    cache = tmp_path / "cache"
    convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", bucketed, "--out", cache,
            "--resolution", 1024, "--enable-bucket", "--max-bucket-reso", 2048)
    resos = kohya_buckets((1024, 1024), max_reso=2048)
    rows = rows_by_key(bucketed)
    assert len(rows) == 24
    for key, row in rows.items():
        w, h = row["orig_width"], row["orig_height"]
        bucket, _, crop = kohya_select(resos, w, h)
        npz = np.load(cache / f"{key[:-4]}_{w:04d}x{h:04d}_sdxl.npz")
        assert sorted(npz.files) == ["crop_ltrb", "latents", "latents_flipped", "original_size"], npz.files
        lat = npz["latents"]
        assert lat.dtype == np.float32 and lat.shape == (4, bucket[1] // 8, bucket[0] // 8), (key, lat.shape, bucket)
        assert (row["width"], row["height"]) == bucket and (row["crop_left"], row["crop_top"]) == crop, key
        # kohya caches SDXL latents unscaled: the stored z * 0.13025 divided back.
        np.testing.assert_allclose(lat, row["latent"] / np.float32(0.13025), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(npz["latents_flipped"], row["flip"] / np.float32(0.13025), rtol=1e-6, atol=1e-6)
        assert npz["original_size"].dtype == np.int64 and npz["original_size"].tolist() == [w, h]
        assert npz["crop_ltrb"].dtype == np.float64
        np.testing.assert_allclose(npz["crop_ltrb"], kohya_crop_ltrb(bucket, (w, h)), rtol=0, atol=1e-9)

    again = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", bucketed, "--out", cache,
                    "--resolution", 1024, "--enable-bucket", "--max-bucket-reso", 2048)
    assert "wrote 0 file(s), 24 already up to date" in again.stderr, again.stderr


def test_kohya_refuses_buckets_it_would_not_make(binary, bucketed, tmp_path):
    # kohya's default --max_bucket_reso 1024 puts a 768x512 photo in 1024x704, not 1216x832.
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", bucketed, "--out", tmp_path / "c",
                "--resolution", 1024, "--enable-bucket", ok=False)
    assert r.returncode == 2
    assert "puts a 768x512 image in bucket 1024x704, the shards hold a 1216x832 window" in r.stderr, r.stderr
    assert "nothing was written" in r.stderr and not (tmp_path / "c").exists()
    r = convert(binary, "--to", "kohya", "--arch", "sd3", "--shards", bucketed, "--out", tmp_path / "c",
                "--resolution", 1024, "--enable-bucket", "--max-bucket-reso", 2048, ok=False)
    assert "4 latent channels; sd3 latents have 16" in r.stderr, r.stderr


def test_kohya_flux_keys_carry_the_latent_size(binary, kodak, shared, tmp_path):
    enc = pooling_encoder(tmp_path / "pool16.onnx", 16, seed=1)
    flux_like = card(tmp_path / "flux-like.toml", "flux-like", enc, 16, 0.3611, 0.1159)
    out = tmp_path / "shards"
    inp = tmp_path / "in"
    inp.mkdir()
    for name in KODAK[:3]:
        shutil.copyfile(kodak / name, inp / name)
    run_precompute(binary, ["--input", inp, "--out", out, "--model", flux_like, "--size", 256, "--dtype", "f32"])
    cache = tmp_path / "cache"
    convert(binary, "--to", "kohya", "--arch", "flux", "--shards", out, "--images", inp)
    for key, row in rows_by_key(out).items():
        w, h = row["orig_width"], row["orig_height"]
        # kohya without --enable_bucket: one bucket, the resolution (the shards' size here).
        _, _, crop = kohya_select([(256, 256)], w, h)
        assert (row["crop_left"], row["crop_top"]) == crop
        npz = np.load(inp / f"{key[:-4]}_{w:04d}x{h:04d}_flux.npz")
        assert sorted(npz.files) == ["crop_ltrb_32x32", "latents_32x32", "original_size_32x32"], npz.files
        # kohya's FLUX cache holds 0.3611 * (z - 0.1159): what these shards store.
        np.testing.assert_allclose(npz["latents_32x32"], row["latent"], rtol=1e-5, atol=1e-5)
    assert not cache.exists()


def test_unsafe_keys_and_dist_latents_are_refused(binary, bucketed, kodak, shared, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(bucketed, hostile)
    part = sorted(hostile.glob("*/part-*.parquet"))[0]
    t = pq.read_table(part)
    keys = t.column("key").to_pylist()
    keys[0] = "../../escaped.png"
    t = t.set_column(t.column_names.index("key"), "key", pa.array(keys))
    pq.write_table(t, part)
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", hostile, "--out", tmp_path / "c",
                "--resolution", 1024, "--enable-bucket", "--max-bucket-reso", 2048, ok=False)
    assert r.returncode == 2 and "not a valid key" in r.stderr, r.stderr
    assert not list(tmp_path.rglob("escaped*"))

    kl = require(shared / "models" / "tiny_kl_encoder.onnx", "tiny KL")
    kl_card = tmp_path / "kl.toml"
    kl_card.write_text(f'name = "sd15"\nencoder = "{kl.resolve()}"\ninput_range = [-1.0, 1.0]\noutput = "moments"\n'
                       "latent_channels = 4\nspatial_factor = 2\nscaling_factor = 0.18215\n")
    dist = tmp_path / "dist"
    run_precompute(binary, ["--input", kodak, "--out", dist, "--model", kl_card, "--size", 64,
                            "--latent-mode", "dist", "--limit", 2])
    r = convert(binary, "--to", "kohya", "--shards", dist, "--out", tmp_path / "d", ok=False)
    assert r.returncode == 2 and "`dist` latents" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------- musubi

def test_musubi_flux2_safetensors(binary, kodak, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    enc = pooling_encoder(tmp_path / "pool32.onnx", 32, seed=2)
    rng = np.random.default_rng(3)
    mean, var = rng.standard_normal(128) * 0.1, rng.uniform(0.5, 2.0, 128)
    bn = ("[batch_norm]\npatch_size = 2\neps = 1e-4\n"
          f"running_mean = {json.dumps(mean.tolist())}\nrunning_var = {json.dumps(var.tolist())}\n")
    flux2_like = card(tmp_path / "flux2-like.toml", "flux2-like", enc, 32, 1.0, extra=bn)
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    for name in KODAK[:3]:
        shutil.copyfile(kodak / name, inp / name)
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", flux2_like, "--size", 256, "--dtype", "f32"])
    cache = tmp_path / "cache"
    convert(binary, "--to", "musubi", "--shards", out, "--out", cache, "--resolution", 256)
    for key, row in rows_by_key(out).items():
        w, h = row["orig_width"], row["orig_height"]
        path = cache / f"{key[:-4]}_{w:04d}x{h:04d}_f2d.safetensors"
        tensors = load_file(path)
        assert list(tensors) == ["latents_16x16_float32"], list(tensors)
        np.testing.assert_array_equal(tensors["latents_16x16_float32"], row["latent"])
        with safe_open(path, "np") as f:
            assert f.metadata() == {"architecture": "flux_2_dev", "width": str(w), "height": str(h),
                                    "format_version": "1.0.1"}

    # musubi reads one flat cache folder by base name: two images named alike are refused.
    shutil.copyfile(kodak / KODAK[0], inp / "sub" / KODAK[0])
    run_precompute(binary, ["--input", inp, "--out", out, "--model", flux2_like, "--size", 256, "--dtype", "f32"])
    r = convert(binary, "--to", "musubi", "--shards", out, "--out", tmp_path / "c2", "--resolution", 256, ok=False)
    assert r.returncode == 2 and 'share the base name "kodim01"' in r.stderr, r.stderr


# -------------------------------------------------------------------------------- diffusers

def test_diffusers_dataset_loads_with_datasets(binary, kodak, sdxl_like, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "shards"
    run_precompute(binary, ["--input", kodak, "--out", out, "--model", sdxl_like, "--size", 256,
                            "--dtype", "f32", "--limit", 5])
    ds_dir = tmp_path / "ds"
    convert(binary, "--to", "diffusers", "--arch", "sdxl", "--shards", out, "--out", ds_dir)
    ds = load_dataset("parquet", data_dir=str(ds_dir), split="train", cache_dir=str(tmp_path / "hf"))
    ds = ds.with_format("numpy")
    rows = rows_by_key(out)
    assert sorted(ds["key"]) == sorted(rows)
    for i, key in enumerate(ds["key"]):
        row = rows[key]
        model_input = ds[i]["model_input"]
        # compute_vae_encodings stores sample * vae.config.scaling_factor (0.13025 for SDXL).
        assert model_input.shape == (4, 32, 32) and model_input.dtype == np.float32
        np.testing.assert_allclose(model_input, row["latent"], rtol=1e-6, atol=1e-6)
        assert ds[i]["original_sizes"].tolist() == [row["orig_height"], row["orig_width"]]
        assert ds[i]["crop_top_lefts"].tolist() == [row["crop_top"], row["crop_left"]]
        assert ds[i]["text"] == row["caption"]


# ----------------------------------------------------------------- the trainers' own buckets

def photo(src, dest, w, h):
    """A Kodak photo resized to w x h (a real image of an awkward size)."""
    Image.open(src).convert("RGB").resize((w, h), Image.BILINEAR).save(dest)


def test_precompute_makes_kohyas_buckets_and_convert_reads_them(binary, kodak, sdxl_like, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    # Issue 21: the log-ratio rule puts these two elsewhere (1216x832 and 1664x576) than kohya.
    sizes = {"a.png": (961, 701), "b.png": (1333, 495), "c.png": (768, 512), "d.png": (700, 1200)}
    for (name, (w, h)), src in zip(sizes.items(), KODAK):
        photo(kodak / src, inp / name, w, h)
    generated = tmp_path / "generated"
    run_precompute(binary, ["--input", inp, "--out", generated, "--model", sdxl_like, "--size", 1024,
                            "--resize", "bucket", "--dtype", "f32", "--threads", 2])
    kohya_flags = ["--resolution", 1024, "--enable-bucket", "--max-bucket-reso", 2048]
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", generated, "--out", tmp_path / "x",
                *kohya_flags, ok=False)
    assert "2 of 4 row(s) cannot be written" in r.stderr and "--buckets kohya" in r.stderr, r.stderr

    # One setting, in the preset as on the command line.
    preset = tmp_path / "kohya.toml"
    preset.write_text('resize = "bucket"\nbuckets = "kohya"\nbucket_res = 1024\nmax_bucket_reso = 2048\n')
    out = tmp_path / "shards"
    run_precompute(binary, ["--pipeline", preset, "--input", inp, "--out", out, "--model", sdxl_like,
                            "--dtype", "f32", "--threads", 2])
    resos = kohya_buckets((1024, 1024), max_reso=2048)
    rows = rows_by_key(out)
    for key, row in rows.items():
        bucket, _, crop = kohya_select(resos, row["orig_width"], row["orig_height"])
        assert ((row["width"], row["height"]), (row["crop_left"], row["crop_top"])) == (bucket, crop), key
    assert (rows["a.png"]["width"], rows["a.png"]["height"]) == (1152, 896)
    assert (rows["b.png"]["width"], rows["b.png"]["height"]) == (1600, 640)
    meta = pq.read_metadata(next(out.glob("*/part-*.parquet"))).metadata
    assert meta[b"vae_pipeline.resize"].decode() == ("bucket kohya --resolution 1024,1024 --enable_bucket "
                                                     "--min_bucket_reso 256 --max_bucket_reso 2048 --bucket_reso_steps 64")

    # convert reads the bucket settings from the shards: no flags, no refused row.
    cache = tmp_path / "cache"
    convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", out, "--out", cache)
    assert len(list(cache.glob("*.npz"))) == 4
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", out, "--out", cache, *kohya_flags, ok=False)
    assert "drop --resolution, --enable-bucket, --max-bucket-reso" in r.stderr, r.stderr
    r = convert(binary, "--to", "musubi", "--arch", "z-image", "--shards", out, "--out", cache, ok=False)
    assert "precompute again with --buckets musubi" in r.stderr, r.stderr

    # --bucket_no_upscale: small images keep their size, large ones shrink to the area.
    small = tmp_path / "small"
    run_precompute(binary, ["--input", inp, "--out", small, "--model", sdxl_like, "--size", 768,
                            "--resize", "bucket", "--buckets", "kohya", "--no-upscale", "--dtype", "f32"])
    for key, row in rows_by_key(small).items():
        bucket, _, crop = kohya_select_no_upscale(row["orig_width"], row["orig_height"], 768 * 768)
        assert ((row["width"], row["height"]), (row["crop_left"], row["crop_top"])) == (bucket, crop), key
    convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", small, "--out", tmp_path / "small-cache")


def test_precompute_makes_musubis_buckets(binary, kodak, tmp_path):
    from safetensors.numpy import load_file

    enc = pooling_encoder(tmp_path / "pool16.onnx", 16, seed=4)
    flux_like = card(tmp_path / "flux1.toml", "flux1", enc, 16, 0.3611, 0.1159)
    inp = tmp_path / "in"
    inp.mkdir()
    sizes = {"a.png": (961, 701), "b.png": (1333, 495), "c.png": (512, 512), "d.png": (300, 203)}
    for (name, (w, h)), src in zip(sizes.items(), KODAK):
        photo(kodak / src, inp / name, w, h)
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", flux_like, "--size", 512,
                            "--resize", "bucket", "--buckets", "musubi", "--dtype", "f32"])
    rows = rows_by_key(out)
    for key, row in rows.items():
        bucket, _, crop = musubi_select((512, 512), row["orig_width"], row["orig_height"])
        assert ((row["width"], row["height"]), (row["crop_left"], row["crop_top"])) == (bucket, crop), key
    cache = tmp_path / "cache"
    convert(binary, "--to", "musubi", "--arch", "z-image", "--shards", out, "--out", cache)
    assert len(list(cache.glob("*_zi.safetensors"))) == 4
    r = convert(binary, "--to", "kohya", "--arch", "flux", "--shards", out, "--out", cache, ok=False)
    assert "precompute again with --buckets kohya" in r.stderr, r.stderr

    small = tmp_path / "small"
    run_precompute(binary, ["--input", inp, "--out", small, "--model", flux_like, "--size", 512,
                            "--resize", "bucket", "--buckets", "musubi", "--no-upscale", "--dtype", "f32"])
    rows = rows_by_key(small)
    assert (rows["d.png"]["width"], rows["d.png"]["height"]) == (288, 192)
    for key, row in rows.items():
        bucket, _, crop = musubi_select((512, 512), row["orig_width"], row["orig_height"], no_upscale=True)
        assert ((row["width"], row["height"]), (row["crop_left"], row["crop_top"])) == (bucket, crop), key
    convert(binary, "--to", "musubi", "--arch", "z-image", "--shards", small, "--out", tmp_path / "small-cache")


# ---------------------------------------------------------------------- musubi's other writers

def test_musubi_z_image_and_kontext(binary, kodak, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    enc = pooling_encoder(tmp_path / "pool16.onnx", 16, seed=5)
    flux_like = card(tmp_path / "flux1.toml", "flux1", enc, 16, 0.3611, 0.1159)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in KODAK[:2]:
        shutil.copyfile(kodak / name, inp / name)
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", flux_like, "--size", 256, "--dtype", "f32"])
    cache = tmp_path / "cache"
    convert(binary, "--to", "musubi", "--arch", "z-image", "--shards", out, "--out", cache, "--resolution", 256)
    for key, row in rows_by_key(out).items():
        w, h = row["orig_width"], row["orig_height"]
        path = cache / f"{key[:-4]}_{w:04d}x{h:04d}_zi.safetensors"
        tensors = load_file(path)
        # save_latent_cache_z_image: a (C, H, W) latent under latents_1x{H}x{W}; the VAE's mode,
        # unscaled (zimage_cache_latents.py).
        assert list(tensors) == ["latents_1x32x32_float32"], list(tensors)
        lat = tensors["latents_1x32x32_float32"]
        assert lat.shape == (16, 32, 32) and lat.dtype == np.float32
        np.testing.assert_allclose(lat, row["latent"] / np.float32(0.3611) + np.float32(0.1159), rtol=1e-5, atol=1e-5)
        with safe_open(path, "np") as f:
            assert f.metadata() == {"architecture": "z_image", "width": str(w), "height": str(h),
                                    "format_version": "1.0.1"}
    r = convert(binary, "--to", "musubi", "--arch", "flux-kontext", "--shards", out, "--out", tmp_path / "k", ok=False)
    assert r.returncode == 2 and "latents_control_" in r.stderr and "control images" in r.stderr, r.stderr
    assert not (tmp_path / "k").exists()


QWEN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
             -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
QWEN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
            1.6382, 1.1253, 2.8251, 1.916]


def test_musubi_qwen_image_per_channel(binary, kodak, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    enc = pooling_encoder(tmp_path / "pool16.onnx", 16, seed=6)
    per_channel = f"latents_mean = {json.dumps(QWEN_MEAN)}\nlatents_std = {json.dumps(QWEN_STD)}\n"
    qwen = card(tmp_path / "qwen-image.toml", "qwen-image", enc, 16, 1.0, extra=per_channel)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in KODAK[:2]:
        shutil.copyfile(kodak / name, inp / name)
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", qwen, "--size", 256, "--dtype", "f32"])
    cache = tmp_path / "cache"
    convert(binary, "--to", "musubi", "--shards", out, "--out", cache)
    rows = rows_by_key(out)
    for key, row in rows.items():
        w, h = row["orig_width"], row["orig_height"]
        path = cache / f"{key[:-4]}_{w:04d}x{h:04d}_qi.safetensors"
        tensors = load_file(path)
        # save_latent_cache_qwen_image: (C, F, H, W) = (16, 1, h, w), normalized (z - mean) / std as
        # these shards store it.
        assert list(tensors) == ["latents_1x32x32_float32"], list(tensors)
        np.testing.assert_array_equal(tensors["latents_1x32x32_float32"], row["latent"][:, None])
        with safe_open(path, "np") as f:
            assert f.metadata()["architecture"] == "qwen_image"

    # Another card's per-channel statistics are undone and musubi's applied.
    mean, std = np.linspace(-1, 1, 16), np.linspace(0.5, 3, 16)
    other = card(tmp_path / "other.toml", "other", enc, 16, 1.0,
                 extra=f"latents_mean = {json.dumps(mean.tolist())}\nlatents_std = {json.dumps(std.tolist())}\n")
    out2 = tmp_path / "shards2"
    run_precompute(binary, ["--input", inp, "--out", out2, "--model", other, "--size", 256, "--dtype", "f32"])
    r = convert(binary, "--to", "kohya", "--arch", "flux", "--shards", out2, "--out", tmp_path / "k", ok=False)
    assert "--to musubi --arch qwen-image" in r.stderr, r.stderr
    convert(binary, "--to", "musubi", "--arch", "qwen-image", "--shards", out2, "--out", tmp_path / "c2")
    for key, row in rows_by_key(out2).items():
        w, h = row["orig_width"], row["orig_height"]
        got = load_file(tmp_path / "c2" / f"{key[:-4]}_{w:04d}x{h:04d}_qi.safetensors")["latents_1x32x32_float32"]
        z = row["latent"] * std[:, None, None] + mean[:, None, None]
        want = (z - np.array(QWEN_MEAN)[:, None, None]) / np.array(QWEN_STD)[:, None, None]
        np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4)


def test_musubi_wan_images_and_reruns_leave_files_alone(binary, kodak, tmp_path):
    """--arch wan: musubi's Wan image cache (the Wan 2.1 VAE, Qwen-Image's, per-channel
    normalized as these shards are); a rerun writes nothing (the header order used to change from
    run to run, so every musubi file was rewritten)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    enc = pooling_encoder(tmp_path / "pool16.onnx", 16, seed=6)
    per_channel = f"latents_mean = {json.dumps(QWEN_MEAN)}\nlatents_std = {json.dumps(QWEN_STD)}\n"
    qwen = card(tmp_path / "qwen-image.toml", "qwen-image", enc, 16, 1.0, extra=per_channel)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in KODAK[:2]:
        shutil.copyfile(kodak / name, inp / name)
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", qwen, "--size", 256, "--dtype", "f32"])
    cache = tmp_path / "cache"
    convert(binary, "--to", "musubi", "--arch", "wan", "--shards", out, "--out", cache)
    for key, row in rows_by_key(out).items():
        w, h = row["orig_width"], row["orig_height"]
        path = cache / f"{key[:-4]}_{w:04d}x{h:04d}_wan.safetensors"
        tensors = load_file(path)
        # save_latent_cache_wan of an image: (C, F, H, W) = (16, 1, h, w); no frame_count.
        assert list(tensors) == ["latents_1x32x32_float32"], list(tensors)
        np.testing.assert_array_equal(tensors["latents_1x32x32_float32"], row["latent"][:, None])
        with safe_open(path, "np") as f:
            assert f.metadata() == {"architecture": "wan", "width": str(w), "height": str(h),
                                    "format_version": "1.0.1"}
    for arch in ["wan", "qwen-image"]:
        convert(binary, "--to", "musubi", "--arch", arch, "--shards", out, "--out", tmp_path / arch)
        r = convert(binary, "--to", "musubi", "--arch", arch, "--shards", out, "--out", tmp_path / arch)
        assert "wrote 0 file(s), 2 already up to date" in r.stderr, r.stderr


def test_musubi_refuses_one_base_name_in_two_folders(binary, kodak, tmp_path):
    enc = pooling_encoder(tmp_path / "pool16.onnx", 16, seed=7)
    flux_like = card(tmp_path / "flux1.toml", "flux1", enc, 16, 0.3611, 0.1159)
    inp = tmp_path / "in"
    for sub in ("s1", "s2"):
        (inp / sub).mkdir(parents=True)
    # Different sizes: two latent files, but one `img_zi_te.safetensors` text-encoder cache.
    photo(kodak / KODAK[0], inp / "s1" / "img.png", 512, 768)
    photo(kodak / KODAK[1], inp / "s2" / "img.png", 768, 512)
    (inp / "s1" / "img.txt").write_text("a parrot")
    (inp / "s2" / "img.txt").write_text("a lighthouse")
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", flux_like, "--size", 512,
                            "--resize", "bucket", "--buckets", "musubi"])
    r = convert(binary, "--to", "musubi", "--arch", "z-image", "--shards", out, "--out", tmp_path / "c", ok=False)
    assert r.returncode == 2 and 'share the base name "img"' in r.stderr and "img_zi_te.safetensors" in r.stderr, r.stderr
    assert "to fix: give every image a distinct file name" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------ unfinished sets

def test_unfinished_sets_are_refused_unless_asked(binary, kodak, sdxl_like, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in KODAK[:3]:
        shutil.copyfile(kodak / name, inp / name)
    out = tmp_path / "parts"
    run_precompute(binary, ["--input", inp, "--out", out, "--model", sdxl_like, "--size", 64,
                            "--partitions", 3, "--partition", 0])
    assert not (out / "_SUCCESS").exists()
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", out, "--out", tmp_path / "c", ok=False)
    assert r.returncode == 2 and "1 of 3 partitions are done" in r.stderr and "partitions 1,2 missing" in r.stderr, r.stderr
    assert "--allow-partial" in r.stderr and not (tmp_path / "c").exists()
    convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", out, "--out", tmp_path / "c", "--allow-partial")
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    with pytest.raises(FileNotFoundError, match="partitions 1, 2 are not"):
        read(out)
    assert read(out, require_success=False).num_rows == 1

    whole = tmp_path / "whole"
    run_precompute(binary, ["--input", inp, "--out", whole, "--model", sdxl_like, "--size", 64])
    (whole / "_SUCCESS").unlink()
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", whole, "--out", tmp_path / "d", ok=False)
    assert "has no _SUCCESS" in r.stderr and "it resumes" in r.stderr, r.stderr
    with pytest.raises(FileNotFoundError, match="_SUCCESS is missing"):
        read(whole)
    assert read(whole, require_success=False).num_rows == 3


# --------------------------------------------------------------------------------- rough edges

def test_refusals_count_rows_and_say_what_to_do(binary, bucketed, tmp_path):
    r = convert(binary, "--to", "diffusers", "--arch", "sdxl", "--shards", bucketed, "--out", tmp_path / "d",
                "--resolution", 1024, ok=False)
    assert "24 of 24 row(s) cannot be written" in r.stderr and "… and 17 more" in r.stderr, r.stderr
    assert "\n  the shards hold 2 window sizes" in r.stderr, r.stderr
    assert "to fix: pass the --resolution you train at" in r.stderr, r.stderr
    r = convert(binary, "--to", "diffusers", "--arch", "sdxl", "--shards", bucketed, "--out", tmp_path / "d",
                "--resolution", "1216,832", ok=False)
    assert "--resolution 1216x832: the diffusers script trains on squares" in r.stderr, r.stderr


def test_kohya_from_a_tar_writes_folders_kohya_can_use(binary, kodak, sdxl_like, tmp_path):
    import tarfile

    tar = tmp_path / "00003.tar"
    with tarfile.open(tar, "w") as t:
        for i, name in enumerate(KODAK[:2]):
            t.add(kodak / name, arcname=f"{i:09d}.png")
    out = tmp_path / "shards"
    run_precompute(binary, ["--input", tar, "--out", out, "--model", sdxl_like, "--size", 64])
    cache = tmp_path / "cache"
    r = convert(binary, "--to", "kohya", "--arch", "sdxl", "--shards", out, "--out", cache)
    files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.npz"))
    assert files == ["00003/000000000_0768x0512_sdxl.npz", "00003/000000001_0768x0512_sdxl.npz"], files
    assert "tar -xf 00003.tar -C 00003" in r.stderr, r.stderr
