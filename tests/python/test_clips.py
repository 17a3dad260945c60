"""`precompute` on clips: the Wan temporal VAE end to end, through the binary.

The clips are real files made with Debian's `ffmpeg` CLI (`clips.py`); the VAEs are the tiny
random-weight Wan 2.1, Qwen-Image and Wan 2.2 checkpoints in ../shared/models/families, exported
by the binary; the references are diffusers' own outputs (`golden_video.npz`: `latent_normalized` of 1-, 5- and
9-frame clips) and PyAV/ffprobe for what a clip holds. Shards are read with pyarrow.
- parity: the golden clips written losslessly (FFV1, RGB) give diffusers' normalized latents,
  [C, T', h, w] in a `<W>x<H>x<T>` folder, one row per window keyed `<clip>/<start>-<count>`;
- the same clip from a folder, a WebDataset tar, a Parquet binary column and an `s3://` prefix
  gives the same rows;
- bad clips become error lines of their kind; an image in a clip run, a card without a temporal
  VAE and bad frame options are refused before work;
- a rerun decodes nothing; a changed clip's windows are re-encoded and its stale ones pruned;
- `--dedupe` compares clip and window; partitions + finalize give the rows of a whole run;
- `verify`, `inspect`, `vae_pipeline.read` and `LatentsDataset` read clip sets.
"""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import clips
from vp_helpers import REPO, environment, moto_server, require, run_precompute, s3_env, tensor

TOL = 1e-4


# family folder -> (latent channels, spatial factor)
FAMILIES = {"wan2.1": (16, 8), "qwen-image": (16, 8), "wan2.2": (48, 16)}


