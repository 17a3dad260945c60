"""Inputs other than a folder: WebDataset tars (made with Python's tarfile), Parquet with a Hugging
Face `Image` column (made with `datasets`), globs and brace ranges. The same Kodak photos three
ways must give identical latents and identical caption and metadata columns; hostile or broken
containers give error lines while the rest is still encoded."""
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vp_helpers import environment, moto_server, read_shards, require, run_precompute, s3_env, tensor

SIZE = 128
STEMS = [f"kodim{i:02d}" for i in range(1, 9)]


def meta(i: int) -> dict:
    return {"idx": i, "score": i * 0.5, "tag": f"t{i}"}


@pytest.fixture(scope="module")
def photos(shared) -> dict[str, bytes]:
    return {s: require(shared / "data" / "kodak" / f"{s}.png", "Kodak photo").read_bytes() for s in STEMS}


def add(tar: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def inputs(photos, tmp_path_factory) -> Path:
    """The same samples as a folder with sidecars, two tars, one .tar.gz and one Parquet file."""
    d = tmp_path_factory.mktemp("sources")
    (d / "folder").mkdir()
    (d / "tars").mkdir()
    for i, stem in enumerate(STEMS):
        (d / "folder" / f"{stem}.png").write_bytes(photos[stem])
        (d / "folder" / f"{stem}.txt").write_text(f"caption {stem}\n")
        (d / "folder" / f"{stem}.json").write_text(json.dumps(meta(i)))
    for shard, stems in enumerate([STEMS[:4], STEMS[4:]]):
        with tarfile.open(d / "tars" / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for stem in stems:
                i = STEMS.index(stem)
                add(tar, f"{stem}.png", photos[stem])
                add(tar, f"{stem}.txt", f"caption {stem}\n".encode())
                add(tar, f"{stem}.json", json.dumps(meta(i)).encode())
    (d / "gz").mkdir()
    (d / "gz" / "00000.tar.gz").write_bytes(gzip.compress((d / "tars" / "00000.tar").read_bytes()))

    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "key": STEMS,
            "image": [{"bytes": photos[s], "path": f"{s}.png"} for s in STEMS],
            "caption": [f"caption {s}" for s in STEMS],
            "idx": [meta(i)["idx"] for i in range(len(STEMS))],
            "score": [meta(i)["score"] for i in range(len(STEMS))],
            "tag": [meta(i)["tag"] for i in range(len(STEMS))],
        }
    ).cast_column("image", datasets.Image())
    (d / "pq").mkdir()
    ds.to_parquet(str(d / "pq" / "train.parquet"))
    image_type = pq.read_schema(d / "pq" / "train.parquet").field("image").type
    assert pa.types.is_struct(image_type) and image_type.field("bytes").type == pa.binary(), image_type
    assert pq.read_table(d / "pq" / "train.parquet").column("image")[0].as_py()["bytes"] == photos[STEMS[0]]
    return d


def encode(binary, cards, input_spec, out: Path, *extra) -> pa.Table:
    run_precompute(binary, ["--input", input_spec, "--out", out, "--model", cards["taef2"], "--size", SIZE, *extra])
    return read_shards(out, SIZE)


def by_stem(table: pa.Table, stem_of) -> dict:
    rows = {}
    latents = tensor(table, "latent")
    for i, key in enumerate(table.column("key").to_pylist()):
        rows[stem_of(key)] = {
            "latent": latents[i],
            "sha": table.column("source_sha256")[i].as_py(),
            "caption": table.column("caption")[i].as_py(),
            **{c: table.column(c)[i].as_py() for c in ("idx", "score", "tag")},
        }
    return rows


