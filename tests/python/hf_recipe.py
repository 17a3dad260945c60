"""Read vae-pipeline shards with Hugging Face `datasets` (tested with datasets 5.2).

`datasets` has no type for Arrow's `arrow.fixed_shape_tensor` extension, so a plain
`load_dataset("parquet", data_files=...)` fails with "... does not have a datasets dtype
equivalent". Declaring every column with `features=` works: each tensor is read as a flat
fixed-length list of C*h*w values (float16 comes back as float32); reshape it yourself.
"""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, List, Value, load_dataset

# Arrow value type of a stored tensor -> datasets value type (bf16 is stored as raw uint16 bits)
_STORED = {"halffloat": "float16", "float": "float32", "uint16": "uint16"}


def hf_load_latents(files, **load_kwargs):
    """Load the shards of one shape folder. Return (dataset, tensors): tensors maps each tensor
    column (`latent`, and `latent_std`, `latent_flip`, `latent_flip_std` when present) to a
    float32 numpy array of shape (N, C, h, w)."""
    schema = pq.read_schema(files[0])
    bf16 = schema.metadata[b"vae_pipeline.dtype"] == b"bf16"
    features, shapes = {}, {}
    for field in schema:
        if isinstance(field.type, pa.FixedShapeTensorType):
            shapes[field.name] = tuple(field.type.shape)
            stored = Value(_STORED[str(field.type.value_type)])
            features[field.name] = List(stored, length=int(np.prod(field.type.shape)))
        elif pa.types.is_fixed_size_binary(field.type):  # source_sha256
            features[field.name] = Value("binary")
        else:  # key, sizes, caption and JSON metadata columns
            features[field.name] = Features.from_arrow_schema(pa.schema([field]))[field.name]
    ds = load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        features=Features(features),
        split="train",
        **load_kwargs,
    )
    tensors = {}
    for name, shape in shapes.items():
        flat = ds.with_format("numpy")[name][:]
        if bf16:  # bf16 bits -> float32
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = np.asarray(flat, dtype=np.float32).reshape(-1, *shape)
    return ds, tensors
