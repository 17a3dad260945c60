"""Read vae-pipeline shards with Hugging Face `datasets` (tested with datasets 5.2).

`datasets` has no type for Arrow's `arrow.fixed_shape_tensor` extension, so a plain
`load_dataset("parquet", data_files=...)` fails with "... does not have a datasets dtype
equivalent". Declaring every column with `features=` works: the latent is read as a flat
fixed-length list of C*h*w values (float16 comes back as float32); reshape it yourself.
"""
import numpy as np
from datasets import Features, List, Value, load_dataset

# vae_pipeline.dtype (file metadata) -> datasets value type of the stored tensor
_STORED = {"f16": "float16", "f32": "float32", "bf16": "uint16"}  # bf16 is stored as raw uint16 bits


def hf_load_latents(files, C, h, w, dtype="f16", dist=False, **load_kwargs):
    """Return (dataset, latents) where latents is a float32 numpy array of shape (N, C, h, w)."""
    stored = Value(_STORED[dtype])
    columns = {
        "key": Value("string"),
        "source_sha256": Value("binary"),
        "orig_width": Value("int32"),
        "orig_height": Value("int32"),
        "crop_top": Value("int32"),
        "crop_left": Value("int32"),
        "width": Value("int32"),
        "height": Value("int32"),
        "latent": List(stored, length=C * h * w),
    }
    if dist:  # shards written with --latent-mode dist also carry latent_std
        columns["latent_std"] = List(stored, length=C * h * w)
    columns["caption"] = Value("string")
    ds = load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        features=Features(columns),
        split="train",
        **load_kwargs,
    )
    flat = ds.with_format("numpy")["latent"][:]
    if dtype == "bf16":  # bf16 bits -> float32
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    return ds, np.asarray(flat, dtype=np.float32).reshape(-1, C, h, w)
