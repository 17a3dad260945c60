#!/usr/bin/env python3
r"""Clips → Wan latents: ours (`vae-pipeline precompute` on clips) against musubi-tuner's own
`wan_cache_latents.py`, side by side in one run, on the same H.264 clips with the same tiny Wan 2.1
VAE (../shared/models/families/wan2.1) on the CPU, both in f32. Also PyAV's decode alone (musubi's
decoder), against ours (`probe-clip`) when the binary has it.

Run from the repository root with the project venv (numpy, pyarrow, safetensors):

    PEER_PY=/path/to/peer-venv/bin/python .venv/bin/python benches/video_bench.py
        [--clips 8] [--size 96x96] [--frames 81] [--rounds 1] [--peer-only]

The peer runs in its own venv (PEER_PY or --peer-python) holding torch and musubi-tuner @30c658c4,
from PyPI and a checkout of musubi-tuner:

    python3 -m venv VENV
    VENV/bin/pip install torch==2.15.0 torchvision diffusers==0.32.1 transformers==4.57.6 \
        accelerate==1.6.0 huggingface-hub==0.34.3 av==14.0.1 einops==0.7.0 safetensors==0.4.5 \
        opencv-python-headless==4.10.0.84 toml==0.10.2 voluptuous==0.15.2 easydict==1.13 \
        ftfy==6.3.1 tqdm==4.67.1 regex pillow numpy
    VENV/bin/pip install --no-deps -e MUSUBI_CHECKOUT

benches/video/musubi_tiny_wan.py adapts musubi to the tiny model at run time (its doc says exactly
what it changes), and `musubi_tiny_wan.py check` proves that the adapted musubi computes
diffusers' goldens. Each run is under `/usr/bin/time -v` (peak RSS, CPU seconds) with a fresh
output folder; runs alternate ours/musubi when --rounds > 1 and the table shows the median.

Clips: N clips of FRAMES frames, W×H, 16 fps, made with the `ffmpeg` CLI from the Kodak photos
(a slow pan over photo i, stretched so the window moves 3 px right and 2 px down per frame),
libx264 CRF 18, yuv420p MP4. They are cached under WORK/clips-… and reused.

Timings: "wall s" is process start to exit; "work s" leaves out imports and model load: for
musubi from the start of its `encode_datasets` (VAE loaded) to its end (decode, encode, save), for
ours the `seconds` of `_SUCCESS` (clock started once the encoder sessions are open).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# How ours is run on clips (`precompute`'s clip flags). The model is the same tiny diffusers
# folder, exported by `vae-pipeline export` into WORK/ours-wan21-tiny/ (card.toml with the
# [temporal] graphs and the folder's latents_mean/std) unless --model names a card.
OURS_VIDEO_FLAGS = ["--target-frames", "{frames}", "--frame-extraction", "head"]
# Same precision as the peer (musubi runs with --vae_dtype float32), latents stored as f32.
OURS_FLAGS = ["--dtype", "f32"]


def ours_geometry_flags(width, height):
    """Ours keeps the clip's own size (no resize), as musubi's single bucket does: a square clip
    of side --size is center-cropped to itself."""
    if width != height:
        sys.exit(f"video_bench: ours keeps a {width}x{height} clip unresized only with flags this script "
                 "does not know yet: use a square --size, or --peer-only, or extend ours_geometry_flags")
    return ["--size", str(width)]


# Ours decoding alone (frames/s): the binary's hidden `probe-clip` subcommand (the FFmpeg plugin:
# probe, decode, RGB conversion, rotation; frames written to /dev/null), one process per clip,
# as benches/video_decode.py runs it. It prints JSON whose `frame_times` lists the frames. Skipped
# when the binary lacks the subcommand.
OURS_DECODE_ARGS = ["probe-clip", "{clip}", "--frames", "/dev/null"]

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "benches" / "video" / "musubi_tiny_wan.py"
sys.path.insert(0, str(HELPER.parent))
from musubi_tiny_wan import dataset_toml  # noqa: E402


def make_clips(folder, n, width, height, frames, kodak):
    """N H.264 clips of FRAMES frames (a pan over Kodak photo i); reused when made already."""
    spec = {"n": n, "width": width, "height": height, "frames": frames, "fps": 16, "crf": 18, "v": 1}
    marker = folder / ".clipset.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sorted(folder.glob("*.mp4"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = sorted(kodak.glob("kodim*.png"))
    if not photos:
        sys.exit(f"video_bench: no Kodak photos in {kodak} (--kodak)")
    pan_w, pan_h = width + 3 * (frames - 1), height + 2 * (frames - 1)
    for i in range(n):
        out = folder / f"clip_{i:03d}.mp4"
        vf = f"scale={pan_w}:{pan_h}:flags=bicubic,crop={width}:{height}:x=3*n:y=2*n"
        cmd = ["ffmpeg", "-v", "error", "-y", "-loop", "1", "-framerate", "16", "-i", str(photos[i % len(photos)]),
               "-vf", vf, "-frames:v", str(frames), "-c:v", "libx264", "-crf", "18", "-preset", "medium",
               "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out)]
        subprocess.run(cmd, check=True)
    marker.write_text(json.dumps(spec))
    return sorted(folder.glob("*.mp4"))


def timed(cmd, work, log_name):
    """Run CMD under GNU time: (wall seconds, CPU seconds, peak RSS MiB, stdout+stderr)."""
    time_file = work / f"{log_name}.time"
    log_file = work / f"{log_name}.log"
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        rc = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), *cmd], stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = log_file.read_text(errors="replace")
    if rc != 0:
        sys.exit(f"video_bench: {' '.join(map(str, cmd))} failed ({rc}); log: {log_file}\n{text[-3000:]}")
    report = time_file.read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", report).group(1)) for kind in ("User", "System"))
    return wall, cpu, rss_kb / 1024, text


def run_peer(a, clips, work, vae, n_frames, width, height):
    """musubi's wan_cache_latents.py over the clips, fresh cache folder."""
    cache_dir = work / "musubi-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    jsonl = work / "musubi-clips.jsonl"
    jsonl.write_text("".join(json.dumps({"video_path": str(c), "caption": "a pan"}) + "\n" for c in clips))
    toml = work / "musubi-dataset.toml"
    toml.write_text(dataset_toml(width, height, n_frames, str(jsonl), str(cache_dir)))
    cmd = [a.peer_python, str(HELPER), "cache", "--family", str(a.family), "--", "--dataset_config", str(toml),
           "--vae", str(vae), "--vae_dtype", "float32", "--device", "cpu"]
    wall, cpu, rss, text = timed(cmd, work, "musubi")
    marks = json.loads(re.search(r"^BENCH_PEER (.*)$", text, re.M).group(1))
    written = sorted(cache_dir.glob("*_wan.safetensors"))
    if len(written) != len(clips):
        sys.exit(f"video_bench: musubi wrote {len(written)} cache files for {len(clips)} clips (see {work}/musubi.log)")
    return {"wall_s": wall, "work_s": marks["encode_end"] - marks["encode_start"], "cpu_s": cpu, "peak_rss_mib": rss,
            "load_s": marks["encode_start"] - marks["process_start"], "outputs": len(written)}


