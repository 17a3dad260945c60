#!/usr/bin/env python3
"""Random-weight AutoencoderKL checkpoints with diffusers' tensor names and shapes, for timing
SD-class encoders without downloading them (numpy and safetensors only; no diffusers, no torch).

    python benches/gpu/vae_checkpoint.py sdxl OUT/      # SDXL VAE config, random weights
    python benches/gpu/vae_checkpoint.py flux2 OUT/     # FLUX.2 VAE (AutoencoderKLFlux2)
    python benches/gpu/vae_checkpoint.py CONFIG.json OUT/
    vae-pipeline export --checkpoint OUT/ --out ONNX/ [--dtype f16]

OUT/ gets `config.json` and `diffusion_pytorch_model.safetensors`. The names follow diffusers'
`Encoder`/`Decoder` (resnets, down/up samplers, the mid block's attention with to_q/to_k/to_v/
to_out.0, quant convs when the config uses them; FLUX.2's `bn` running statistics). Weights are
drawn N(0, 1/fan_in) and norms start at identity, so activations stay in fp16's range. The
configs below are the published ones' architecture fields (SDXL `madebyollin/sdxl-vae-fp16-fix`,
FLUX.2 `black-forest-labs/FLUX.2-dev` vae/config.json), as far as the encoder's cost goes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

BASE = {
    "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "force_upcast": False,
    "latents_mean": None,
    "latents_std": None,
}
PRESETS = {
    "sdxl": {**BASE, "_class_name": "AutoencoderKL", "latent_channels": 4, "sample_size": 1024,
             "scaling_factor": 0.13025, "shift_factor": None},
    "flux2": {**BASE, "_class_name": "AutoencoderKLFlux2", "latent_channels": 32, "sample_size": 1024,
              "scaling_factor": 1.0, "shift_factor": 0.0, "batch_norm_eps": 1e-4,
              "batch_norm_momentum": 0.1, "patch_size": [2, 2]},
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, name -> shape, in diffusers' naming."""
    out: dict[str, tuple[int, ...]] = {}
    blocks, per = cfg["block_out_channels"], cfg["layers_per_block"]
    latent = cfg["latent_channels"]

    def conv(name, cout, cin, k=3):
        out[f"{name}.weight"] = (cout, cin, k, k)
        out[f"{name}.bias"] = (cout,)

    def norm(name, c):
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c)
        if cfg.get("mid_block_add_attention", True):
            a = f"{name}.attentions.0"
            norm(f"{a}.group_norm", c)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                out[f"{a}.{proj}.weight"] = (c, c)
                out[f"{a}.{proj}.bias"] = (c,)
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", blocks[0], cfg["in_channels"])
    cin = blocks[0]
    for i, cout in enumerate(blocks):
        for j in range(per):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < len(blocks) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout)
        cin = cout
    mid("encoder.mid_block", blocks[-1])
    norm("encoder.conv_norm_out", blocks[-1])
    conv("encoder.conv_out", 2 * latent, blocks[-1])
    if cfg.get("use_quant_conv", True):
        conv("quant_conv", 2 * latent, 2 * latent, 1)
    if cfg.get("use_post_quant_conv", True):
        conv("post_quant_conv", latent, latent, 1)
    rev = list(reversed(blocks))
    conv("decoder.conv_in", rev[0], latent)
    mid("decoder.mid_block", rev[0])
    cin = rev[0]
    for i, cout in enumerate(rev):
        for j in range(per + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout)
        cin = cout
    norm("decoder.conv_norm_out", blocks[0])
    conv("decoder.conv_out", cfg["out_channels"], blocks[0])
    if cfg.get("_class_name") == "AutoencoderKLFlux2":
        p = cfg.get("patch_size", [2, 2])
        out["bn.running_mean"] = (latent * p[0] * p[1],)
        out["bn.running_var"] = (latent * p[0] * p[1],)
        out["bn.num_batches_tracked"] = ()
    return out


def state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in shapes(cfg).items():
        if name == "bn.num_batches_tracked":
            state[name] = np.array(1000, np.int64)
        elif name == "bn.running_var":
            state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif name == "bn.running_mean":
            state[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
        elif name.endswith(".bias"):
            state[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1:  # a norm's scale
            state[name] = np.ones(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[name] = rng.normal(0.0, fan_in**-0.5, shape).astype(np.float32)
    return state


def write(cfg: dict, out: Path, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state_dict(cfg, seed), str(out / "diffusion_pytorch_model.safetensors"))
    return out


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    which, out = sys.argv[1], Path(sys.argv[2])
    cfg = PRESETS[which] if which in PRESETS else json.loads(Path(which).read_text())
    write(cfg, out)
    print(f"{out}: {cfg['_class_name']} with {len(shapes(cfg))} tensors")


if __name__ == "__main__":
    main()
