"""A full-size random-weight diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)
for timing `vae-pipeline export` on the real shapes, without torch or a download.

    python docs/random_checkpoint.py FAMILY OUT_DIR

FAMILY is qwen-image, wan2.2, sana (dc-ae-f32c32-sana-1.0) or hunyuanimage-2.1; the configs are
the published ones (diffusers' conversion scripts). Key names and shapes follow diffusers' module
definitions (DC-AE: the Sana layout, RMS norms only); weights ~ N(0, 1/fan_in), norms 1,
biases 0. They say nothing about image quality.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

CONFIGS = {
    "qwen-image": {
        "_class_name": "AutoencoderKLQwenImage", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
        "input_channels": 3, "latents_mean": WAN21_MEAN, "latents_std": WAN21_STD,
    },
    "wan2.2": {
        "_class_name": "AutoencoderKLWan", "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48,
        "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
        "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12,
        "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
        "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48,
    },
    "sana": {
        "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
        "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "downsample_block_type": "conv", "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    },
    "hunyuanimage-2.1": {
        "_class_name": "AutoencoderKLHunyuanImage", "in_channels": 3, "out_channels": 3,
        "latent_channels": 64, "block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "layers_per_block": 2, "spatial_compression_ratio": 32, "sample_size": 384,
        "scaling_factor": 0.75289, "downsample_match_channel": True, "upsample_match_channel": True,
    },
}


class State(dict):
    """name -> shape, with the few layer kinds the VAEs are made of."""

    def conv(self, p, cin, cout, k, bias=True, groups=1, dims=2):
        self[f"{p}.weight"] = (cout, cin // groups) + (k,) * dims
        if bias:
            self[f"{p}.bias"] = (cout,)

    def norm(self, p, c, bias=True):
        self[f"{p}.weight"] = (c,)
        if bias:
            self[f"{p}.bias"] = (c,)


def wan(cfg) -> State:
    s = State()
    conv3 = lambda p, cin, cout, k: s.conv(p, cin, cout, k, dims=3)  # noqa: E731

    def rms(p, c, image=False):
        s[f"{p}.gamma"] = (c, 1, 1) if image else (c, 1, 1, 1)

    def res(p, cin, cout):
        rms(f"{p}.norm1", cin)
        conv3(f"{p}.conv1", cin, cout, 3)
        rms(f"{p}.norm2", cout)
        conv3(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv3(f"{p}.conv_shortcut", cin, cout, 1)

    def mid(p, c):
        res(f"{p}.resnets.0", c, c)
        rms(f"{p}.attentions.0.norm", c, image=True)
        s.conv(f"{p}.attentions.0.to_qkv", c, 3 * c, 1)
        s.conv(f"{p}.attentions.0.proj", c, c, 1)
        res(f"{p}.resnets.1", c, c)

    n, z, residual = len(cfg["dim_mult"]), cfg["z_dim"], cfg.get("is_residual", False)
    channels = cfg.get("in_channels", cfg.get("input_channels", 3))
    dims = [cfg["base_dim"] * u for u in [1] + cfg["dim_mult"]]
    conv3("encoder.conv_in", channels, dims[0], 3)
    flat = 0
    for i in range(n):
        cin, cout = dims[i], dims[i + 1]
        temporal = i != n - 1 and cfg["temperal_downsample"][i]
        for j in range(cfg["num_res_blocks"]):
            res(f"encoder.down_blocks.{i}.resnets.{j}" if residual else f"encoder.down_blocks.{flat}", cin, cout)
            cin, flat = cout, flat + 1
        if i != n - 1:
            p = f"encoder.down_blocks.{i}.downsampler" if residual else f"encoder.down_blocks.{flat}"
            s.conv(f"{p}.resample.1", cout, cout, 3)
            if temporal:
                s[f"{p}.time_conv.weight"], s[f"{p}.time_conv.bias"] = (cout, cout, 3, 1, 1), (cout,)
            flat += 1
    mid("encoder.mid_block", dims[-1])
    rms("encoder.norm_out", dims[-1])
    conv3("encoder.conv_out", dims[-1], 2 * z, 3)
    conv3("quant_conv", 2 * z, 2 * z, 1)
    conv3("post_quant_conv", z, z, 1)
    base = cfg.get("decoder_base_dim") or cfg["base_dim"]
    dims = [base * u for u in [cfg["dim_mult"][-1]] + cfg["dim_mult"][::-1]]
    up_temporal = cfg["temperal_downsample"][::-1]
    conv3("decoder.conv_in", z, dims[0], 3)
    mid("decoder.mid_block", dims[0])
    for i in range(n):
        cin, cout = dims[i], dims[i + 1]
        if i > 0 and not residual:
            cin //= 2
        for j in range(cfg["num_res_blocks"] + 1):
            res(f"decoder.up_blocks.{i}.resnets.{j}", cin, cout)
            cin = cout
        if i != n - 1:
            p = f"decoder.up_blocks.{i}.upsampler" if residual else f"decoder.up_blocks.{i}.upsamplers.0"
            s.conv(f"{p}.resample.1", cout, cout if residual else cout // 2, 3)
            if up_temporal[i]:
                s[f"{p}.time_conv.weight"], s[f"{p}.time_conv.bias"] = (2 * cout, cout, 3, 1, 1), (2 * cout,)
    rms("decoder.norm_out", dims[-1])
    conv3("decoder.conv_out", dims[-1], cfg.get("out_channels", channels), 3)
    return s


def dcae(cfg) -> State:
    s = State()
    head = cfg["attention_head_dim"]

    def block(p, kind, c, scales):
        if kind == "ResBlock":
            s.conv(f"{p}.conv1", c, c, 3)
            s.conv(f"{p}.conv2", c, c, 3, bias=False)
            s.norm(f"{p}.norm", c)
            return
        for x in "qkv":
            s[f"{p}.attn.to_{x}.weight"] = (c, c)
        for k, size in enumerate(scales):
            s.conv(f"{p}.attn.to_qkv_multiscale.{k}.proj_in", 3 * c, 3 * c, size, bias=False, groups=3 * c)
            s.conv(f"{p}.attn.to_qkv_multiscale.{k}.proj_out", 3 * c, 3 * c, 1, bias=False, groups=3 * c // head)
        s[f"{p}.attn.to_out.weight"] = (c, c * (1 + len(scales)))
        s.norm(f"{p}.attn.norm_out", c)
        hidden = 4 * c
        s.conv(f"{p}.conv_out.conv_inverted", c, 2 * hidden, 1)
        s.conv(f"{p}.conv_out.conv_depth", 2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        s.conv(f"{p}.conv_out.conv_point", hidden, c, 1, bias=False)
        s.norm(f"{p}.conv_out.norm", c)

    ch, n = cfg["encoder_block_out_channels"], len(cfg["encoder_block_out_channels"])
    layers = cfg["encoder_layers_per_block"]
    s.conv("encoder.conv_in", 3, ch[0], 3)
    for i in range(n):
        for j in range(layers[i]):
            block(f"encoder.down_blocks.{i}.{j}", cfg["encoder_block_types"][i], ch[i],
                  cfg["encoder_qkv_multiscales"][i])
        if i < n - 1:
            s.conv(f"encoder.down_blocks.{i}.{layers[i]}.conv", ch[i], ch[i + 1], 3)
    s.conv("encoder.conv_out", ch[-1], cfg["latent_channels"], 3)
    ch, layers = cfg["decoder_block_out_channels"], cfg["decoder_layers_per_block"]
    s.conv("decoder.conv_in", cfg["latent_channels"], ch[-1], 3)
    for i in range(n):
        j = 0
        if i < n - 1:
            s.conv(f"decoder.up_blocks.{i}.0.conv", ch[i + 1], ch[i], 3)
            j = 1
        for layer in range(layers[i]):
            block(f"decoder.up_blocks.{i}.{j + layer}", cfg["decoder_block_types"][i], ch[i],
                  cfg["decoder_qkv_multiscales"][i])
    s.norm("decoder.norm_out", ch[0])
    s.conv("decoder.conv_out", ch[0], 3, 3)
    return s


def hunyuan(cfg) -> State:
    s = State()

    def res(p, c):
        s.norm(f"{p}.norm1", c)
        s.conv(f"{p}.conv1", c, c, 3)
        s.norm(f"{p}.norm2", c)
        s.conv(f"{p}.conv2", c, c, 3)

    def mid(p, c):
        res(f"{p}.resnets.0", c)
        s.norm(f"{p}.attentions.0.norm", c)
        for x in ("to_q", "to_k", "to_v", "proj"):
            s.conv(f"{p}.attentions.0.{x}", c, c, 1)
        res(f"{p}.resnets.1", c)

    ch, z, layers = cfg["block_out_channels"], cfg["latent_channels"], cfg["layers_per_block"]
    resamples = min(int(np.log2(cfg["spatial_compression_ratio"])), len(ch) - 1)
    s.conv("encoder.conv_in", 3, ch[0], 3)
    flat = 0
    for i, c in enumerate(ch):
        for _ in range(layers):
            res(f"encoder.down_blocks.{flat}", c)
            flat += 1
        if i < resamples:
            s.conv(f"encoder.down_blocks.{flat}.conv", c, ch[i + 1] // 4, 3)
            flat += 1
    mid("encoder.mid_block", ch[-1])
    s.norm("encoder.norm_out", ch[-1])
    s.conv("encoder.conv_out", ch[-1], 2 * z, 3)
    ch = ch[::-1]
    s.conv("decoder.conv_in", z, ch[0], 3)
    mid("decoder.mid_block", ch[0])
    flat = 0
    for i, c in enumerate(ch):
        for _ in range(layers + 1):
            res(f"decoder.up_blocks.{flat}", c)
            flat += 1
        if i < resamples:
            s.conv(f"decoder.up_blocks.{flat}.conv", c, 4 * ch[i + 1], 3)
            flat += 1
    s.norm("decoder.norm_out", ch[-1])
    s.conv("decoder.conv_out", ch[-1], 3, 3)
    return s


def main() -> None:
    family, out = sys.argv[1], Path(sys.argv[2])
    cfg = CONFIGS[family]
    shapes = {"qwen-image": wan, "wan2.2": wan, "sana": dcae, "hunyuanimage-2.1": hunyuan}[family](cfg)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in shapes.items():
        last = name.rsplit(".", 1)[-1]
        if last == "bias":
            tensors[name] = np.zeros(shape, np.float32)
        elif last == "gamma" or len(shape) == 1:
            tensors[name] = np.ones(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            tensors[name] = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(fan_in))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"))
    print(f"{family}: {len(tensors)} tensors, {sum(t.size for t in tensors.values()):,} parameters -> {out}")


if __name__ == "__main__":
    main()