def export_ours(binary, family, folder):
    """Our ONNX graphs and card for the diffusers folder (a few seconds; outside the timings)."""
    subprocess.run([str(binary), "export", "--checkpoint", str(family), "--out", str(folder)], check=True,
                   stdout=subprocess.DEVNULL)
    card = folder / "card.toml"
    if "[temporal]" not in card.read_text():
        sys.exit(f"video_bench: {card} has no [temporal] table: this binary's export does not write the clip graphs")
    return card


def run_ours(a, clips_dir, n_clips, work, n_frames, width, height):
    """`vae-pipeline precompute` over the clip folder, fresh output folder."""
    out = work / "ours-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(a.bin), "precompute", "--input", str(clips_dir), "--out", str(out), "--model", str(a.model),
           *ours_geometry_flags(width, height), *[f.format(frames=n_frames) for f in OURS_VIDEO_FLAGS], *OURS_FLAGS,
           "--threads", str(a.threads)]
    wall, cpu, rss, _ = timed(cmd, work, "ours")
    success = json.loads((out / "_SUCCESS").read_text())
    if success["rows"] != n_clips:
        sys.exit(f"video_bench: ours wrote {success['rows']} rows for {n_clips} clips (see {out}/_errors.jsonl)")
    return {"wall_s": wall, "work_s": success["seconds"], "cpu_s": cpu, "peak_rss_mib": rss, "outputs": success["rows"]}


