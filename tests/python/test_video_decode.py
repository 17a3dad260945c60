"""Clip decoding (src/video.rs through the FFmpeg plugin) against independent readers.

Clips are made by Debian's `ffmpeg` (tests/python/clips.py); our frames and times come from the
hidden `vae-pipeline probe-clip CLIP --frames FILE` (JSON + raw upright RGB). References:
PyAV (`av` from PyPI, its own bundled FFmpeg build) decoding each frame to rgb24, ffprobe for
packet times and the display matrix, and the `ffmpeg` CLI's autorotate for upright frames.
Lossless FFV1 must give back the exact input bytes; lossy codecs must equal PyAV's rgb24 frames
exactly, with no tolerance (the same decoders and swscale conversion: BT.601 for untagged video,
bilinear), although PyAV bundles FFmpeg 8.1 and we use Debian's 5.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import clips  # noqa: E402

av = pytest.importorskip("av", reason="PyAV (`av`, tests/requirements.txt) is the reference decoder")


def ours(binary, clip: Path, tmp_path: Path):
    """(probe JSON, frames [T, H, W, 3] uint8) from `probe-clip`, or (error JSON, None)."""
    raw = tmp_path / (clip.name + ".rgb")
    run = subprocess.run([str(binary), "probe-clip", str(clip), "--frames", str(raw)],
                         capture_output=True, text=True)
    out = json.loads(run.stdout)
    if "error" in out:
        assert run.returncode != 0, run.stderr
        return out, None
    assert run.returncode == 0, run.stderr
    data = np.fromfile(raw, np.uint8)
    return out, data.reshape(len(out["frame_times"]), out["height"], out["width"], 3)


def pyav_frames(clip: Path):
    """PyAV's decode: rgb24 frames (as stored, not rotated) and their times."""
    with av.open(str(clip)) as c:
        stream = c.streams.video[0]
        decoded = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in c.decode(stream)]
    return np.stack([f for f, _ in decoded]), [t for _, t in decoded]


LOSSY = [
    ("h264", clips.h264_mp4, "mp4", None),
    ("vp9", clips.vp9_webm, "webm", "libvpx-vp9"),
    ("hevc", clips.hevc_mp4, "mp4", "libx265"),
    ("av1", clips.av1_mkv, "mkv", "libaom-av1"),
]


@pytest.mark.parametrize("codec,make,ext,encoder", LOSSY, ids=[c[0] for c in LOSSY])
def test_lossy_clips_match_pyav(binary, tmp_path, codec, make, ext, encoder):
    if encoder and not clips.has_encoder(encoder):
        pytest.skip(f"this ffmpeg has no {encoder} encoder")
    clip = make(tmp_path / f"clip.{ext}", clips.frames(t=9, h=48, w=64))
    info, frames = ours(binary, clip, tmp_path)
    reference, ref_times = pyav_frames(clip)
    assert info["codec"] == codec
    assert (info["width"], info["height"], info["rotation"]) == (64, 48, 0)
    assert info["fps"] == pytest.approx(16)
    assert frames.shape == reference.shape == (9, 48, 64, 3)
    diff = np.abs(frames.astype(int) - reference.astype(int))
    assert diff.max() == 0, f"{codec}: max |ours - PyAV| = {diff.max()}"
    assert info["frame_times"] == pytest.approx(ref_times, abs=1e-9)
    assert info["times"] == pytest.approx(clips.ffprobe_times(clip), abs=1e-6)
    assert info["times"] == pytest.approx(info["frame_times"], abs=1e-9)


