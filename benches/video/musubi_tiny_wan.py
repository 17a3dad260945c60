"""musubi-tuner's Wan latent caching with the tiny Wan 2.1 VAE of ../shared/models/families/wan2.1.

Runs in the scratch venv that holds musubi-tuner (see benches/video_bench.py for the setup). It
uses musubi's own code (`musubi_tuner.wan_cache_latents`, `musubi_tuner.wan.modules.vae`) and
changes only what the tiny model needs, at run time, without editing musubi's files:

- `_video_vae` hard-codes the real VAE's widths (dim 96, 2 resnets per block): the wrapper passes
  the diffusers config's `base_dim`, `dim_mult`, `num_res_blocks`, `attn_scales` and
  `temperal_downsample` through the keyword arguments `_video_vae` already accepts;
- `WanVAE.__init__` hard-codes the real VAE's per-channel latent mean/std: the wrapper replaces
  them with the config's `latents_mean` / `latents_std`, so the cache holds what diffusers'
  `(mean - latents_mean) / latents_std` gives for this model;
- `musubi_tuner.wan.modules.t5` calls `torch.cuda.current_device()` in a default argument at
  import time, which raises on a machine without an NVIDIA driver: it answers "cpu" while
  musubi's modules are imported.

The weights are the diffusers file renamed to the original Wan names musubi loads (`convert`),
and `cache` wraps musubi's `encode_datasets` only to note when it starts and ends.

Subcommands:
  convert --family DIR --out FILE   diffusers weights -> original Wan names (what musubi loads)
  cache --family DIR -- ARGS...     musubi's wan_cache_latents.py with ARGS; prints BENCH_PEER json
  check --family DIR --vae FILE --work DIR   musubi vs the diffusers goldens (golden_video.npz)
  pyav-decode CLIP...               PyAV decode of every frame to RGB24; prints BENCH_PYAV json
"""

import argparse
import json
import os
import subprocess
import sys
import time

T_START = time.time()

import numpy as np  # noqa: E402


def import_musubi():
    """musubi's Wan modules, importable on a CPU-only machine (see the module doc)."""
    import torch

    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        import musubi_tuner.cache_latents as cache_latents
        import musubi_tuner.wan.modules.vae as wan_vae
        import musubi_tuner.wan_cache_latents as wan_cache_latents
    finally:
        torch.cuda.current_device = current_device
    return wan_vae, wan_cache_latents, cache_latents


def family_config(family):
    with open(os.path.join(family, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("is_residual") or cfg.get("patch_size"):
        sys.exit(f"{family}: musubi's WanVAE is Wan 2.1's layout; this config is Wan 2.2's (is_residual/patch_size)")
    return cfg


def musubi_kwargs(cfg):
    """The constructor arguments of musubi's WanVAE_ for the diffusers config."""
    return dict(
        dim=cfg["base_dim"],
        dim_mult=list(cfg["dim_mult"]),
        num_res_blocks=cfg["num_res_blocks"],
        attn_scales=list(cfg["attn_scales"]),
        temperal_downsample=list(cfg["temperal_downsample"]),
        dropout=0.0,
    )


def patch_musubi(wan_vae, cfg):
    """Make musubi's WanVAE build and normalize the tiny model (see the module doc)."""
    import torch

    video_vae = wan_vae._video_vae
    kwargs = musubi_kwargs(cfg)

    def tiny_video_vae(pretrained_path=None, z_dim=None, device="cpu", **extra):
        if z_dim != cfg["z_dim"]:
            raise SystemExit(f"musubi asked for z_dim {z_dim}, the model has {cfg['z_dim']}")
        model = video_vae(pretrained_path=pretrained_path, z_dim=z_dim, device=device, **{**kwargs, **extra})
        # musubi loads safetensors with strict=False: a misnamed tensor would stay on the meta device.
        missing = [n for n, p in model.state_dict().items() if p.is_meta]
        if missing:
            raise SystemExit(f"{pretrained_path}: {len(missing)} tensors musubi expects are missing, e.g. {missing[:3]}")
        return model

    wan_vae._video_vae = tiny_video_vae
    init = wan_vae.WanVAE.__init__

    def tiny_init(self, *args, **kw):
        init(self, *args, **kw)
        self.mean = torch.tensor(cfg["latents_mean"], dtype=self.dtype, device=self.device)
        self.std = torch.tensor(cfg["latents_std"], dtype=self.dtype, device=self.device)
        self.scale = [self.mean, 1.0 / self.std]

    wan_vae.WanVAE.__init__ = tiny_init


def wan_original_to_diffusers(name, decoder_group):
    """Python copy of src/export/checkpoint.rs `wan_original_to_diffusers` (diffusers'
    scripts/convert_wan_to_diffusers.py `convert_vae` table, any block count)."""
    prefixes = [
        ("conv1.", "quant_conv."),
        ("conv2.", "post_quant_conv."),
        ("encoder.conv1.", "encoder.conv_in."),
        ("decoder.conv1.", "decoder.conv_in."),
        ("encoder.head.0.", "encoder.norm_out."),
        ("encoder.head.2.", "encoder.conv_out."),
        ("decoder.head.0.", "decoder.norm_out."),
        ("decoder.head.2.", "decoder.conv_out."),
    ]
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old) :]

    def residual(rest):
        for old, new in [
            ("residual.0.", "norm1."),
            ("residual.2.", "conv1."),
            ("residual.3.", "norm2."),
            ("residual.6.", "conv2."),
            ("shortcut.", "conv_shortcut."),
        ]:
            if rest.startswith(old):
                return new + rest[len(old) :]
        return rest

    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "middle":
        side, i, rest = parts[0], parts[2], ".".join(parts[3:])
        if i == "1":
            return f"{side}.mid_block.attentions.0.{rest}"
        return f"{side}.mid_block.resnets.{0 if i == '0' else 1}.{residual(rest)}"
    if parts[:2] == ["encoder", "downsamples"]:
        return f"encoder.down_blocks.{parts[2]}.{residual('.'.join(parts[3:]))}"
    if parts[:2] == ["decoder", "upsamples"]:
        k, rest = int(parts[2]), ".".join(parts[3:])
        block, entry = divmod(k, decoder_group)
        if entry + 1 < decoder_group:
            return f"decoder.up_blocks.{block}.resnets.{entry}.{residual(rest)}"
        return f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
    return name