def agreement(work):
    """Largest |ours − musubi| over the latents of the last round (both normalized, f32)."""
    import numpy as np
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    peer = {}
    for f in (work / "musubi-cache").glob("*_wan.safetensors"):
        stem = f.name.split("_00000-")[0]
        (t,) = [v for k, v in load_file(str(f)).items() if k.startswith("latents_")]
        peer[stem] = t
    worst, compared = 0.0, 0
    for shard in (work / "ours-out").rglob("*.parquet"):
        table = pq.read_table(shard, columns=["key", "latent"])
        latents = table.column("latent").combine_chunks()
        values = latents.to_numpy_ndarray()
        for i, key in enumerate(table.column("key").to_pylist()):
            stem = Path(key.split("/")[0]).stem
            if stem not in peer:
                continue
            worst = max(worst, float(np.abs(values[i].astype(np.float32) - peer[stem]).max()))
            compared += 1
    return {"compared": compared, "max_abs_diff": worst}


def decode_only(a, clips, work):
    """Decode alone: PyAV as musubi's load_video calls it (default threading), and ours."""
    rows = {}
    _, _, _, text = timed([a.peer_python, str(HELPER), "pyav-decode", *map(str, clips)], work, "pyav")
    rows["PyAV (as musubi calls it)"] = json.loads(re.search(r"^BENCH_PYAV (.*)$", text, re.M).group(1))
    if a.peer_only or subprocess.run([str(a.bin), OURS_DECODE_ARGS[0], "--help"], capture_output=True).returncode:
        return rows
    t0, frames = time.perf_counter(), 0
    for clip in clips:
        args = [str(clip) if x == "{clip}" else x for x in OURS_DECODE_ARGS]
        out = subprocess.run([str(a.bin), *args], capture_output=True, text=True, check=True).stdout
        frames += len(json.loads(out)["frame_times"])
    rows["ours (probe-clip, a process per clip)"] = {"clips": len(clips), "frames": frames,
                                                     "seconds": time.perf_counter() - t0}
    return rows


