"""Independent pure-Python reference for vae-pipeline's bucket rules and resize geometry.

Written from the contract (issue 6), not from the Rust code. All arithmetic is exact (integers and
`fractions.Fraction`), so a difference from the binary is never float noise on our side:

- bucket lists: generated from (R, S, A) kohya-style, the SDXL list, or a `WxH` text file;
- bucket choice: closest log aspect ratio, ties by larger area then smaller W; `no_upscale`;
- geometry of each resize policy: (rw, rh, crop_left, crop_top, width, height), where rw x rh is
  the size the image is resized to and crop_left/crop_top the offset of the W x H window in it
  (negative = padding, for `pad`).

Generation rule (contract): for every width w = S, 2S, ...: h = floor(R*R / w / S) * S; keep (w, h)
when h >= S and max(w, h) / min(w, h) <= A; plus (R', R') with R' = floor(R / S) * S; de-duplicate,
sort by (w, h). This is the per-width rule of kohya-ss sd-scripts' `make_bucket_resolutions`
(library/model_util.py, github.com/kohya-ss/sd-scripts, commit 036907ee976ed0dc6c0cc32ffd24da9860d7fb3e):

    def make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
        max_area = max_width * max_height
        width = int(math.sqrt(max_area) // divisible) * divisible; resos.add((width, width))
        width = min_size
        while width <= max_size:
            height = min(max_size, int((max_area // width) // divisible) * divisible)
            if height >= min_size: resos.add((width, height)); resos.add((height, width))
            width += divisible
        return sorted(resos)

`kohya_make_bucket_resolutions` below restates it (same arithmetic) so the tests can compare the
two. Two differences are by design of the contract: kohya bounds the sides by [min_size, max_size]
where the contract bounds the aspect ratio by A, and kohya also adds every transpose (h, w) while
the contract keeps only the per-width pairs. For R=1024, S=64, A=4 the contract list plus its
transposes is exactly kohya's list with min_size=512, max_size=2048 (see test_buckets.py); the
contract list alone is not closed under transposition (it has 1280x768 but not 768x1280).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Optional, Sequence

Bucket = tuple[int, int]  # (W, H)

# The SDXL multi-aspect buckets, (W, H), sorted by (W, H): the 40 resolutions of the SDXL paper's
# multi-aspect table (Podell et al. 2023, arXiv:2307.01952, App. I: from 512x2048 to 2048x512 in
# 64-pixel steps, ~1024^2 pixels each) and 1344x704, which Stability's own sampling code lists
# (generative-models, scripts/demo/sampling.py SD_XL_BASE_RATIOS, "1.91": (1344, 704)) and whose
# transpose 704x1344 the paper's table has. With it the list is closed under transposition:
# portrait and landscape images get mirror-image buckets. It contains the nine "official"
# resolutions 1024x1024, 1152x896, 896x1152, 1216x832, 832x1216, 1344x768, 768x1344, 1536x640,
# 640x1536. 41 entries.
SDXL_BUCKETS: tuple[Bucket, ...] = (
    (512, 1856), (512, 1920), (512, 1984), (512, 2048),
    (576, 1664), (576, 1728), (576, 1792),
    (640, 1536), (640, 1600),
    (704, 1344), (704, 1408), (704, 1472),
    (768, 1280), (768, 1344),
    (832, 1152), (832, 1216),
    (896, 1088), (896, 1152),
    (960, 1024), (960, 1088),
    (1024, 960), (1024, 1024),
    (1088, 896), (1088, 960),
    (1152, 832), (1152, 896),
    (1216, 832),
    (1280, 768),
    (1344, 704), (1344, 768),
    (1408, 704),
    (1472, 704),
    (1536, 640),
    (1600, 640),
    (1664, 576),
    (1728, 576),
    (1792, 576),
    (1856, 512),
    (1920, 512),
    (1984, 512),
    (2048, 512),
)
SDXL_OFFICIAL_NINE: tuple[Bucket, ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
)


# ------------------------------------------------------------------------------------------ lists
def _fraction(x: float | str | Fraction) -> Fraction:
    """Exact value of a max-aspect given as 4, 4.0, "2.5" or a Fraction (decimal, not binary)."""
    if isinstance(x, Fraction):
        return x
    return Fraction(str(x))


def generate_buckets(res: int, step: int = 64, max_aspect: float | str | Fraction = 4.0) -> list[Bucket]:
    """The generated bucket list for --bucket-res R, --bucket-step S, --max-aspect A: kohya's rule,
    each (w, h) kept together with its transpose (h, w)."""
    if res <= 0 or step <= 0:
        raise ValueError(f"bucket-res and bucket-step must be positive (got {res}, {step})")
    a = _fraction(max_aspect)
    out: set[Bucket] = set()
    area = res * res
    w = step
    while True:
        h = (area // (w * step)) * step  # floor(R*R / w / S) * S, exactly
        if h < step:
            break  # h only shrinks as w grows
        if max(w, h) <= a * min(w, h):
            out.add((w, h))
            out.add((h, w))
        w += step
    side = (res // step) * step
    if side >= step:
        out.add((side, side))
    return sorted(out)


def kohya_make_bucket_resolutions(max_reso: Bucket, min_size: int = 256, max_size: int = 1024,
                                  divisible: int = 64) -> list[Bucket]:
    """kohya-ss sd-scripts `make_bucket_resolutions` (library/model_util.py), same arithmetic."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos: set[Bucket] = set()
    width = int(math.isqrt(max_area) // divisible) * divisible  # int(math.sqrt(a) // d) * d, exact
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def parse_bucket_text(text: str) -> list[Bucket]:
    """A --buckets FILE: one `WxH` per line; `#` starts a comment; blank lines ignored.

    De-duplicated and sorted by (W, H) like every other list.
    """
    out: set[Bucket] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"line {n}: {raw!r} is not WxH")
        w, h = (int(p) for p in parts)
        if w <= 0 or h <= 0:
            raise ValueError(f"line {n}: {raw!r} has a zero side")
        out.add((w, h))
    return sorted(out)