def convert(family, out):
    """The diffusers checkpoint renamed to the original Wan names musubi's WanVAE_ loads; every
    tensor of musubi's model must come from exactly one diffusers tensor of the same shape."""
    import torch
    from safetensors.numpy import load_file, save_file

    wan_vae, _, _ = import_musubi()
    cfg = family_config(family)
    with torch.device("meta"):
        model = wan_vae.WanVAE_(z_dim=cfg["z_dim"], **musubi_kwargs(cfg))
    src = load_file(os.path.join(family, "diffusion_pytorch_model.safetensors"))
    group = cfg["num_res_blocks"] + 2  # resnets per decoder block (num_res_blocks + 1) + its upsampler
    dst, used = {}, set()
    for name, param in model.state_dict().items():
        d = wan_original_to_diffusers(name, group)
        if d not in src:
            sys.exit(f"convert: musubi's {name} maps to {d}, which {family} lacks")
        if tuple(src[d].shape) != tuple(param.shape):
            sys.exit(f"convert: {name} {tuple(param.shape)} vs diffusers {d} {src[d].shape}")
        dst[name] = np.ascontiguousarray(src[d])
        used.add(d)
    unused = sorted(set(src) - used)
    if unused:
        sys.exit(f"convert: diffusers tensors musubi has no place for: {unused[:5]}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(dst, out)
    print(f"convert: {len(dst)} tensors -> {out}")


def cache(family, args):
    """musubi's wan_cache_latents main() with ARGS, timed: BENCH_PEER {...} on stdout."""
    wan_vae, wan_cache_latents, cache_latents = import_musubi()
    patch_musubi(wan_vae, family_config(family))
    marks = {"process_start": T_START, "imported": time.time()}
    encode_datasets = cache_latents.encode_datasets

    def timed_encode_datasets(*a, **kw):
        marks["encode_start"] = time.time()  # the VAE is loaded and the dataset configured
        encode_datasets(*a, **kw)
        marks["encode_end"] = time.time()

    cache_latents.encode_datasets = timed_encode_datasets
    sys.argv = ["wan_cache_latents.py", *args]
    wan_cache_latents.main()
    marks["end"] = time.time()
    print("BENCH_PEER " + json.dumps(marks), flush=True)


def write_lossless(frames_u8, path):
    """[T, H, W, 3] uint8 -> FFV1 RGB Matroska (decodes back to the same bytes)."""
    t, h, w, _ = frames_u8.shape
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "16",
         "-i", "-", "-c:v", "ffv1", "-pix_fmt", "gbrp", path],
        input=frames_u8.tobytes(), check=True,
    )