def median_run(runs):
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"walls_s": [r["wall_s"] for r in runs]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=8, help="number of clips")
    p.add_argument("--size", default="96x96", help="clip size WxH (multiples of 16: no resize on either side)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip (N*4+1), all of them encoded")
    p.add_argument("--rounds", type=int, default=1, help="alternate ours/musubi this many times; median shown")
    p.add_argument("--peer-only", action="store_true", help="musubi and PyAV only (before ours takes clips)")
    p.add_argument("--peer-python", default=os.environ.get("PEER_PY"),
                   help="python of the venv with torch + musubi-tuner [$PEER_PY]")
    p.add_argument("--family", type=Path, default=ROOT.parent / "shared/models/families/wan2.1",
                   help="the tiny diffusers Wan 2.1 VAE both sides use")
    p.add_argument("--kodak", type=Path, default=ROOT.parent / "shared/data/kodak")
    p.add_argument("--bin", type=Path, default=Path(os.environ.get("BIN", ROOT / "target/release/vae-pipeline")))
    p.add_argument("--model", type=Path, default=None,
                   help="our card for the same model [exported from --family into WORK/ours-wan21-tiny]")
    p.add_argument("--threads", type=int, default=0, help="ours: --threads (0 = all cores; torch uses all)")
    p.add_argument("--work", type=Path, default=ROOT / "target/bench/video")
    p.add_argument("--json", type=Path, default=None, help="results JSON [WORK/video_bench.json]")
    a = p.parse_args()

    width, height = (int(v) for v in a.size.lower().split("x"))
    if (a.frames - 1) % 4:
        sys.exit(f"video_bench: --frames {a.frames} is not N*4+1 (e.g. 81)")
    if width % 16 or height % 16:
        sys.exit(f"video_bench: --size {a.size}: use multiples of 16 so neither side resizes")
    if not a.peer_python or not Path(a.peer_python).exists():
        sys.exit(f"video_bench: the peer's python ({a.peer_python or 'PEER_PY unset'}) is not there: "
                 "make the venv this script's doc describes and pass --peer-python or PEER_PY")
    if not a.peer_only and not a.bin.exists():
        sys.exit(f"video_bench: {a.bin} not found: cargo build --release (or --peer-only)")
    a.work.mkdir(parents=True, exist_ok=True)

    clips_dir = a.work / f"clips-{a.clips}x{a.frames}-{width}x{height}"
    clips = make_clips(clips_dir, a.clips, width, height, a.frames, a.kodak)
    vae = a.work / "musubi-wan21-tiny.safetensors"
    if not vae.exists():
        subprocess.run([a.peer_python, str(HELPER), "convert", "--family", str(a.family), "--out", str(vae)], check=True)

    if not a.peer_only:
        ours_geometry_flags(width, height)
        if a.model is None:
            a.model = export_ours(a.bin, a.family, a.work / "ours-wan21-tiny")

    runs = {"musubi": [], "ours": []}
    for _ in range(a.rounds):
        if not a.peer_only:
            runs["ours"].append(run_ours(a, clips_dir, len(clips), a.work, a.frames, width, height))
        runs["musubi"].append(run_peer(a, clips, a.work, vae, a.frames, width, height))
    results = {name: median_run(r) for name, r in runs.items() if r}
    decode = decode_only(a, clips, a.work)
    frames = len(clips) * a.frames

    print(f"\n{len(clips)} clips × {a.frames} frames, {width}×{height}, tiny Wan 2.1 VAE, f32, CPU ({os.cpu_count()} cores)")
    print("| run | clips | frames | wall s | work s | CPU s | clips/s (wall) | frames/s (wall) | frames/s (work) "
          "| peak RSS MiB | speed × musubi (wall) | speed × musubi (work) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results["musubi"]
    for name, r in results.items():
        print(f"| {name} | {len(clips)} | {frames} | {r['wall_s']:.1f} | {r['work_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{len(clips) / r['wall_s']:.3f} | {frames / r['wall_s']:.1f} | {frames / r['work_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {base['wall_s'] / r['wall_s']:.2f} | {base['work_s'] / r['work_s']:.2f} |")
    print("\n| decode only | clips | frames | seconds | frames/s |")
    print("|---|---:|---:|---:|---:|")
    for name, d in decode.items():
        print(f"| {name} | {d['clips']} | {d['frames']} | {d['seconds']:.2f} | {d['frames'] / d['seconds']:.0f} |")
    report = {"clips": len(clips), "frames_per_clip": a.frames, "width": width, "height": height,
              "cores": os.cpu_count(), "runs": results, "decode": decode}
    if "ours" in results:
        report["agreement"] = agreement(a.work)
        print(f"\nlatents ours vs musubi: max |diff| {report['agreement']['max_abs_diff']:.3g} "
              f"over {report['agreement']['compared']} clips")
    out = a.json or a.work / "video_bench.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