def test_folder_tars_and_parquet_give_identical_rows(binary, cards, inputs, tmp_path):
    folder = by_stem(encode(binary, cards, inputs / "folder", tmp_path / "folder"), lambda k: k.removesuffix(".png"))
    tars_table = encode(binary, cards, f"{inputs}/tars/*.tar", tmp_path / "glob")
    assert sorted(tars_table.column("key").to_pylist()) == sorted(
        [f"00000.tar/{s}" for s in STEMS[:4]] + [f"00001.tar/{s}" for s in STEMS[4:]]
    )
    tars = by_stem(tars_table, lambda k: k.split("/")[1])
    parquet_table = encode(binary, cards, inputs / "pq" / "train.parquet", tmp_path / "pq")
    assert sorted(parquet_table.column("key").to_pylist()) == [f"train.parquet/{s}" for s in STEMS]
    parquet = by_stem(parquet_table, lambda k: k.split("/")[1])
    assert set(folder) == set(tars) == set(parquet) == set(STEMS)
    for stem in STEMS:
        want = folder[stem]
        assert want["caption"] == f"caption {stem}"
        assert want["idx"] == STEMS.index(stem)
        for name, got in (("tars", tars[stem]), ("parquet", parquet[stem])):
            assert np.array_equal(got["latent"], want["latent"]), f"{name} {stem}: latents differ"
            for field in ("sha", "caption", "idx", "score", "tag"):
                assert got[field] == want[field], f"{name} {stem}: {field} {got[field]!r} != {want[field]!r}"
    for table in (tars_table, parquet_table):
        assert table.schema.field("idx").type == pa.int64()
        assert table.schema.field("score").type == pa.float64()


def test_brace_range_and_gzip_name_the_same_samples(binary, cards, inputs, tmp_path):
    brace = encode(binary, cards, f"{inputs}/tars/{{00000..00001}}.tar", tmp_path / "brace")
    glob = encode(binary, cards, f"{inputs}/tars/0000[01].tar", tmp_path / "glob")
    assert brace.column("key").to_pylist() == glob.column("key").to_pylist()
    assert np.array_equal(tensor(brace, "latent"), tensor(glob, "latent"))
    gz = encode(binary, cards, inputs / "gz" / "00000.tar.gz", tmp_path / "gz")
    assert gz.column("key").to_pylist() == [f"00000.tar.gz/{s}" for s in STEMS[:4]]
    assert np.array_equal(tensor(gz, "latent"), tensor(brace, "latent")[:4])


