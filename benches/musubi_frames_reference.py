"""Regenerates tests/fixtures/musubi_frames.json: the frame windows musubi-tuner's own dataset
code takes from clips, for `src/frames.rs` to be compared against (its unit test
`frames::tests::musubi_reference` reads the JSON).

Nothing of musubi is restated here: each case runs musubi's `VideoDataset` (its
`retrieve_latent_cache_batches`, the code `wan_cache_latents.py` caches with) over clips made of
PNG frames (musubi's `load_video` reads a folder of images as a clip, with the same `source_fps`
resampling as for video files). Frame i of a clip is a 32x32 image of colour (i % 256, i // 256,
7), so the source index of every frame musubi hands on is read back from its pixels.

Each case records `frames`, the name of a sequence in `sequences`: the source indices of the
frames musubi loaded from the clip, in order (what its datasource returns, after `source_fps`
resampling and `head`'s frame limit), and `windows`: musubi's items as (start, count) from its
item key `{stem}_{start:05d}-{count:03d}`, sorted, duplicates kept. The script checks that every
item's frames are `frames[start:start + count]`.

Run it with musubi's imports installed (torch, numpy, pillow, opencv-python-headless, av,
safetensors) and a checkout of musubi-tuner (the commit is recorded in the JSON):

    python benches/musubi_frames_reference.py --musubi /path/to/musubi-tuner \
        --out tests/fixtures/musubi_frames.json
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

LENGTHS = [1, 4, 5, 9, 25, 26, 45, 81, 100]
SOURCE_FPS = [None, 30.0, 29.97, 60.0, 16.0, 8.0]
# (frame_extraction, target_frames, frame_stride, frame_sample, max_frames)
OPTIONS = [
    ("head", [1], 1, 1, 129),
    ("head", [1, 25, 45], 1, 1, 129),
    ("head", [9, 13, 81], 1, 1, 129),
    ("chunk", [13, 25], 1, 1, 129),
    ("chunk", [1], 1, 1, 129),
    ("chunk", [5, 45], 1, 1, 129),
    ("slide", [1, 13, 25], 10, 1, 129),
    ("slide", [25], 3, 1, 129),
    ("slide", [5, 17], 7, 1, 129),
    ("uniform", [1, 13, 25], 1, 4, 129),
    ("uniform", [9], 1, 2, 129),
    ("uniform", [25], 1, 7, 129),
    ("uniform", [45], 1, 3, 129),
    ("uniform", [5, 25], 1, 1, 129),
    ("full", [1], 1, 1, 129),
    ("full", [1], 1, 1, 31),
    ("full", [1], 1, 1, 45),
    ("full", [1], 1, 1, 1),
    ("full", [1], 1, 1, 8),
]


def make_clips(root):
    paths = {}
    for n in LENGTHS:
        folder = os.path.join(root, f"clip{n:03d}")
        os.makedirs(folder)
        for i in range(n):
            pixels = np.full((32, 32, 3), (i % 256, i // 256, 7), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.png"))
        paths[folder] = n
    return paths


def source_indices(frames):
    frames = np.stack(frames).astype(np.int64)
    return (frames[:, 0, 0, 0] + 256 * frames[:, 0, 0, 1]).tolist()


def run_case(VideoDataset, jsonl, option, source_fps, cache):
    """musubi's windows of every clip, {clip path: (loaded source indices, [[start, count]])}."""
    extraction, target_frames, stride, sample, max_frames = option
    dataset = VideoDataset(
        resolution=(32, 32),
        caption_extension=None,
        batch_size=1,
        num_repeats=1,
        enable_bucket=False,
        bucket_no_upscale=False,
        frame_extraction=extraction,
        frame_stride=stride,
        frame_sample=sample,
        target_frames=target_frames,
        max_frames=max_frames,
        source_fps=source_fps,
        video_jsonl_file=jsonl,
        cache_directory=cache,
        architecture="wan",
    )
    items = {}
    for _, batch in dataset.retrieve_latent_cache_batches(num_workers=1):
        for item in batch:
            body, position = item.item_key.rsplit("_", 1)
            start, count = (int(t) for t in position.split("-"))
            assert len(item.content) == count == item.frame_count, item.item_key
            items.setdefault(body, []).append((start, count, source_indices(item.content)))
    found = {}
    # The datasource as the run left it (fps and head's frame limit set by musubi itself).
    for idx in range(len(dataset.datasource)):
        path, video, _, _ = dataset.datasource.get_video_data(idx)
        loaded = source_indices(video)
        windows = []
        for start, count, indices in items.get(path, []):
            assert indices == loaded[start : start + count], (path, start, count)
            windows.append([start, count])
        found[path] = (loaded, sorted(windows))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--musubi", required=True, help="a musubi-tuner checkout")
    parser.add_argument("--out", default="tests/fixtures/musubi_frames.json")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(args.musubi, "src"))
    from musubi_tuner.dataset.image_video_dataset import VideoDataset

    logging.disable(logging.WARNING)
    commit = subprocess.run(
        ["git", "-C", args.musubi, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    cases = []
    sequences = {}
    with tempfile.TemporaryDirectory() as root:
        clips = make_clips(root)
        jsonl = os.path.join(root, "clips.jsonl")
        with open(jsonl, "w") as f:
            for path in clips:
                f.write(json.dumps({"video_path": path, "caption": "x"}) + "\n")
        for option in OPTIONS:
            for source_fps in SOURCE_FPS:
                found = run_case(VideoDataset, jsonl, option, source_fps, os.path.join(root, "cache"))
                extraction, target_frames, stride, sample, max_frames = option
                for path, n in clips.items():
                    loaded, windows = found[path]
                    name = next((k for k, v in sequences.items() if v == loaded), None)
                    if name is None:
                        name = f"s{len(sequences)}"
                        sequences[name] = loaded
                    cases.append(
                        {
                            "options": {
                                "target_frames": target_frames,
                                "frame_extraction": extraction,
                                "frame_stride": stride,
                                "frame_sample": sample,
                                "max_frames": max_frames,
                                "source_fps": source_fps,
                                "target_fps": VideoDataset.TARGET_FPS_WAN,
                            },
                            "frame_count": n,
                            "frames": name,
                            "windows": windows,
                        }
                    )
    dump = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    with open(args.out, "w") as f:
        f.write('{"musubi_commit":"%s",\n"sequences":{\n' % commit)
        f.write(",\n".join(f'"{k}":{dump(v)}' for k, v in sequences.items()))
        f.write("},\n\"cases\":[\n")
        f.write(",\n".join(dump(c) for c in cases))
        f.write("\n]}\n")
    print(f"{len(cases)} cases, {sum(len(c['windows']) for c in cases)} windows -> {args.out}")


if __name__ == "__main__":
    main()
