#!/usr/bin/env python3
"""Pillow reference for vae-pipeline's center-crop resize policy.

    python pillow_center_crop.py IMAGE SIZE OUT.npy

Writes a uint8 (SIZE, SIZE, 3) HWC array (np.save) computed with Pillow:
  1. Image.open, ImageOps.exif_transpose (EXIF orientation applied);
  2. to RGB: gray replicated; images with alpha are composited on white first;
  3. resize so the shorter side is SIZE with Image.LANCZOS (antialiased Lanczos3), the long side
     becoming (long*SIZE + short//2)//short;
  4. crop SIZE x SIZE at offset floor((new_long - SIZE)/2) on the long axis (0 on the short axis).
Prints "crop_left crop_top resized_w resized_h orig_w orig_h" on stdout.
"""
from __future__ import annotations

import sys

import numpy as np
from PIL import Image, ImageOps


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with gray replicated and alpha (if any) composited on white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def center_crop(path, size: int):
    """Return (uint8 HWC array, dict of geometry) for one image."""
    with Image.open(path) as im:
        im.load()
        img = ImageOps.exif_transpose(im)
    img = to_rgb(img)
    w, h = img.size
    if w <= h:
        nw, nh = size, (h * size + w // 2) // w
    else:
        nw, nh = (w * size + h // 2) // h, size
    left, top = (nw - size) // 2, (nh - size) // 2
    resized = img.resize((nw, nh), Image.LANCZOS)
    out = resized.crop((left, top, left + size, top + size))
    arr = np.asarray(out, dtype=np.uint8)
    assert arr.shape == (size, size, 3), arr.shape
    geom = dict(crop_left=left, crop_top=top, resized_w=nw, resized_h=nh, orig_w=w, orig_h=h)
    return arr, geom


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, size, out = argv[0], int(argv[1]), argv[2]
    arr, g = center_crop(path, size)
    np.save(out, np.ascontiguousarray(arr))
    print(g["crop_left"], g["crop_top"], g["resized_w"], g["resized_h"], g["orig_w"], g["orig_h"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
