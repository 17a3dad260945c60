"""Clip decode speed: ours (the FFmpeg plugin through `vae-pipeline probe-clip --frames`) against
PyAV, both to upright RGB24 frames, side by side in one run. A benchmark, not a test.

    .venv/bin/python benches/video_decode.py [--bin target/release/vae-pipeline] [--clips 4]
        [--frames 81] [--size 832x480] [--codec h264|vp9] [--repeat 2]

Clips are made first with Debian's ffmpeg (tests/python/clips.py), then each side decodes all of
them `--repeat` times, taking turns, and the best pass counts. Ours runs one process per clip (its probe's demux
pass, decoding, conversion, rotation, frames written to /dev/null); PyAV decodes in this process
(`frame.to_ndarray(format="rgb24")`). Two rows for scale: ours without decoding (process start,
plugin load, probe pass: what a process per clip adds, which the pipeline, decoding in-process,
does not pay but for the probe) and Debian's `ffmpeg` CLI (same FFmpeg 5.1, a process per clip).
Wall time and CPU time (user + system, children included)
are both shown: on a shared machine the CPU time is the steadier of the two. Both let FFmpeg pick the decoder threads (PyAV with
`thread_type = "AUTO"`, ours with thread count 0), so both use frame and slice threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))
import clips  # noqa: E402


def ours(binary: Path, paths: list[Path], decode: bool = True) -> int:
    """Frames decoded (`decode`), or found by the probe alone (process start, plugin load, demux
    pass: the part of ours that is not decoding)."""
    n = 0
    for p in paths:
        frames = ["--frames", "/dev/null"] if decode else []
        out = subprocess.run([str(binary), "probe-clip", str(p), *frames],
                             capture_output=True, text=True, check=True).stdout
        n += len(json.loads(out)["frame_times" if decode else "times"])
    return n


def cli(paths: list[Path], frames: int) -> int:
    """Debian's `ffmpeg` CLI, one process per clip, decoding to rgb24 (same FFmpeg 5.1 and swscale
    flags as ours): what a process per clip costs, for scale."""
    for p in paths:
        subprocess.run([clips.FFMPEG, "-v", "error", "-threads", "0", "-i", str(p), "-f", "rawvideo",
                        "-pix_fmt", "rgb24", "-sws_flags", "bilinear", "-y", "/dev/null"], check=True)
    return frames * len(paths)


def pyav(paths: list[Path]) -> int:
    import av

    n = 0
    for p in paths:
        with av.open(str(p)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in c.decode(stream):
                frame.to_ndarray(format="rgb24")
                n += 1
    return n


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best(sides: dict, repeat: int) -> list[tuple[str, float, float, int]]:
    """(name, best wall seconds, best CPU seconds, frames) per side; the sides take turns, pass by
    pass, so a machine whose load changes affects both alike."""
    walls = {name: [] for name in sides}
    cpus = {name: [] for name in sides}
    counts = {}
    for _ in range(repeat):
        for name, fn in sides.items():
            t, c = time.perf_counter(), cpu_seconds()
            counts[name] = fn()
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(cpu_seconds() - c)
    return [(name, min(walls[name]), min(cpus[name]), counts[name]) for name in sides]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "vae-pipeline")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--codec", choices=["h264", "vp9"], default="h264")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    import av

    w, h = (int(v) for v in args.size.split("x"))
    make = {"h264": (clips.h264_mp4, "mp4"), "vp9": (clips.vp9_webm, "webm")}[args.codec]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [make[0](Path(tmp) / f"clip{i}.{make[1]}", clips.frames(args.frames, h, w, seed=i))
                 for i in range(args.clips)]
        rows = best({"vae-pipeline (FFmpeg plugin)": lambda: ours(args.bin, paths),
                     f"PyAV {av.__version__}": lambda: pyav(paths),
                     "  of ours: start + probe only": lambda: ours(args.bin, paths, decode=False),
                     "ffmpeg CLI (Debian 5.1)": lambda: cli(paths, args.frames)},
                    args.repeat)
    print(f"{args.clips} clips x {args.frames} frames, {w}x{h} {args.codec} yuv420p -> RGB24, "
          f"best of {args.repeat}")
    print(f"{'decoder':32} {'seconds':>8} {'clips/s':>8} {'frames/s':>9} {'CPU s':>7} {'frames/CPU s':>13}")
    for name, seconds, cpu, frames in rows:
        assert frames == args.clips * args.frames, (name, frames)
        print(f"{name:32} {seconds:8.2f} {args.clips / seconds:8.2f} {frames / seconds:9.1f} "
              f"{cpu:7.2f} {frames / cpu:13.1f}")
    print(f"PyAV's bundled FFmpeg {av.ffmpeg_version_info}; ours: `vae-pipeline doctor`")


if __name__ == "__main__":
    main()