def check(family, vae_path, work):
    """musubi against diffusers' goldens, two ways:
    model: musubi's WanVAE.encode on the golden input tensor; the raw mean vs `encoder_output`
           (first z_dim channels) and the normalized latent vs `latent_normalized`;
    pipeline: the golden clips written losslessly (FFV1) and cached by wan_cache_latents.py itself
           (PyAV decode, dataset, bucket, encode, save); the cached tensor vs `latent_normalized`.
    Prints the worst relative error |a-b| / max|b| per case; exits 1 above 1e-4."""
    import torch
    from safetensors.torch import load_file

    wan_vae, wan_cache_latents, _ = import_musubi()
    cfg = family_config(family)
    patch_musubi(wan_vae, cfg)
    golden = np.load(os.path.join(family, "golden_video.npz"))
    cases = sorted({k.rsplit("/", 1)[0] for k in golden.files})
    vae = wan_vae.WanVAE(vae_path=vae_path, device=torch.device("cpu"), dtype=torch.float32)
    z = cfg["z_dim"]
    worst = 0.0

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    os.makedirs(work, exist_ok=True)
    print(f"{'case':<34} {'model mean':>11} {'model norm':>11} {'pipeline':>11}")
    for case in cases:
        x = torch.from_numpy(golden[f"{case}/input"][0]) * 2 - 1  # [C, T, H, W]
        with torch.no_grad():
            raw = vae.model.encode(x.unsqueeze(0), [0.0, 1.0])[0].numpy()
            norm = vae.encode([x])[0].numpy()
        e_raw = rel(raw, golden[f"{case}/encoder_output"][0, :z])
        e_norm = rel(norm, golden[f"{case}/latent_normalized"][0])

        # the same clip through musubi's whole caching script
        frames = np.round(golden[f"{case}/input"][0].transpose(1, 2, 3, 0) * 255).astype(np.uint8)
        t, h, w, _ = frames.shape
        d = os.path.join(work, case)
        os.makedirs(os.path.join(d, "cache"), exist_ok=True)
        clip = os.path.join(d, f"{case}.mkv")
        write_lossless(frames, clip)
        with open(os.path.join(d, "clips.jsonl"), "w") as f:
            f.write(json.dumps({"video_path": clip, "caption": "x"}) + "\n")
        toml = os.path.join(d, "dataset.toml")
        with open(toml, "w") as f:
            f.write(dataset_toml(w, h, t, os.path.join(d, "clips.jsonl"), os.path.join(d, "cache")))
        sys.argv = ["wan_cache_latents.py", "--dataset_config", toml, "--vae", vae_path, "--vae_dtype", "float32",
                    "--device", "cpu", "--num_workers", "1"]
        wan_cache_latents.main()
        files = [p for p in os.listdir(os.path.join(d, "cache")) if p.endswith("_wan.safetensors")]
        if len(files) != 1:
            sys.exit(f"check: {case}: musubi wrote {files}, expected one cache file")
        cached = load_file(os.path.join(d, "cache", files[0]))
        (tensor,) = [v for k, v in cached.items() if k.startswith("latents_")]
        e_pipe = rel(tensor.float().numpy(), golden[f"{case}/latent_normalized"][0])
        worst = max(worst, e_raw, e_norm, e_pipe)
        print(f"{case:<34} {e_raw:>11.2e} {e_norm:>11.2e} {e_pipe:>11.2e}", flush=True)
    print(f"worst relative error {worst:.2e} (limit 1e-4)")
    sys.exit(0 if worst <= 1e-4 else 1)


def dataset_toml(width, height, frames, jsonl, cache_dir):
    """musubi dataset config: one bucket equal to the clip size (no resize), the first `frames`."""
    return (
        "[general]\n"
        f"resolution = [{width}, {height}]\n"
        "batch_size = 1\n"
        "enable_bucket = false\n\n"
        "[[datasets]]\n"
        f"video_jsonl_file = {json.dumps(jsonl)}\n"
        f"cache_directory = {json.dumps(cache_dir)}\n"
        f"target_frames = [{frames}]\n"
        'frame_extraction = "head"\n'
    )


def pyav_decode(clips):
    """Decode every frame of each clip to an RGB24 array with PyAV (musubi's decoder)."""
    import av

    t0 = time.time()
    frames = 0
    for clip in clips:
        with av.open(clip) as container:
            for frame in container.decode(video=0):
                frame.to_ndarray(format="rgb24")
                frames += 1
    print("BENCH_PYAV " + json.dumps({"clips": len(clips), "frames": frames, "seconds": time.time() - t0}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--family", required=True)
    c.add_argument("--out", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--family", required=True)
    c.add_argument("args", nargs=argparse.REMAINDER)
    c = sub.add_parser("check")
    c.add_argument("--family", required=True)
    c.add_argument("--vae", required=True)
    c.add_argument("--work", required=True)
    c = sub.add_parser("pyav-decode")
    c.add_argument("clips", nargs="+")
    a = p.parse_args()
    if a.cmd == "convert":
        convert(a.family, a.out)
    elif a.cmd == "cache":
        cache(a.family, [x for x in a.args if x != "--"])
    elif a.cmd == "check":
        check(a.family, a.vae, a.work)
    else:
        pyav_decode(a.clips)


if __name__ == "__main__":
    main()