def bucket_list(spec: str | None = None, *, res: int | None = None, size: int = 256, step: int = 64,
                max_aspect: float = 4.0, file_text: str | None = None) -> list[Bucket]:
    """The list a run uses: `spec` = "sdxl", or None/"generated" (from res, default = size), or
    "file" with `file_text`."""
    if spec == "sdxl":
        return sorted(SDXL_BUCKETS)
    if spec == "file":
        assert file_text is not None
        return parse_bucket_text(file_text)
    return generate_buckets(res if res is not None else size, step, max_aspect)


# --------------------------------------------------------------------------------------- choice
def aspect_distance(w: int, h: int, bw: int, bh: int) -> Fraction:
    """exp(|ln(w/h) - ln(bw/bh)|) as an exact fraction (monotone in the contract's distance)."""
    r = Fraction(w * bh, h * bw)
    return r if r >= 1 else 1 / r


def closest_bucket(w: int, h: int, buckets: Iterable[Bucket]) -> Optional[Bucket]:
    """Bucket minimizing |ln(w/h) - ln(W/H)|; ties: larger area, then smaller W."""
    best = None
    best_key = None
    for bw, bh in buckets:
        key = (aspect_distance(w, h, bw, bh), -(bw * bh), bw)
        if best_key is None or key < best_key:
            best, best_key = (bw, bh), key
    return best


TOO_SMALL = "too_small"


def choose_bucket(w: int, h: int, buckets: Sequence[Bucket], *, no_upscale: bool = False,
                  step: int = 64) -> Bucket | str:
    """The bucket for an upright w x h image, or TOO_SMALL when --no-upscale refuses it."""
    if w <= 0 or h <= 0:
        raise ValueError("image sides must be positive")
    if not no_upscale:
        b = closest_bucket(w, h, buckets)
        if b is None:
            raise ValueError("empty bucket list")
        return b
    fitting = [(bw, bh) for bw, bh in buckets if bw <= w and bh <= h]
    if fitting:
        return closest_bucket(w, h, fitting)
    own = ((w // step) * step, (h // step) * step)
    if own[0] >= step and own[1] >= step:
        return own
    return TOO_SMALL


def histogram(assignments: Iterable[Bucket | str]) -> dict[Bucket, int]:
    out: dict[Bucket, int] = {}
    for b in assignments:
        if b != TOO_SMALL:
            out[b] = out.get(b, 0) + 1
    return out


# ------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    rw: int  # resized width (for pad: the size of the picture pasted on the canvas)
    rh: int
    crop_left: int  # offset of the W x H window in the resized image; negative = padding
    crop_top: int
    width: int  # W, the size fed to the encoder
    height: int

    @property
    def max_left(self) -> int:
        return self.rw - self.width

    @property
    def max_top(self) -> int:
        return self.rh - self.height


def round_half_up(num: int, den: int) -> int:
    """floor(num/den + 1/2) for positive integers, exactly."""
    return (2 * num + den) // (2 * den)


def cover_size(w: int, h: int, W: int, H: int) -> tuple[int, int]:
    """Resized size for center-crop/random-crop/bucket: scale = max(W/w, H/h), rounded half up,
    each side at least the target's."""
    if W * h >= H * w:  # W/w >= H/h: width decides
        rw, rh = W, round_half_up(h * W, w)
    else:
        rw, rh = round_half_up(w * H, h), H
    return max(rw, W), max(rh, H)


def fit_size(w: int, h: int, W: int, H: int) -> tuple[int, int]:
    """Resized size for pad: scale = min(W/w, H/h), rounded half up, each side in [1, target]."""
    if W * h <= H * w:  # W/w <= H/h: width decides
        rw, rh = W, round_half_up(h * W, w)
    else:
        rw, rh = round_half_up(w * H, h), H
    return min(max(rw, 1), W), min(max(rh, 1), H)


def geometry(policy: str, w: int, h: int, W: int, H: int) -> Geometry:
    """Deterministic geometry of `policy` for a w x h image and a W x H target.

    `random-crop` returns the centre offsets; its real offsets are anywhere in
    [0, max_left] x [0, max_top] (same rw, rh)."""
    if policy in ("center-crop", "bucket", "random-crop"):
        rw, rh = cover_size(w, h, W, H)
        return Geometry(rw, rh, (rw - W) // 2, (rh - H) // 2, W, H)
    if policy == "stretch":
        return Geometry(W, H, 0, 0, W, H)
    if policy == "pad":
        rw, rh = fit_size(w, h, W, H)
        return Geometry(rw, rh, -((W - rw) // 2), -((H - rh) // 2), W, H)
    raise ValueError(f"unknown resize policy {policy!r}")


def mirrored_crop_left(g: Geometry) -> int:
    """crop_left of the horizontally mirrored sample (what `latent_flip` encodes): the window
    [left, left+W) of the resized width rw mirrors to [rw-left-W, rw-left). Also holds for pad
    (negative offsets)."""
    return g.rw - g.width - g.crop_left