def test_resume_reencodes_only_changed_tar_samples(binary, cards, inputs, photos, tmp_path):
    tars = tmp_path / "tars"
    shutil.copytree(inputs / "tars", tars)
    out = tmp_path / "out"
    first = encode(binary, cards, f"{tars}/*.tar", out)
    # Rewrite 00001.tar with one changed caption and one changed image.
    with tarfile.open(tars / "00001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for stem in STEMS[4:]:
            image = photos["kodim01"] if stem == "kodim05" else photos[stem]
            caption = "new caption" if stem == "kodim06" else f"caption {stem}"
            add(tar, f"{stem}.png", image)
            add(tar, f"{stem}.txt", caption.encode())
            add(tar, f"{stem}.json", json.dumps(meta(STEMS.index(stem))).encode())
    proc = run_precompute(binary, ["--input", f"{tars}/*.tar", "--out", out, "--model", cards["taef2"], "--size", SIZE])
    assert "encoded 2 images" in proc.stderr and "6 already committed" in proc.stderr, proc.stderr[-2000:]
    second = read_shards(out, SIZE)
    assert second.num_rows == first.num_rows == 8
    changed = {k: c for k, c in zip(second.column("key").to_pylist(), second.column("caption").to_pylist())}
    assert changed["00001.tar/kodim06"] == "new caption"
    lat = dict(zip(second.column("key").to_pylist(), tensor(second, "latent")))
    assert np.array_equal(lat["00001.tar/kodim05"], lat["00000.tar/kodim01"])


def errors(out: Path) -> dict[str, str]:
    lines = (out / "_errors.jsonl").read_text().splitlines()
    return {e["key"]: e["kind"] for e in map(json.loads, lines)}


def test_hostile_and_broken_tars_give_error_lines(binary, cards, photos, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "kodim01.png", photos["kodim01"])
        add(tar, "kodim01.txt", b"kept")
        add(tar, "notes.md", b"# not an image")
        add(tar, "kodim02.png", photos["kodim02"])
        add(tar, "kodim03.png", photos["kodim03"])
        add(tar, "kodim02.png", photos["kodim04"])
        add(tar, "../evil.png", photos["kodim05"])
        add(tar, "/abs.png", photos["kodim05"])
        add(tar, "link.png", b"", tarfile.SYMTYPE, "/etc/passwd")
        add(tar, "hard.png", b"", tarfile.LNKTYPE, "kodim01.png")
        add(tar, "dev.png", b"", tarfile.CHRTYPE)
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for stem in ("kodim06", "kodim07", "kodim08"):
            add(tar, f"{stem}.png", photos[stem])
    raw = good.getvalue()
    third = raw.index(b"kodim08.png")
    (d / "00001.tar").write_bytes(raw[: third + 512 + 1000])  # cut inside kodim08's bytes
    out = tmp_path / "out"
    table = encode(binary, cards, f"{d}/*.tar", out)
    assert table.column("key").to_pylist() == [
        "00000.tar/kodim01", "00000.tar/kodim02", "00000.tar/kodim03", "00001.tar/kodim06", "00001.tar/kodim07"
    ]
    assert table.column("caption")[0].as_py() == "kept"
    lat = dict(zip(table.column("key").to_pylist(), tensor(table, "latent")))
    ref = encode(binary, cards, _folder(tmp_path, photos), tmp_path / "ref")
    ref_lat = dict(zip(ref.column("key").to_pylist(), tensor(ref, "latent")))
    assert np.array_equal(lat["00000.tar/kodim02"], ref_lat["kodim02.png"]), "the first kodim02 group is kept"
    errs = errors(out)
    assert errs.get("00000.tar/notes") == "refused", errs
    assert errs.get("00000.tar/kodim02") == "refused", errs
    for name in ("../evil.png", "/abs.png", "link.png", "hard.png", "dev.png"):
        assert errs.get(f"00000.tar/{name}") == "refused", (name, errs)
    assert any(k.startswith("00001.tar") and v == "corrupt" for k, v in errs.items()), errs
    assert not (tmp_path / "evil.png").exists() and not (out.parent / "evil.png").exists()


def _folder(tmp_path: Path, photos) -> Path:
    d = tmp_path / "reference"
    d.mkdir(exist_ok=True)
    (d / "kodim02.png").write_bytes(photos["kodim02"])
    return d


def test_parquet_null_image_and_corrupt_row_group(binary, cards, photos, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": photos[s], "path": f"{s}.png"} for s in STEMS[:6]]
    cells[1] = {"bytes": None, "path": "missing.png"}
    table = pa.table({"image": pa.array(cells, image), "key": STEMS[:6]})
    pq.write_table(table, d / "a.parquet", row_group_size=2, compression="snappy", use_dictionary=False)
    raw = bytearray((d / "a.parquet").read_bytes())
    # Garbage over the page header of the third row group's image bytes.
    start = pq.ParquetFile(d / "a.parquet").metadata.row_group(2).column(0).data_page_offset
    raw[start : start + 24] = b"\xff" * 24
    (d / "b.parquet").write_bytes(bytes(raw))
    (d / "a.parquet").unlink()
    out = tmp_path / "out"
    got = encode(binary, cards, d / "b.parquet", out)
    assert got.column("key").to_pylist() == [f"b.parquet/{s}" for s in ("kodim01", "kodim03", "kodim04")]
    errs = errors(out)
    assert errs.get("b.parquet/kodim02") == "io", errs  # its path names no file
    assert errs.get("b.parquet/row-group-2") == "corrupt", errs


def test_bad_specs_fail_before_work(binary, cards, inputs, tmp_path):
    import subprocess

    def fails(spec, *extra):
        cmd = [str(binary), "precompute", "--input", str(spec), "--out", str(tmp_path / "o"), "--model", str(cards["taef2"]), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode != 0, proc.stderr
        assert not (tmp_path / "o").exists(), "work started"
        return proc.stderr

    assert "2 named file(s) do not exist" in fails(f"{inputs}/tars/{{00001..00003}}.tar")
    assert "matches no image" in fails(f"{inputs}/tars/*.zip")
    assert "no such column" in fails(inputs / "pq" / "train.parquet", "--image-column", "pixels")
    assert "apply to Parquet inputs" in fails(f"{inputs}/tars/*.tar", "--key-column", "key")
    assert "is not read" in fails("gs://bucket/data/*.tar")


@pytest.fixture(scope="module")
def s3(inputs):
    """moto_server with bucket `data` holding the fixtures (uploaded with boto3); the client
    environment is set for the module's tests."""
    import boto3

    with moto_server() as endpoint, environment(s3_env(endpoint)):
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        for path in sorted(inputs.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), "data", f"in/{path.relative_to(inputs).as_posix()}")
        yield client


def test_s3_inputs_give_the_local_rows(binary, cards, inputs, s3, tmp_path):
    local = encode(binary, cards, inputs / "folder", tmp_path / "local")
    want = by_stem(local, lambda k: k.removesuffix(".png"))
    runs = {
        "prefix": ("s3://data/in/folder/", lambda k: k.removesuffix(".png"), [f"{s}.png" for s in STEMS]),
        "glob": ("s3://data/in/tars/*.tar", lambda k: k.split("/")[1], None),
        "brace": ("s3://data/in/tars/{00000..00001}.tar", lambda k: k.split("/")[1], None),
        "parquet": ("s3://data/in/pq/train.parquet", lambda k: k.split("/")[1], [f"train.parquet/{s}" for s in STEMS]),
    }
    for name, (url, stem_of, keys) in runs.items():
        table = encode(binary, cards, url, tmp_path / name)
        if keys is not None:
            assert sorted(table.column("key").to_pylist()) == keys, name
        got = by_stem(table, stem_of)
        assert set(got) == set(STEMS), name
        for stem in STEMS:
            assert np.array_equal(got[stem]["latent"], want[stem]["latent"]), f"{name} {stem}"
            for field in ("sha", "caption", "idx", "score", "tag"):
                assert got[stem][field] == want[stem][field], f"{name} {stem} {field}"


def test_s3_bad_bucket_and_missing_objects_fail_before_work(binary, cards, s3, tmp_path):
    import subprocess

    def fails(url):
        cmd = [str(binary), "precompute", "--input", url, "--out", str(tmp_path / "o"), "--model", str(cards["taef2"])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode != 0, proc.stderr
        assert not (tmp_path / "o").exists(), "work started"
        return proc.stderr

    assert "bucket s3://nosuchbucket does not exist" in fails("s3://nosuchbucket/in/*.tar")
    assert "1 named object(s) do not exist" in fails("s3://data/in/tars/{00001..00002}.tar")
    assert "matches no image" in fails("s3://data/in/tars/*.zip")


# Containers in folders, dictionary columns, the key rule, GNU tars and other rough edges: small
# windows and the avgpool8 card keep these fast.
FAST = 64


def fast(binary, cards, input_spec, out: Path, *extra) -> tuple[pa.Table, subprocess.CompletedProcess]:
    proc = run_precompute(binary, ["--input", input_spec, "--out", out, "--model", cards["avgpool8"], "--size", FAST, *extra])
    return read_shards(out, FAST), proc


def failures(out: Path) -> dict[str, dict]:
    return {e["key"]: e for e in map(json.loads, (out / "_errors.jsonl").read_text().splitlines())}


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


#: Key -> (photo, caption) of the `mixed` folder's samples.
MIXED = {
    "00000.tar/kodim02": ("kodim02", "in a tar"),
    "00000.tar/kodim03": ("kodim03", None),
    "kodim01.png": ("kodim01", "loose"),
    "sub/00001.tar/kodim04": ("kodim04", None),
    "zz.parquet/k5": ("kodim05", "in parquet"),
}


@pytest.fixture(scope="module")
def mixed(photos, tmp_path_factory) -> Path:
    """A folder of one loose photo with a caption, a tar, a tar in a subfolder and a Parquet file."""
    d = tmp_path_factory.mktemp("mixed")
    (d / "kodim01.png").write_bytes(photos["kodim01"])
    (d / "kodim01.txt").write_text("loose")
    with tarfile.open(d / "00000.tar", "w") as tar:
        add(tar, "kodim02.png", photos["kodim02"])
        add(tar, "kodim02.txt", b"in a tar")
        add(tar, "kodim03.png", photos["kodim03"])
    (d / "sub").mkdir()
    with tarfile.open(d / "sub" / "00001.tar", "w") as tar:
        add(tar, "kodim04.png", photos["kodim04"])
    table = pa.table({"key": ["k5"], "image": pa.array([photos["kodim05"]], pa.binary()), "caption": ["in parquet"]})
    pq.write_table(table, d / "zz.parquet")
    return d


def assert_mixed_rows(table: pa.Table, photos) -> None:
    assert table.column("key").to_pylist() == sorted(MIXED)
    for key, digest, caption in zip(*(table.column(c).to_pylist() for c in ("key", "source_sha256", "caption"))):
        stem, want = MIXED[key]
        assert digest == sha(photos[stem]), key
        assert caption == want, key


def test_a_folder_reads_its_tars_and_parquet_files_also_in_partitions(binary, cards, photos, mixed, tmp_path):
    table, _ = fast(binary, cards, mixed, tmp_path / "whole")
    assert_mixed_rows(table, photos)
    out = tmp_path / "parts"
    flags = ["--input", mixed, "--out", out, "--model", cards["avgpool8"], "--size", FAST, "--partitions", 2]
    plan = subprocess.run([str(binary), "plan", *map(str, flags)], capture_output=True, text=True, timeout=600)
    assert "plan: 2 partitions over 4 units" in plan.stdout, plan.stdout + plan.stderr  # each file is one unit
    for p in (0, 1):
        run_precompute(binary, [*flags, "--partition", p])
    done = subprocess.run([str(binary), "finalize", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    parts = pa.concat_tables(pq.read_table(f) for f in sorted(out.rglob("part-*.parquet"))).sort_by("key")
    assert_mixed_rows(parts, photos)
    assert np.array_equal(tensor(parts, "latent"), tensor(table, "latent"))


def test_an_s3_prefix_reads_its_tars_and_parquet_files(binary, cards, photos, mixed, s3, tmp_path):
    for path in sorted(mixed.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "data", f"mixed/{path.relative_to(mixed).as_posix()}")
    table, _ = fast(binary, cards, "s3://data/mixed/", tmp_path / "out")
    assert_mixed_rows(table, photos)


def test_dictionary_large_and_view_parquet_columns_are_read_as_their_values(binary, cards, photos, tmp_path):
    stems = STEMS[:3]
    d = tmp_path / "in"
    d.mkdir()
    # pandas writes a `category` column as a dictionary.
    pq.write_table(pa.table({
        "image": pa.array([photos[s] for s in stems], pa.large_binary()),
        "key": pa.array(stems).dictionary_encode(),
        "caption": pa.array([f"caption {s}" for s in stems]).dictionary_encode(),
        "tag": pa.array(["a", "b", "a"]).dictionary_encode(),
        "note": pa.array(["x", "y", "z"], pa.large_string()),
        "view": pa.array(["p", "q", "r"], pa.string_view()),
        "points": pa.array([[1], [2], [3]], pa.list_(pa.int64())),
    }), d / "a.parquet")
    assert pa.types.is_dictionary(pq.read_schema(d / "a.parquet").field("caption").type)
    table, proc = fast(binary, cards, d / "a.parquet", tmp_path / "a")
    assert table.column("key").to_pylist() == [f"a.parquet/{s}" for s in stems]
    assert table.column("source_sha256").to_pylist() == [sha(photos[s]) for s in stems]
    assert table.column("caption").to_pylist() == [f"caption {s}" for s in stems]
    for column, want in (("tag", ["a", "b", "a"]), ("note", ["x", "y", "z"]), ("view", ["p", "q", "r"])):
        assert table.column(column).to_pylist() == want, column
    assert "points" not in table.column_names
    assert "warning" in proc.stderr and "points" in proc.stderr, "a column not stored is named"

    pq.write_table(pa.table({
        "image": pa.array([photos[s] for s in stems], pa.binary_view()),
        "name": pa.array(stems, pa.string_view()),
        "label": pa.array([f"label {s}" for s in stems]).dictionary_encode(),
    }), d / "b.parquet")
    table, _ = fast(binary, cards, d / "b.parquet", tmp_path / "b", "--key-column", "name", "--caption-column", "label")
    assert table.column("key").to_pylist() == [f"b.parquet/{s}" for s in stems]
    assert table.column("caption").to_pylist() == [f"label {s}" for s in stems]
    assert table.column("source_sha256").to_pylist() == [sha(photos[s]) for s in stems]


def test_keys_that_break_the_key_rule_are_refused_and_brace_lists_key_by_their_common_folder(
    binary, cards, photos, tmp_path
):
    d = tmp_path / "in"
    d.mkdir()
    bad = ["../../etc/passwd", "/abs", "", "a//b", "a/./b"]
    keys = [*bad, "fine/one"]
    images = pa.array([photos[f"kodim0{i + 1}"] for i in range(len(keys))], pa.binary())
    pq.write_table(pa.table({"image": images, "key": keys}), d / "k.parquet")
    out = tmp_path / "out"
    table, _ = fast(binary, cards, d / "k.parquet", out)
    assert table.column("key").to_pylist() == ["k.parquet/fine/one"]
    errs = failures(out)
    for row, value in enumerate(bad):
        line = errs[f"k.parquet/{row:09d}"]
        assert line["kind"] == "refused" and repr(value).strip("'") in line["message"], line

    for sub, stem in (("a", "kodim02"), ("b", "kodim03")):
        (d / sub).mkdir()
        with tarfile.open(d / sub / "x.tar", "w") as tar:
            add(tar, f"{stem}.png", photos[stem])
    spec = "{" + ",".join(str((d / sub / "x.tar").resolve()) for sub in "ab") + "}"
    table, _ = fast(binary, cards, spec, tmp_path / "braces")
    assert table.column("key").to_pylist() == ["a/x.tar/kodim02", "b/x.tar/kodim03"]


def test_gnu_tars_and_tar_rough_edges(binary, cards, photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "kodim01.png").write_bytes(photos["kodim01"])
    (src / "kodim01.txt").write_text("dot slash")
    d = tmp_path / "in"
    d.mkdir()
    with tarfile.open(d / "a.tar", "w") as tar:  # as `tar -C src -cf a.tar .` writes it
        tar.add(src, arcname=".")
    with tarfile.open(d / "a.tar") as tar:
        assert "./kodim01.png" in tar.getnames()
    with tarfile.open(d / "b.tar", "w") as tar:
        add(tar, "kodim02.json", b"[1, 2]")
        add(tar, "kodim02.png", photos["kodim02"])
        add(tar, "kodim03.png", photos["kodim03"])
        add(tar, "kodim03.bmp", b"BM not encoded")
        add(tar, "kodim04.v2.png", photos["kodim04"])
        add(tar, ".hidden.png", photos["kodim04"])
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        add(tar, "kodim05.png", photos["kodim05"])
    (d / "c.tar").write_bytes(gzip.compress(plain.getvalue()))  # gzip named .tar
    out = tmp_path / "out"
    table, proc = fast(binary, cards, f"{d}/*.tar", out)
    assert table.column("key").to_pylist() == ["a.tar/kodim01", "b.tar/kodim02", "b.tar/kodim03", "c.tar/kodim05"]
    assert table.column("caption")[0].as_py() == "dot slash"
    assert table.column("source_sha256")[2].as_py() == sha(photos["kodim03"]), "the first image is kept"
    assert "1 .json sidecar(s) are not JSON objects" in proc.stderr, proc.stderr
    errs = failures(out)
    assert errs["b.tar/kodim03.bmp"]["kind"] == "refused" and "second image" in errs["b.tar/kodim03.bmp"]["message"]
    assert errs["b.tar/kodim04"]["kind"] == "refused" and "first dot" in errs["b.tar/kodim04"]["message"], errs
    assert errs["b.tar/.hidden.png"]["kind"] == "refused", errs
    assert not any(k.startswith("c.tar") for k in errs), errs


def test_parquet_image_paths_without_bytes_are_read(binary, cards, photos, tmp_path):
    d = tmp_path / "in"
    (d / "imgs").mkdir(parents=True)
    (d / "imgs" / "kodim01.png").write_bytes(photos["kodim01"])
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(photos["kodim02"])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": p} for p in ("imgs/kodim01.png", str(elsewhere), "gone.png")]
    pq.write_table(pa.table({"image": pa.array(cells, image)}), d / "p.parquet")
    out = tmp_path / "out"
    table, _ = fast(binary, cards, d / "p.parquet", out)
    assert table.column("key").to_pylist() == ["p.parquet/000000000", "p.parquet/000000001"]
    assert table.column("source_sha256").to_pylist() == [sha(photos["kodim01"]), sha(photos["kodim02"])]
    gone = failures(out)["p.parquet/000000002"]
    assert gone["kind"] == "io" and "gone.png" in gone["message"], gone


def test_s3_parquet_image_paths_are_read_beside_the_object(binary, cards, photos, s3, tmp_path):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": p} for p in ("imgs/kodim01.png", "gone.png", "../kodim01.png")]
    pq.write_table(pa.table({"image": pa.array(cells, image)}), tmp_path / "p.parquet")
    s3.upload_file(str(tmp_path / "p.parquet"), "data", "hf/p.parquet")
    s3.put_object(Bucket="data", Key="hf/imgs/kodim01.png", Body=photos["kodim01"])
    out = tmp_path / "out"
    table, _ = fast(binary, cards, "s3://data/hf/p.parquet", out)
    assert table.column("key").to_pylist() == ["p.parquet/000000000"]
    assert table.column("source_sha256").to_pylist() == [sha(photos["kodim01"])]
    errs = failures(out)
    assert errs["p.parquet/000000001"]["kind"] == "io" and "s3://data/hf/gone.png" in errs["p.parquet/000000001"]["message"]
    assert errs["p.parquet/000000002"]["kind"] == "io", errs


def test_report_reads_a_tar(binary, shared, photos, tmp_path):
    from report_reference import report_card, run_report

    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for stem in STEMS[:2]:
            add(tar, f"{stem}.png", photos[stem])
    out = tmp_path / "report"
    run_report(binary, ["--input", tmp_path / "x.tar", "--model", report_card(shared, tmp_path), "--size", FAST, "--out", out])
    assert sorted(pq.read_table(out / "metrics.parquet").column("key").to_pylist()) == [f"x.tar/{s}" for s in STEMS[:2]]
