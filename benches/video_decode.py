"""Clip decode speed: ours (the FFmpeg plugin through `vae-pipeline probe-clip --frames`) against
PyAV, both to upright RGB24 frames, side by side in one run. A benchmark, not a test.

    .venv/bin/python benches/video_decode.py [--bin target/release/vae-pipeline] [--clips 4]
        [--frames 81] [--size 832x480] [--codec h264|vp9] [--repeat 2]

Clips are made first with Debian's ffmpeg (tests/python/clips.py), then each side decodes all of
them `--repeat` times and the best pass counts. Ours runs one process per clip (its probe's demux
pass, decoding, conversion, rotation, frames written to /dev/null); PyAV decodes in this process
(`frame.to_ndarray(format="rgb24")`). Wall time and CPU time (user + system, children included)
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


def ours(binary: Path, paths: list[Path]) -> int:
    n = 0
    for p in paths:
        out = subprocess.run([str(binary), "probe-clip", str(p), "--frames", "/dev/null"],
                             capture_output=True, text=True, check=True).stdout
        n += len(json.loads(out)["frame_times"])
    return n


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


def best(fn, repeat: int) -> tuple[float, float, int]:
    """Best wall seconds and best CPU seconds over `repeat` passes, and the frames decoded."""
    walls, cpus, count = [], [], 0
    for _ in range(repeat):
        t, c = time.perf_counter(), cpu_seconds()
        count = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(cpu_seconds() - c)
    return min(walls), min(cpus), count


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
        rows = [("vae-pipeline (FFmpeg plugin)", *best(lambda: ours(args.bin, paths), args.repeat)),
                (f"PyAV {av.__version__}", *best(lambda: pyav(paths), args.repeat))]
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
