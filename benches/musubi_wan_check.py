"""Checks a `convert --to musubi --arch wan` cache with musubi-tuner's own code: every item its
Wan caching would make from the clips is there, with the tensor and metadata its
`save_latent_cache_wan` writes, and its training's dataset (`VideoDataset.prepare_for_training`,
then loading every batch) finds and loads them all.

    # the cache of our shards, against the clips they were made from, with the same options
    python benches/musubi_wan_check.py --musubi /path/to/musubi-tuner --clips CLIPS --cache CACHE \
        --resolution 832,480 --target-frames 1,25,45 --frame-extraction head [--source-fps 30.0]

    # the harness itself: clips made with ffmpeg, a cache written by musubi's own
    # save_latent_cache_wan from random latents, then the check above
    python benches/musubi_wan_check.py --musubi /path/to/musubi-tuner --self-test

    # tests/fixtures/musubi_wan_latent.safetensors, the file convert's unit test compares with
    python benches/musubi_wan_check.py --musubi /path/to/musubi-tuner --fixture OUT

What it does:
1. musubi's `VideoDataset` (the options given; a JSONL datasource over the clips, so no caption
   files are needed) runs `retrieve_latent_cache_batches`, the code `wan_cache_latents.py`
   caches with; each item gives the cache file name musubi would write, its frame count, the
   bucket it resized the frames to and the clip's original size.
2. Each such file must be in --cache with one `latents_{F}x{H}x{W}_<dtype>` tensor of shape
   (16, F, H, W), F = 1 + (frames - 1) // 4, H and W an eighth of the bucket, and musubi's
   metadata; files in --cache that musubi would not write are listed too.
3. The cache files are linked into a scratch folder beside a text-encoder cache per clip
   (`{stem}_wan_te.safetensors`, written by musubi's `save_text_encoder_output_cache_wan`, as
   `wan_cache_text_encoder_outputs.py` would), and musubi's `VideoDataset.prepare_for_training`
   builds its batches from the folder; every batch is loaded (`BucketBatchManager[i]`, which
   stacks each bucket's latents).

Needs musubi's imports (torch, numpy, pillow, opencv-python-headless, av, safetensors) in the
Python that runs it, e.g. a scratch venv outside the repository; `--self-test` also needs the
`ffmpeg` CLI. Exits 1 when an item is missing or differs.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile


def musubi(path):
    sys.path.insert(0, os.path.join(path, "src"))
    import logging

    logging.disable(logging.WARNING)
    from musubi_tuner.dataset import image_video_dataset

    return image_video_dataset


def dataset(m, args, jsonl, cache):
    return m.VideoDataset(
        resolution=args.resolution,
        caption_extension=None,
        batch_size=args.batch_size,
        num_repeats=1,
        enable_bucket=True,
        bucket_no_upscale=False,
        frame_extraction=args.frame_extraction,
        frame_stride=args.frame_stride,
        frame_sample=args.frame_sample,
        target_frames=args.target_frames,
        max_frames=args.max_frames,
        source_fps=args.source_fps,
        video_jsonl_file=jsonl,
        cache_directory=cache,
        architecture="wan",
    )


def expected_items(m, args, jsonl, scratch):
    """musubi's items for the clips: {cache file name: ItemInfo}."""
    items = {}
    for _, batch in dataset(m, args, jsonl, scratch).retrieve_latent_cache_batches(num_workers=2):
        for item in batch:
            items[os.path.basename(item.latent_cache_path)] = item
    return items


def check_file(path, item):
    """What differs between the cache file and what musubi would write for `item`."""
    from safetensors import safe_open

    frames = item.frame_count
    height, width = item.content.shape[1:3]
    f, h, w = 1 + (frames - 1) // 4, height // 8, width // 8
    problems = []
    with safe_open(path, "pt") as file:
        keys = list(file.keys())
        metadata = file.metadata()
        latents = [k for k in keys if k.startswith(f"latents_{f}x{h}x{w}_")]
        if len(keys) != 1 or len(latents) != 1:
            problems.append(f"tensors {keys}, expected one latents_{f}x{h}x{w}_<dtype>")
        else:
            shape = tuple(file.get_slice(latents[0]).get_shape())
            if shape != (16, f, h, w):
                problems.append(f"shape {shape}, expected {(16, f, h, w)}")
    want = {
        "architecture": "wan",
        "width": str(item.original_size[0]),
        "height": str(item.original_size[1]),
        "format_version": "1.0.1",
        "frame_count": str(frames),
    }
    if metadata != want:
        problems.append(f"metadata {metadata}, expected {want}")
    return problems


