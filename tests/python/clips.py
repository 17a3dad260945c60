"""Real video clips for the tests, made with Debian's `ffmpeg` CLI (FFmpeg 5.1).

Each maker writes one file and returns its path. Frames come from `frames()` (a deterministic
moving pattern) unless given: an array [T, H, W, 3] uint8, piped to ffmpeg as raw RGB24.

    h264_mp4, hevc_mp4, vp9_webm, av1_mkv  lossy clips of the common codecs
    ffv1_mkv                               lossless (FFV1, gbrp): decodes to the exact RGB bytes
    rotated_mp4                            a phone-style MP4 whose display matrix turns the picture
    vfr_mp4                                variable frame rate: some frames dropped, gaps kept
    truncated_mp4                          a +faststart MP4 cut short (index whole, data missing)
    audio_only_m4a                         AAC in MP4, no video stream
    tar_of                                 a WebDataset-style tar of clips (and other members)
    has_encoder                            whether this ffmpeg has an encoder (libx265, libaom-av1, …)
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFPROBE = shutil.which("ffprobe") or "ffprobe"


def frames(t: int = 9, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """T frames of a smooth moving gradient plus a little noise: compresses like video, and any
    frame mix-up or flip shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        r = (x * 255 // max(w - 1, 1) + 8 * i) % 256
        g = (y * 255 // max(h - 1, 1) + 4 * i) % 256
        b = ((x + y + 3 * i) * 4) % 256
        noise = rng.integers(0, 8, (h, w))
        out[i] = np.stack([r, g, (b + noise) % 256], axis=-1)
    return out


def encode(path, rgb: np.ndarray, args: list[str], fps: float = 16) -> Path:
    """`rgb` [T, H, W, 3] uint8 → `path`, encoded with the ffmpeg output `args` (codec etc.)."""
    path = Path(path)
    t, h, w, _ = rgb.shape
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
           *args, str(path)]
    subprocess.run(cmd, input=np.ascontiguousarray(rgb).tobytes(), check=True)
    return path


def has_encoder(name: str) -> bool:
    out = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines() if line.startswith(" "))


def h264_mp4(path, rgb=None, fps: float = 16) -> Path:
    rgb = frames() if rgb is None else rgb
    return encode(path, rgb, ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast"], fps)


def hevc_mp4(path, rgb=None, fps: float = 16) -> Path:
    rgb = frames() if rgb is None else rgb
    return encode(path, rgb, ["-c:v", "libx265", "-pix_fmt", "yuv420p", "-preset", "ultrafast",
                              "-x265-params", "log-level=error", "-tag:v", "hvc1"], fps)


def vp9_webm(path, rgb=None, fps: float = 16) -> Path:
    rgb = frames() if rgb is None else rgb
    return encode(path, rgb, ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-deadline", "realtime",
                              "-b:v", "500k"], fps)


def av1_mkv(path, rgb=None, fps: float = 16) -> Path:
    rgb = frames() if rgb is None else rgb
    return encode(path, rgb, ["-c:v", "libaom-av1", "-pix_fmt", "yuv420p", "-cpu-used", "8",
                              "-b:v", "500k"], fps)


def ffv1_mkv(path, rgb=None, fps: float = 16) -> Path:
    """Lossless: FFV1 with a planar RGB pixel format, so decoding gives back `rgb` exactly."""
    rgb = frames() if rgb is None else rgb
    return encode(path, rgb, ["-c:v", "ffv1", "-pix_fmt", "gbrp"], fps)


def rotated_mp4(path, rotate: int = 90, rgb=None, fps: float = 16) -> Path:
    """A phone-style MP4: frames stored sideways plus a display matrix (FFmpeg 5.1 writes one
    from the `rotate` tag when it copies the stream; ffprobe's `rotation` shows it)."""
    path = Path(path)
    plain = h264_mp4(path.with_name(path.stem + ".plain.mp4"), rgb, fps)
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-i", str(plain),
                    "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}", str(path)], check=True)
    plain.unlink()
    return path


def vfr_mp4(path, keep: list[int], rgb=None, fps: float = 30) -> Path:
    """Variable frame rate: of `rgb` at `fps`, only the frames `keep` (indices, ascending), each
    at its original time i/fps, so the gaps stay (`-fps_mode passthrough`)."""
    rgb = frames(t=max(keep) + 1) if rgb is None else rgb
    expr = "+".join(f"eq(n\\,{i})" for i in keep)
    return encode(path, rgb, ["-vf", f"select={expr}", "-fps_mode", "passthrough",
                              "-c:v", "libx264", "-pix_fmt", "yuv420p", "-bf", "0",
                              "-video_track_timescale", str(int(fps) * 1000)], fps)


def truncated_mp4(path, fraction: float = 0.6, rgb=None) -> Path:
    """A download cut short: an MP4 with its index first (`+faststart`, as web video is), whose
    last (1 - fraction) bytes are missing."""
    path = Path(path)
    rgb = frames(t=17) if rgb is None else rgb
    full = encode(path.with_name(path.stem + ".full.mp4"), rgb,
                  ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart"])
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def audio_only_m4a(path, seconds: float = 0.5) -> Path:
    path = Path(path)
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", str(path)],
                   check=True)
    return path


def tar_of(path, members: dict) -> Path:
    """A tar (Python's tarfile) whose members are {name in the tar: file path or bytes}."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for name, src in members.items():
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def ffprobe_stream(path) -> dict:
    """ffprobe's description of the first video stream (with side data)."""
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_streams",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]


def ffprobe_times(path) -> list[float]:
    """Every video packet's presentation time (s), in display order, from ffprobe."""
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "packet=pts_time", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True)
    return sorted(float(p["pts_time"]) for p in json.loads(out.stdout)["packets"])


def ffprobe_rotation(path) -> int:
    """Clockwise degrees a player turns the picture: minus the display matrix's rotation."""
    for side in ffprobe_stream(path).get("side_data_list", []):
        if "rotation" in side:
            return int(-float(side["rotation"])) % 360
    return 0
