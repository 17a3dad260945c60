#!/usr/bin/env python3
"""End-to-end PyTorch peer for the device check: JPEG folder -> latents in Parquet, the way a
training repo would write it, on the same encoder graph as `vae-pipeline precompute`.

    python torch_e2e.py MODEL.onnx JPEG_DIR OUT_DIR --size 256 --batch-size 32 [--workers 16]
        [--dtype fp16|bf16|fp32] [--channels-last] [--range 0,1]

A torch DataLoader with `--workers` Pillow workers (decode, resize the short side, center crop,
uint8 CHW), pinned memory and non_blocking copies; the encoder is torch_peer.py's interpreter of
the fp32 ONNX graph with cudnn.benchmark; latents go back to the host as float16 and are written
with pyarrow (zstd), one file per 64 batches. Prints one JSON line with images/s.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from torch_peer import OnnxModule


class Folder(torch.utils.data.Dataset):
    def __init__(self, root, size):
        self.files = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = Image.open(self.files[i]).convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), os.path.basename(self.files[i])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--range", default="0,1", help="the encoder's input range, as the card's input_range")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    lo, hi = (float(v) for v in args.range.split(","))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    module = OnnxModule(onnx.load(args.model)).eval().to(device="cuda", dtype=dtype)
    loader = torch.utils.data.DataLoader(
        Folder(args.images, args.size), batch_size=args.batch_size, num_workers=args.workers,
        pin_memory=True, persistent_workers=False, prefetch_factor=4,
    )
    os.makedirs(args.out, exist_ok=True)
    keys, latents, part, done = [], [], 0, 0

    def flush():
        nonlocal keys, latents, part
        if not keys:
            return
        z = np.concatenate(latents)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), int(np.prod(z.shape[1:])))
        pq.write_table(pa.table({"key": keys, "latent": flat}), f"{args.out}/part-{part:05d}.parquet", compression="zstd")
        keys, latents, part = [], [], part + 1

    start = time.perf_counter()
    with torch.no_grad():
        for pixels, names in loader:
            x = pixels.to("cuda", non_blocking=True).to(dtype).contiguous(memory_format=memory)
            x = x * ((hi - lo) / 255.0) + lo
            z = module(x).to(torch.float16).cpu().numpy()
            keys.extend(names)
            latents.append(z)
            done += len(names)
            if len(latents) == 64:
                flush()
    flush()
    seconds = time.perf_counter() - start
    print(json.dumps({"peer": "torch-e2e", "dtype": args.dtype, "channels_last": args.channels_last,
                      "workers": args.workers, "size": args.size, "batch_size": args.batch_size,
                      "images": done, "seconds": seconds, "images_per_second": done / seconds}))


if __name__ == "__main__":
    main()