def train_items(m, args, jsonl, cache, items):
    """prepare_for_training over the cache (plus a text-encoder cache per clip): items, batches."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        for path in glob.glob(os.path.join(cache, "*_wan.safetensors")):
            os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
        for stem in {name.rsplit("_", 3)[0] for name in items}:
            te = m.ItemInfo(stem, "a caption", (0, 0))
            te.text_encoder_output_cache_path = os.path.join(folder, f"{stem}_wan_te.safetensors")
            m.save_text_encoder_output_cache_wan(te, torch.zeros(4, 8))
        ds = dataset(m, args, jsonl, folder)
        ds.prepare_for_training()
        for i in range(len(ds.batch_manager)):
            batch = ds.batch_manager[i]
            assert batch["latents"].shape[1] == 16, batch["latents"].shape
        return ds.num_train_items, len(ds.batch_manager)


def check(m, args):
    from musubi_tuner.dataset.media_utils import glob_videos

    videos = glob_videos(args.clips)
    if not videos:
        sys.exit(f"no clips in {args.clips}")
    with tempfile.TemporaryDirectory() as scratch:
        jsonl = os.path.join(scratch, "clips.jsonl")
        with open(jsonl, "w") as f:
            for video in videos:
                f.write(json.dumps({"video_path": video, "caption": "a caption"}) + "\n")
        items = expected_items(m, args, jsonl, os.path.join(scratch, "cache"))
        missing, wrong = [], []
        for name, item in sorted(items.items()):
            path = os.path.join(args.cache, name)
            if not os.path.exists(path):
                missing.append(name)
                continue
            problems = check_file(path, item)
            if problems:
                wrong.append(f"{name}: {'; '.join(problems)}")
        present = {os.path.basename(p) for p in glob.glob(os.path.join(args.cache, "*_wan.safetensors"))}
        extra = sorted(present - set(items))
        found, batches = train_items(m, args, jsonl, args.cache, items)
    print(f"musubi's caching makes {len(items)} item(s) of {len(videos)} clip(s)")
    print(f"in {args.cache}: {len(items) - len(missing) - len(wrong)} match, {len(missing)} missing, "
          f"{len(wrong)} differ, {len(extra)} musubi would not write")
    for line in missing[:10]:
        print(f"  missing: {line}")
    for line in wrong[:10]:
        print(f"  differs: {line}")
    for line in extra[:10]:
        print(f"  extra: {line}")
    print(f"musubi's training (prepare_for_training) found {found} item(s) in {batches} batch(es), all loaded")
    ok = not missing and not wrong and not extra and found == len(items)
    print("OK: every item musubi would cache is there" if ok else "FAILED")
    return ok


def self_test(m, args):
    """Clips by ffmpeg, a cache by musubi's own save_latent_cache_wan (random latents), checked."""
    import torch

    root = tempfile.mkdtemp(prefix="musubi-wan-check-")
    args.clips, args.cache = os.path.join(root, "clips"), os.path.join(root, "cache")
    os.makedirs(args.clips)
    for name, size, frames in [("landscape", "96x64", 40), ("por_trait.v2", "64x96", 13), ("short", "80x80", 3)]:
        subprocess.run(
            ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={size}:rate=30",
             "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264",
             os.path.join(args.clips, f"{name}.mp4")],
            check=True,
        )
    args.resolution, args.target_frames = (80, 64), [1, 5, 9]
    with tempfile.TemporaryDirectory() as scratch:
        jsonl = os.path.join(scratch, "clips.jsonl")
        with open(jsonl, "w") as f:
            for video in sorted(glob.glob(os.path.join(args.clips, "*.mp4"))):
                f.write(json.dumps({"video_path": video, "caption": "a caption"}) + "\n")
        for item in expected_items(m, args, jsonl, args.cache).values():
            height, width = item.content.shape[1:3]
            latent = torch.randn(16, 1 + (item.frame_count - 1) // 4, height // 8, width // 8)
            m.save_latent_cache_wan(item, latent, None, None, None)
    print(f"self-test: clips and musubi's own cache in {root}")
    return check(m, args)


def fixture(m, out):
    """A Wan latent file by musubi's save_latent_cache_wan, for convert's unit test."""
    import torch

    latent = (torch.arange(16 * 2 * 2 * 3, dtype=torch.float32) * 0.25 - 10.0).reshape(16, 2, 2, 3)
    item = m.ItemInfo("clip_00004-005.mp4", "", (64, 48), (64, 48, 5), frame_count=5)
    item.latent_cache_path = out
    m.save_latent_cache_wan(item, latent, None, None, None)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--musubi", required=True, help="a musubi-tuner checkout")
    parser.add_argument("--clips", help="the folder of clips the shards were made from")
    parser.add_argument("--cache", help="the `convert --to musubi --arch wan` output")
    parser.add_argument("--resolution", default="832,480", help="musubi's resolution, W,H")
    parser.add_argument("--target-frames", default="1")
    parser.add_argument("--frame-extraction", default="head")
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--frame-sample", type=int, default=1)
    parser.add_argument("--max-frames", type=int, default=129)
    parser.add_argument("--source-fps", type=float)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--fixture", help="write the unit test's reference file here and stop")
    args = parser.parse_args()
    m = musubi(args.musubi)
    if args.fixture:
        fixture(m, args.fixture)
        return
    args.resolution = tuple(int(v) for v in args.resolution.split(","))
    args.target_frames = [int(v) for v in args.target_frames.split(",")]
    if args.self_test:
        ok = self_test(m, args)
    else:
        if not (args.clips and args.cache):
            parser.error("pass --clips and --cache (or --self-test)")
        ok = check(m, args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