def export_family(binary, shared, family: str, out: Path) -> Path:
    """A tiny family checkpoint exported by the binary: its card (with `[temporal]`)."""
    ckpt = require(shared / "models" / "families" / family, f"tiny {family} checkpoint folder")
    proc = subprocess.run(
        [str(binary), "export", "--checkpoint", str(ckpt), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    card = out / "card.toml"
    assert "[temporal]" in card.read_text(), card.read_text()
    return card


def golden_cases(shared, family: str) -> dict[str, dict[str, np.ndarray]]:
    npz = np.load(require(shared / "models" / "families" / family / "golden_video.npz", f"{family} golden_video.npz"))
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in npz.files:
        case, name = key.split("/")
        cases.setdefault(case, {})[name] = npz[key]
    return cases


@pytest.fixture(scope="module")
def wan21(binary, shared, tmp_path_factory) -> Path:
    return export_family(binary, shared, "wan2.1", tmp_path_factory.mktemp("wan21"))


@pytest.fixture(scope="module")
def golden(shared) -> dict[str, dict[str, np.ndarray]]:
    return golden_cases(shared, "wan2.1")


def golden_frames(case: dict[str, np.ndarray]) -> np.ndarray:
    """The golden clip as uint8 frames [T, H, W, 3] (its inputs are exact multiples of 1/255)."""
    x = case["input"][0]  # [3, T, H, W] in [0, 1]
    frames = np.round(x * 255).astype(np.uint8).transpose(1, 2, 3, 0)
    assert np.array_equal(frames.astype(np.float32) / 255, x.transpose(1, 2, 3, 0))
    return frames


def ffv1(path: Path, frames: np.ndarray, fps: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return clips.ffv1_mkv(path, frames, fps)


def rows(out: Path, folder: str) -> pa.Table:
    files = sorted((out / folder).glob("part-*.parquet"))
    assert files, f"no shards in {out / folder}: {sorted(p.name for p in out.iterdir())}"
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")


def errors(out: Path) -> list[dict]:
    path = out / "_errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def precompute(binary, card, inp, out, frames, *extra, check=True):
    args = ["--input", inp, "--out", out, "--model", card, "--size", "64", "--dtype", "f32",
            "--target-frames", ",".join(str(f) for f in frames), "--threads", "2", *extra]
    if check:
        return run_precompute(binary, args)
    return subprocess.run([str(binary), "precompute", *map(str, args)], capture_output=True, text=True, timeout=600)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_golden_clips_give_diffusers_latents(binary, shared, family, tmp_path):
    """FFV1 clips of the golden frames, through precompute: `latent_normalized` of diffusers."""
    card = export_family(binary, shared, family, tmp_path / "card")
    golden = golden_cases(shared, family)
    channels, factor = FAMILIES[family]
    clip_dir = tmp_path / "clips"
    cases = {f"{name}.mkv": golden[name] for name in golden if name.startswith("gradient_shapes_64x64_64x64")}
    assert len(cases) == 3
    for name, case in cases.items():
        ffv1(clip_dir / name, golden_frames(case), fps=16)
    # Each clip gives one head window of its own length.
    out = tmp_path / "out"
    precompute(binary, card, clip_dir, out, [1, 5, 9], "--frame-extraction", "head")
    for name, case in cases.items():
        t = case["input"].shape[2]
        table = rows(out, f"64x64x{t}")
        keys = table.column("key").to_pylist()
        want = f"{name}/00000-{t:03d}"
        assert want in keys, keys
        row = table.filter(pa.compute.equal(table.column("key"), want))
        latent = tensor(row, "latent")[0]
        ref = case["latent_normalized"][0]  # [C, T', h, w]
        assert latent.shape == ref.shape == (channels, 1 + (t - 1) // 4, 64 // factor, 64 // factor)
        assert relative_error(latent, ref) < TOL, (name, relative_error(latent, ref))
        assert row.column("frame_start").to_pylist() == [0]
        assert row.column("frame_count").to_pylist() == [t]
        assert row.column("frame_indices").to_pylist() == [list(range(t))]
        assert row.column("source_fps").to_pylist() == [pytest.approx(16.0)]
        assert (row.column("orig_width").to_pylist(), row.column("orig_height").to_pylist()) == ([64], [64])
    # Shorter clips give no window of 9 frames: not an error, fewer rows.
    assert len(rows(out, "64x64x9")) == 1
    assert len(rows(out, "64x64x1")) == 3


def test_one_clip_from_every_source_gives_the_same_rows(binary, wan21, golden, tmp_path):
    frames = golden_frames(golden["gradient_shapes_64x64_64x64_t9"])
    data = ffv1(tmp_path / "clip.mkv", frames, fps=16).read_bytes()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.mkv").write_bytes(data)
    (folder / "a.txt").write_text("a pan over shapes")
    tar = tmp_path / "shards.tar"
    with tarfile.open(tar, "w") as t:
        for name, payload in (("a.mkv", data), ("a.txt", b"a pan over shapes")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    parquet = tmp_path / "clips.parquet"
    pq.write_table(pa.table({"key": ["a"], "video": pa.array([data], pa.binary()), "caption": ["a pan over shapes"]}), parquet)

    def latents(inp, out):
        precompute(binary, wan21, inp, out, [5], "--frame-extraction", "chunk")
        table = rows(out, "64x64x5")
        return table.column("key").to_pylist(), tensor(table, "latent"), table.column("caption").to_pylist()

    keys, ref, captions = latents(folder, tmp_path / "o-folder")
    # chunk: 9 frames give one window of 5 (frames 0-4); musubi drops the rest.
    assert keys == ["a.mkv/00000-005"]
    assert captions == ["a pan over shapes"]
    for inp, name in ((tar, "o-tar"), (parquet, "o-parquet")):
        k, values, c = latents(inp, tmp_path / name)
        assert len(k) == 1 and k[0].endswith("/00000-005"), k
        np.testing.assert_array_equal(values, ref)
        assert c == captions
    with moto_server() as endpoint, environment(s3_env(endpoint)):
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="clips")
        s3.put_object(Bucket="clips", Key="in/a.mkv", Body=data)
        s3.put_object(Bucket="clips", Key="in/a.txt", Body=b"a pan over shapes")
        k, values, c = latents("s3://clips/in/", tmp_path / "o-s3")
        assert k == keys
        np.testing.assert_array_equal(values, ref)


def test_bad_clips_are_error_lines_and_bad_runs_are_refused(binary, wan21, cards, golden, tmp_path, shared):
    frames = golden_frames(golden["gradient_shapes_64x64_64x64_t9"])
    good = ffv1(tmp_path / "good.mkv", frames, fps=16).read_bytes()
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "good.mkv").write_bytes(good)
    clips.truncated_mp4(inp / "truncated.mp4")
    (inp / "empty.mp4").write_bytes(b"")
    clips.audio_only_m4a(inp / "voice.mp4")
    (inp / "photo.png").write_bytes((shared / "models" / "golden" / "inputs" / "gradient_shapes_64x64.png").read_bytes())
    out = tmp_path / "out"
    precompute(binary, wan21, inp, out, [5])
    assert rows(out, "64x64x5").column("key").to_pylist() == ["good.mkv/00000-005"]
    kinds = {e["key"]: e["kind"] for e in errors(out)}
    assert kinds == {
        "truncated.mp4": "corrupt",
        "empty.mp4": "empty",
        "voice.mp4": "unsupported",
        "photo.png": "unsupported",
    }, errors(out)

    # Refused before any work, with what to do.
    proc = precompute(binary, cards["taef2"], inp, tmp_path / "no", [5], check=False)
    assert proc.returncode != 0 and "[temporal]" in proc.stderr and not (tmp_path / "no").exists(), proc.stderr
    proc = precompute(binary, wan21, inp, tmp_path / "no", [6], check=False)
    assert proc.returncode != 0 and "4" in proc.stderr and not (tmp_path / "no").exists(), proc.stderr


def test_rerun_decodes_nothing_and_a_changed_clip_is_reencoded(binary, wan21, golden, tmp_path):
    frames = golden_frames(golden["gradient_shapes_64x64_64x64_t9"])
    inp = tmp_path / "in"
    ffv1(inp / "a.mkv", frames, fps=16)
    ffv1(inp / "b.mkv", frames[::-1].copy(), fps=16)
    out = tmp_path / "out"
    first = precompute(binary, wan21, inp, out, [5], "--frame-extraction", "slide", "--frame-stride", "2")
    before = rows(out, "64x64x5")
    # slide, stride 2: windows at 0, 2, 4 of 9 frames.
    assert before.column("key").to_pylist() == [f"{c}.mkv/{s:05d}-005" for c in "ab" for s in (0, 2, 4)]
    again = precompute(binary, wan21, inp, out, [5], "--frame-extraction", "slide", "--frame-stride", "2")
    assert json.loads((out / "_SUCCESS").read_text())["already_committed"] == 6, again.stderr
    after = rows(out, "64x64x5")
    np.testing.assert_array_equal(tensor(after, "latent"), tensor(before, "latent"))
    # b changes: its three windows are encoded again, the old rows pruned.
    ffv1(inp / "b.mkv", frames, fps=16)
    precompute(binary, wan21, inp, out, [5], "--frame-extraction", "slide", "--frame-stride", "2")
    changed = rows(out, "64x64x5")
    assert changed.column("key").to_pylist() == before.column("key").to_pylist()
    latents = tensor(changed, "latent")
    np.testing.assert_array_equal(latents[3:], latents[:3])
    summary = json.loads((out / "_SUCCESS").read_text())
    assert (summary["encoded"], summary["already_committed"], summary["pruned"]) == (3, 3, 3), summary


def test_dedupe_partitions_and_readers_on_clip_sets(binary, wan21, golden, tmp_path):
    frames = golden_frames(golden["gradient_shapes_64x64_64x64_t9"])
    inp = tmp_path / "in"
    ffv1(inp / "a.mkv", frames, fps=16)
    (inp / "copy.mkv").write_bytes((inp / "a.mkv").read_bytes())
    ffv1(inp / "c.mkv", frames[::-1].copy(), fps=16)
    out = tmp_path / "whole"
    precompute(binary, wan21, inp, out, [5], "--frame-extraction", "slide", "--frame-stride", "4", "--dedupe")
    whole = rows(out, "64x64x5")
    # Both windows of a.mkv are kept (one clip, two windows); copy.mkv's are duplicates.
    assert whole.column("key").to_pylist() == ["a.mkv/00000-005", "a.mkv/00004-005", "c.mkv/00000-005", "c.mkv/00004-005"]
    assert sorted(e["key"] for e in errors(out) if e["kind"] == "duplicate") == ["copy.mkv/00000-005", "copy.mkv/00004-005"]

    parts = tmp_path / "parts"
    for p in range(2):
        precompute(binary, wan21, inp, parts, [5], "--frame-extraction", "slide", "--frame-stride", "4", "--dedupe",
                   "--partitions", "2", "--partition", str(p))
    proc = subprocess.run([str(binary), "finalize", str(parts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    merged = rows(parts, "64x64x5")
    assert merged.column("key").to_pylist() == whole.column("key").to_pylist()
    np.testing.assert_array_equal(tensor(merged, "latent"), tensor(whole, "latent"))

    proc = subprocess.run([str(binary), "verify", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([str(binary), "inspect", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "64x64x5" in proc.stdout and "[16, 2, 8, 8]" in proc.stdout, proc.stdout

    import sys

    sys.path.insert(0, str(REPO / "python"))
    import vae_pipeline
    from vae_pipeline.dataset import LatentsDataset

    table = vae_pipeline.read(out)
    assert table.num_rows == 4 and table.column("latent").type.shape == [16, 2, 8, 8]
    ds = LatentsDataset(out)
    assert ds.buckets == [(64, 64, 5)]
    item = ds[0]
    assert np.asarray(item["latent"]).shape == (16, 2, 8, 8)