def test_ffv1_gives_back_the_exact_rgb(binary, tmp_path):
    rgb = clips.frames(t=5, h=40, w=56, seed=3)
    clip = clips.ffv1_mkv(tmp_path / "lossless.mkv", rgb)
    info, frames = ours(binary, clip, tmp_path)
    assert info["codec"] == "ffv1"
    assert np.array_equal(frames, rgb)
    # Matroska stores milliseconds: 1/16 s is 0.063.
    assert info["frame_times"] == pytest.approx([i / 16 for i in range(5)], abs=1e-3)
    assert info["frame_times"] == pytest.approx(clips.ffprobe_times(clip), abs=1e-9)


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotated_phone_clip_comes_out_upright(binary, tmp_path, rotate):
    clip = clips.rotated_mp4(tmp_path / f"phone{rotate}.mp4", rotate, clips.frames(t=5, h=48, w=64))
    cw = clips.ffprobe_rotation(clip)
    assert cw != 0, "the clip must carry a display matrix"
    info, frames = ours(binary, clip, tmp_path)
    assert info["rotation"] == cw
    upright = (48, 64) if cw == 180 else (64, 48)
    assert (info["height"], info["width"]) == upright
    stored, _ = pyav_frames(clip)
    # np.rot90 turns counterclockwise for positive k: clockwise is -k.
    assert np.array_equal(frames, np.rot90(stored, k=-cw // 90, axes=(1, 2)))
    # The ffmpeg CLI's own autorotate agrees.
    cli = subprocess.run([clips.FFMPEG, "-v", "error", "-i", str(clip), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-sws_flags", "bilinear", "-"],
                         capture_output=True, check=True).stdout
    assert np.array_equal(frames, np.frombuffer(cli, np.uint8).reshape(frames.shape))


def test_variable_frame_rate_times_come_from_timestamps(binary, tmp_path):
    keep = [0, 1, 2, 5, 6, 10, 11, 12, 20]
    clip = clips.vfr_mp4(tmp_path / "vfr.mp4", keep, fps=30)
    info, frames = ours(binary, clip, tmp_path)
    expected = [i / 30 for i in keep]
    assert len(frames) == len(keep)
    assert info["times"] == pytest.approx(expected, abs=1e-6)
    assert info["frame_times"] == pytest.approx(expected, abs=1e-6)
    assert info["times"] == pytest.approx(clips.ffprobe_times(clip), abs=1e-6)
    _, ref_times = pyav_frames(clip)
    assert info["frame_times"] == pytest.approx(ref_times, abs=1e-9)


def test_broken_clips_get_their_failure_kinds(binary, tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    cases = {
        "zero.mp4": "empty",
        clips.truncated_mp4(tmp_path / "cut.mp4").name: "corrupt",
        clips.audio_only_m4a(tmp_path / "voice.m4a").name: "unsupported",
    }
    # An MP4 cut before its index (moov last, as ffmpeg writes by default).
    whole = clips.h264_mp4(tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "headless.mp4").write_bytes(whole[: len(whole) // 2])
    cases["headless.mp4"] = "corrupt"
    for name, kind in cases.items():
        out, frames = ours(binary, tmp_path / name, tmp_path)
        assert frames is None, name
        assert out["error"]["kind"] == kind, (name, out)
        assert out["error"]["message"], name


def peak_rss_kib(cmd: list[str]) -> int:
    """Peak resident memory of `cmd` (GNU time's %M, KiB)."""
    run = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stderr.strip().splitlines()[-1])


def test_memory_does_not_grow_with_clip_length(binary, tmp_path):
    if not Path("/usr/bin/time").exists():
        pytest.skip("needs GNU time (/usr/bin/time)")
    short = clips.h264_mp4(tmp_path / "short.mp4", clips.frames(t=16, h=240, w=320))
    long = clips.h264_mp4(tmp_path / "long.mp4", clips.frames(t=400, h=240, w=320))
    rss = {p.name: peak_rss_kib([str(binary), "probe-clip", str(p), "--frames", "/dev/null"])
           for p in (short, long)}
    # 400 decoded frames are 92 MB of RGB: streamed, the long clip costs a few MB more at most
    # (its probe's times and the compressed bytes), not the frames.
    assert rss["long.mp4"] - rss["short.mp4"] < 16 * 1024, rss


def test_doctor_reports_the_plugin(binary):
    out = subprocess.run([str(binary), "doctor"], capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("FFmpeg plugin"))
    assert "libvae_pipeline_ffmpeg.so" in line and "libavcodec" in line


def test_missing_plugin_says_what_to_do(binary, tmp_path):
    clip = clips.h264_mp4(tmp_path / "c.mp4")
    env = {"VAE_PIPELINE_FFMPEG": str(tmp_path / "nowhere.so"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(binary), "probe-clip", str(clip)], capture_output=True, text=True,
                         env=env)
    assert run.returncode != 0
    assert "nowhere.so" in run.stderr and "VAE_PIPELINE_FFMPEG" in run.stderr


LIBAVCODEC = Path("/lib/x86_64-linux-gnu/libavcodec.so.59")


def without_ffmpeg(cmd: list[str]) -> subprocess.CompletedProcess:
    """`cmd` on this machine as if FFmpeg's libraries were not installed: in a private mount
    namespace where libavcodec is an empty file (`unshare -m`, root only)."""
    script = f"mount --bind /dev/null {LIBAVCODEC} && exec \"$@\""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd],
                          capture_output=True, text=True)


def test_without_ffmpeg_images_encode_and_clips_say_what_to_install(binary, cards, shared, tmp_path):
    if not LIBAVCODEC.exists() or not shutil.which("unshare"):
        pytest.skip("needs Debian 12's libavcodec59 and unshare")
    if without_ffmpeg(["true"]).returncode != 0:
        pytest.skip("no private mount namespaces here (needs root)")
    clip = clips.h264_mp4(tmp_path / "c.mp4")
    run = without_ffmpeg([str(binary), "probe-clip", str(clip)])
    assert run.returncode != 0
    assert "apt install libavcodec59 libavformat59 libswscale6" in run.stderr, run.stderr
    assert "libavcodec.so.59" in run.stderr, run.stderr
    doctor = without_ffmpeg([str(binary), "doctor"]).stdout
    assert "FFmpeg plugin (clips): not usable, images still work" in doctor
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(p.name for p in (shared / "data" / "kodak").glob("*.png"))[:2]:
        shutil.copy(shared / "data" / "kodak" / name, images / name)
    out = tmp_path / "out"
    enc = without_ffmpeg([str(binary), "precompute", "--input", str(images), "--out", str(out),
                          "--model", str(cards["avgpool8"]), "--size", "64"])
    assert enc.returncode == 0, enc.stderr[-3000:]
    assert (out / "_SUCCESS").exists()
