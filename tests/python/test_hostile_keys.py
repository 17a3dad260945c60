"""Shard sets are downloaded from strangers: a key must never name a file outside its root.

One real shard set (avgpool8 on Kodak photos, read and rewritten with pyarrow) gets one hostile
key at a time: `..` and absolute paths, percent-escaped `/` that only appears after decoding
(`..%2Fzone%2Fx.png`, `%2Ftmp%2F...`), empty components. Every place that turns keys into paths
runs on it inside a sandbox folder: each `convert` target (kohya with `--out` and beside the
images with `--images`, musubi, diffusers) and `report --shards --input`. None may write a file
outside its own output folder, each must refuse and name the key, and `verify` must fail.
"""
from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vp_helpers import pooling_encoder, require, run_precompute

PHOTOS = [f"kodim{i:02d}.png" for i in (1, 2, 3)]
ESCAPE = f"vp-escape-{uuid.uuid4().hex[:12]}"

HOSTILE = [
    "../../escaped.png",
    f"..%2F..%2F{ESCAPE}.png",
    f"%2Ftmp%2F{ESCAPE}.png",
    f"/tmp/{ESCAPE}.png",
    f"a/%2E%2E/%2E%2E/%2E%2E/{ESCAPE}.png",
    "a//b.png",
    "",
    "x/.",
]


@pytest.fixture(scope="module")
def photos(shared, tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copyfile(require(shared / "data" / "kodak" / name, "Kodak photo"), d / name)
    return d


@pytest.fixture(scope="module")
def clean_sets(binary, photos, shared, tmp_path_factory):
    """Three real sets: 16 channels (kohya flux, musubi z-image), avgpool8's 4 (diffusers sdxl),
    and TAEF2 with its decoder (the report)."""
    d = tmp_path_factory.mktemp("cards")
    models = shared / "models"
    pool16 = pooling_encoder(d / "pool16.onnx", 16)
    pool4 = require(models / "avgpool8_encoder.onnx", "avgpool8 encoder").resolve()
    taef2 = require(models / "taef2_encoder.onnx", "TAEF2 encoder").resolve()
    taef2_dec = require(models / "taef2_decoder.onnx", "TAEF2 decoder").resolve()
    sets = {}
    for name, enc, extra, rng, channels, scale, shift, size in (
        ("flux", pool16, "", -1.0, 16, 0.3611, 0.1159, 256),
        ("sdxl", pool4, "", -1.0, 4, 0.13025, 0.0, 256),
        ("report", taef2, f'decoder = "{taef2_dec}"\n', 0.0, 32, 1.0, 0.0, 64),
    ):
        card = d / f"{name}-like.toml"
        card.write_text(
            f'name = "{name}-like"\nencoder = "{enc}"\n{extra}input_range = [{rng}, 1.0]\n'
            f'output = "latent"\nlatent_channels = {channels}\nspatial_factor = 8\n'
            f"scaling_factor = {scale}\nshift_factor = {shift}\n"
        )
        out = d / f"{name}-shards"
        run_precompute(binary, ["--input", photos, "--out", out, "--model", card, "--size", size,
                                "--dtype", "f32", "--threads", 2])
        sets[name] = (out, card)
    return sets


def with_key(clean: Path, dest: Path, key: str) -> Path:
    """A copy of the clean set whose first row's key is `key` (everything else untouched)."""
    shutil.copytree(clean, dest)
    part = sorted(dest.glob("*/part-*.parquet"))[0]
    table = pq.read_table(part)
    keys = table.column("key").to_pylist()
    keys[0] = key
    i = table.column_names.index("key")
    table = table.set_column(i, table.schema.field(i), pa.array(keys, pa.string()))
    pq.write_table(table, part)
    return dest


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def run(binary, *args):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("key", HOSTILE, ids=lambda k: repr(k))
def test_no_writer_leaves_its_root_for_a_hostile_key(binary, clean_sets, photos, tmp_path, key):
    sandbox = tmp_path / "sandbox"
    deep = sandbox / "a" / "b" / "c"
    deep.mkdir(parents=True)
    flux = with_key(clean_sets["flux"][0], deep / "flux-shards", key)
    sdxl = with_key(clean_sets["sdxl"][0], deep / "sdxl-shards", key)
    taef2 = with_key(clean_sets["report"][0], deep / "report-shards", key)
    images = deep / "images"
    shutil.copytree(photos, images)

    convert = ["convert", "--resolution", 256, "--to"]
    writers = {
        "kohya --out": (deep / "kohya", [*convert, "kohya", "--arch", "flux", "--shards", flux,
                                         "--out", deep / "kohya"]),
        "kohya --images": (images, [*convert, "kohya", "--arch", "flux", "--shards", flux,
                                    "--images", images]),
        "musubi": (deep / "musubi", [*convert, "musubi", "--arch", "z-image", "--shards", flux,
                                     "--out", deep / "musubi"]),
        "diffusers": (deep / "diffusers", [*convert, "diffusers", "--arch", "sdxl", "--shards", sdxl,
                                           "--out", deep / "diffusers"]),
        "report": (deep / "report", ["report", "--shards", taef2, "--model", clean_sets["report"][1],
                                     "--input", images, "--out", deep / "report"]),
    }
    for name, (root, args) in writers.items():
        before = files_under(sandbox)
        r = run(binary, *args)
        made = files_under(sandbox) - before
        outside = sorted(p for p in made if not p.resolve().is_relative_to(root.resolve()))
        assert not outside, f"{name} wrote outside {root}: {outside}"
        assert not list(Path("/tmp").glob(f"{ESCAPE}*")), f"{name} wrote into /tmp"
        assert r.returncode != 0, f"{name} accepted the key {key!r}:\n{r.stderr}"
        assert "not a valid key" in r.stderr and f'"{key}"' in r.stderr, (
            f"{name} did not name the key {key!r}:\n{r.stderr}")

    for shards in (flux, sdxl, taef2):
        v = run(binary, "verify", shards)
        assert v.returncode != 0, f"verify passed a set with the key {key!r}:\n{v.stdout}{v.stderr}"
        assert "key rule" in v.stdout + v.stderr, v.stdout + v.stderr


def test_the_clean_sets_convert_report_and_verify(binary, clean_sets, photos, tmp_path):
    """The same commands on the untouched sets succeed: the refusals above are the keys'."""
    for shards, _ in clean_sets.values():
        assert run(binary, "verify", shards).returncode == 0
    r = run(binary, "convert", "--to", "kohya", "--arch", "flux", "--shards", clean_sets["flux"][0],
            "--out", tmp_path / "kohya", "--resolution", 256)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "kohya").rglob("*.npz"))) == len(PHOTOS)
    shards, card = clean_sets["report"]
    r = run(binary, "report", "--shards", shards, "--model", card, "--input", photos, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
