"""`vae-pipeline report` on clips, against references nobody here wrote: diffusers' own
reconstructions of the tiny Wan 2.1 VAE (`golden_video.npz`, see ../shared/models/families/README.md
"Video goldens"), numpy and scikit-image.

The golden clips are written losslessly (FFV1, RGB, Matroska) with Debian's `ffmpeg` (`clips.py`),
so the frames
the binary decodes are exactly the goldens' `input`; at --size 64 a 64x64 clip is neither resized
nor cropped. Every frame's PSNR, SSIM and frame-to-frame change must then be what numpy and
scikit-image compute from `input` and diffusers' `decoded`, within the export's 1e-4 parity.
Real codecs (H.264 yuv420p MP4), a truncated clip and a file that is no clip check the plumbing
and the error lines.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clips as make
from report_reference import run_report, skimage_ssim
from vp_helpers import require

SIZE = 64
FAMILY = "wan2.1"
# clip file -> golden case: a 9-frame pan (windows of 5 and 9 frames) and a 5-frame one.
CLIPS = {
    "gradient.mkv": "gradient_shapes_64x64_64x64_t9",
    "grayscale.mkv": "grayscale_64x64_64x64_t5",
}
TARGET_FRAMES = "5,9"


def golden_cases(shared: Path) -> dict[str, dict[str, np.ndarray]]:
    path = require(shared / "models" / "families" / FAMILY / "golden_video.npz", f"{FAMILY} golden_video.npz")
    npz = np.load(path)
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in npz.files:
        case, name = key.split("/")
        cases.setdefault(case, {})[name] = npz[key]
    return cases


def frames_of(tensor: np.ndarray) -> np.ndarray:
    """[1, 3, T, H, W] → [T, H, W, 3] float64."""
    return tensor[0].transpose(1, 2, 3, 0).astype(np.float64)


@pytest.fixture(scope="module")
def wan_card(binary, shared, tmp_path_factory) -> Path:
    """`vae-pipeline export` of the tiny Wan 2.1 checkpoint: a card with its [temporal] graphs."""
    checkpoint = require(shared / "models" / "families" / FAMILY, f"tiny {FAMILY} checkpoint folder")
    out = tmp_path_factory.mktemp("wan-export") / "wan2.1"  # export names the card after its folder
    cmd = [str(binary), "export", "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    card = out / "card.toml"
    assert "[temporal]" in card.read_text(), "the exported Wan card states its temporal graphs"
    return card


@pytest.fixture(scope="module")
def golden_clips(shared, tmp_path_factory) -> tuple[Path, dict]:
    """The golden clips as lossless files, and window key -> (source frames, diffusers' frames) in
    [0, 1], [T, H, W, 3]. A causal VAE's first 5 frames of a 9-frame clip reconstruct as the clip
    of those 5 frames alone, so the 5-frame window of the 9-frame pan is `decoded[:, :5]`."""
    cases = golden_cases(shared)
    d = tmp_path_factory.mktemp("golden-clips")
    want = {}
    for name, case in CLIPS.items():
        x = frames_of(cases[case]["input"])
        y = np.clip((frames_of(cases[case]["decoded"]) + 1.0) / 2.0, 0.0, 1.0)
        u8 = np.round(x * 255.0).astype(np.uint8)
        assert np.array_equal(u8.astype(np.float32) / np.float32(255), x.astype(np.float32)), f"{case}: 8-bit input"
        make.ffv1_mkv(d / name, u8)
        for t in map(int, TARGET_FRAMES.split(",")):
            if t <= len(x):
                want[f"{name}/00000-{t:03d}"] = (x[:t], y[:t])
    return d, want


@pytest.fixture(scope="module")
def golden_report(binary, wan_card, golden_clips, tmp_path_factory) -> Path:
    clips, _ = golden_clips
    out = tmp_path_factory.mktemp("clip-report") / "report"
    proc = run_report(binary, [
        "--input", clips, "--model", wan_card, "--size", SIZE, "--target-frames", TARGET_FRAMES,
        "--batch-size", 2, "--threads", 2, "--out", out,
    ])
    assert "report:" in proc.stderr, proc.stderr
    assert "wan2.1: 3 windows, 19 frames (0 windows failed): PSNR" in proc.stderr, proc.stderr
    assert "; flicker: source " in proc.stderr, proc.stderr
    return out


def frame_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "metrics.parquet").to_pylist()


def change(prev: np.ndarray, cur: np.ndarray, prev_rec: np.ndarray, cur_rec: np.ndarray) -> tuple[float, float, float]:
    ds, dr = cur - prev, cur_rec - prev_rec
    return float(np.abs(ds).mean()), float(np.abs(dr).mean()), float(np.abs(dr - ds).mean())


def test_every_frame_scores_as_numpy_and_skimage_on_diffusers_frames(golden_report, golden_clips):
    _, want = golden_clips
    rows = frame_rows(golden_report)
    got = {(r["key"], r["frame"]): r for r in rows}
    expected_rows = {(k, t) for k, (x, _) in want.items() for t in range(len(x))}
    assert set(got) == expected_rows, "one metrics row per frame of every window"
    for key, (x, y) in want.items():
        for t in range(len(x)):
            r = got[key, t]
            assert r["model"] == "wan2.1" and r["source_frame"] == t, r
            mse = float(np.mean((x[t] - y[t]) ** 2))
            psnr = 10 * math.log10(1.0 / mse)
            assert r["psnr"] == pytest.approx(psnr, abs=0.01), f"{key} frame {t}: PSNR"
            assert r["ssim"] == pytest.approx(skimage_ssim(x[t], y[t])[0], abs=1e-3), f"{key} frame {t}: SSIM"
            if t == 0:
                assert r["flicker_source"] is None and r["flicker_reconstruction"] is None
                assert r["flicker_error"] is None
                continue
            src, rec, err = change(x[t - 1], x[t], y[t - 1], y[t])
            assert r["flicker_source"] == pytest.approx(src, abs=1e-9), f"{key} frame {t}: the source is exact"
            assert r["flicker_reconstruction"] == pytest.approx(rec, abs=1e-4), f"{key} frame {t}"
            assert r["flicker_error"] == pytest.approx(err, abs=1e-4), f"{key} frame {t}"


def test_summary_flicker_per_window_and_overall_as_numpy(golden_report, golden_clips):
    _, want = golden_clips
    summary = json.loads((golden_report / "summary.json").read_text())
    assert summary["source"] == "clips" and summary["video"]["target_frames"] == [5, 9]
    m = summary["models"]["wan2.1"]
    assert m["images"] == sum(len(x) for x, _ in want.values()), "images counts frames on clips"
    clips = m["clips"]
    assert clips["windows"] == len(want)
    windows = {w["key"]: w for w in clips["per_window"]}
    assert set(windows) == set(want)
    pairs = []
    for key, (x, y) in want.items():
        mine = [change(x[t - 1], x[t], y[t - 1], y[t]) for t in range(1, len(x))]
        pairs += mine
        f = windows[key]["flicker"]
        src, rec, err = (float(np.mean([p[i] for p in mine])) for i in range(3))
        assert f["pairs"] == len(x) - 1
        assert f["source"] == pytest.approx(src, abs=1e-9), key
        assert f["reconstruction"] == pytest.approx(rec, abs=1e-4), key
        assert f["ratio"] == pytest.approx(rec / src, rel=1e-3), key
        assert f["difference"] == pytest.approx(rec - src, abs=1e-4), key
        assert f["error"] == pytest.approx(err, abs=1e-4), key
        psnrs = [10 * math.log10(1.0 / np.mean((x[t] - y[t]) ** 2)) for t in range(len(x))]
        assert windows[key]["psnr_min"] == pytest.approx(min(psnrs), abs=0.01), key
        assert windows[key]["psnr_mean"] == pytest.approx(np.mean(psnrs), abs=0.01), key
    overall = clips["flicker"]
    src, rec, err = (float(np.mean([p[i] for p in pairs])) for i in range(3))
    assert overall["pairs"] == len(pairs)
    assert overall["source"] == pytest.approx(src, abs=1e-9)
    assert overall["ratio"] == pytest.approx(rec / src, rel=1e-3)
    assert overall["error"] == pytest.approx(err, abs=1e-4)
    html = (golden_report / "report.html").read_text()
    assert "Temporal flicker: wan2.1" in html and "mean |(r<sub>t</sub>" in html, "the page defines flicker"


def test_gallery_shows_the_worst_frames(golden_report):
    rows = frame_rows(golden_report)
    # The gallery orders by PSNR, ties by its caption key.
    ranked = sorted(rows, key=lambda r: (r["psnr"], f"{r['key']} frame {r['frame']}"))
    html = (golden_report / "report.html").read_text()
    shown = re.findall(r"<figcaption>worst (\d+): <code>(.*?)</code> · PSNR ([\d.]+) dB", html)
    assert len(shown) == 8, "the eight worst frames"
    for (rank, caption, psnr), r in zip(shown, ranked):
        assert caption == f"{r['key']} frame {r['frame']}", f"worst {rank}"
        assert float(psnr) == pytest.approx(r["psnr"], abs=0.006)


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory) -> Path:
    """An H.264 yuv420p MP4 (17 frames, 96x64), the same cut in half, and a PNG that is no clip."""
    d = tmp_path_factory.mktemp("real-clips")
    rgb = make.frames(t=17, h=64, w=96)
    make.h264_mp4(d / "pan.mp4", rgb)
    make.truncated_mp4(d / "truncated.mp4", 0.5, rgb)
    Image.fromarray(rgb[0]).save(d / "still.png")
    return d


def test_real_clips_score_and_broken_ones_are_error_lines(binary, wan_card, real_clips, tmp_path):
    out = tmp_path / "report"
    proc = run_report(binary, [
        "--input", real_clips, "--model", wan_card, "--size", SIZE, "--target-frames", "5",
        "--frame-extraction", "chunk", "--threads", 2, "--out", out,
    ])
    rows = frame_rows(out)
    keys = sorted({r["key"] for r in rows})
    # chunk: 17 frames give three windows of 5 (frames 0-4, 5-9, 10-14).
    assert keys == ["pan.mp4/00000-005", "pan.mp4/00005-005", "pan.mp4/00010-005"], keys
    by_key = {k: [r for r in rows if r["key"] == k] for k in keys}
    assert [r["source_frame"] for r in by_key["pan.mp4/00005-005"]] == [5, 6, 7, 8, 9]
    assert all(math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for r in rows)
    errors = {e["key"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors["truncated.mp4"]["kind"] == "corrupt", errors
    assert errors["still.png"]["kind"] == "unsupported", errors
    assert all(e["model"] is None for e in errors.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 3 and summary["failed"] == 2
    assert "2 of 3 inputs could not be read" in proc.stderr, proc.stderr


def test_a_card_without_a_temporal_vae_is_refused_before_work(binary, cards, real_clips, tmp_path):
    cmd = [str(binary), "report", "--input", str(real_clips), "--model", str(cards["avgpool8"]),
           "--size", str(SIZE), "--target-frames", "5", "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "has no [temporal] VAE" in proc.stderr and "drop the clip flags" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists(), "nothing is written before the refusal"


def test_report_shards_on_a_clip_set_is_refused_with_what_to_do(binary, wan_card, golden_clips, tmp_path):
    clips, _ = golden_clips
    shards = tmp_path / "shards"
    cmd = [str(binary), "precompute", "--input", str(clips), "--model", str(wan_card), "--size", str(SIZE),
           "--target-frames", "5", "--out", str(shards)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cmd = [str(binary), "report", "--input", str(clips), "--shards", str(shards), "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "report --shards on clip sets is not supported yet" in proc.stderr, proc.stderr
    assert "--target-frames" in proc.stderr, proc.stderr


def test_lpips_per_frame_lines_up_with_the_frames(binary, wan_card, golden_clips, tmp_path):
    """The MSE stand-in LPIPS (test_report_lpips.py) of every frame is 4·10^(−PSNR/10) of that frame."""
    from test_report_lpips import save_model

    clips, _ = golden_clips
    out = tmp_path / "report"
    run_report(binary, [
        "--input", clips, "--model", wan_card, "--size", SIZE, "--target-frames", TARGET_FRAMES,
        "--lpips", save_model(tmp_path / "lpips.onnx", ["x", "y"]), "--threads", 2, "--out", out,
    ])
    table = pq.read_table(out / "metrics.parquet")
    assert table.column_names == [
        "key", "model", "frame", "source_frame", "psnr", "ssim", "lpips", "flicker_source",
        "flicker_reconstruction", "flicker_error", "latent_mean", "latent_std",
    ]
    for r in table.to_pylist():
        assert r["lpips"] == pytest.approx(4 * 10 ** (-r["psnr"] / 10), rel=1e-4), (r["key"], r["frame"])
