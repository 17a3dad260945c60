#!/usr/bin/env python3
"""PyTorch peer for the GPU device check: the same encoder (same fp32 ONNX graph, same
weights) executed op by op with torch on the GPU, timed like `bench-encoder`'s encoder-only
number: one batch resident on the device, outputs left there.

    python torch_peer.py MODEL.onnx --size 256 --batch-size 32 --images 2048 \
        [--dtype fp16|bf16|fp32] [--channels-last] [--compile]

The graph is interpreted node by node with torch functions (the ops of the TAESD export and of
`vae-pipeline export`'s AutoencoderKL encoders: Conv, Relu, Sigmoid, Add, Mul, Reshape, Shape,
InstanceNormalization, MatMul, Transpose, Softmax, Cast, Identity, Constant), so no exporter or
third-party converter is needed. cudnn.benchmark is on (PyTorch's strongest eager setting for
fixed shapes). It first checks itself against onnxruntime on the CPU for one small image, then
prints one JSON line.
"""
import argparse
import json
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; initializers become buffers."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self.graph = model.graph
        self.names = {}
        for i, init in enumerate(self.graph.initializer):
            self.register_buffer(f"w{i}", torch.from_numpy(numpy_helper.to_array(init).copy()))
            self.names[init.name] = f"w{i}"
        self.nodes = [(n.op_type, list(n.input), list(n.output), attrs(n)) for n in self.graph.node]
        self.input = self.graph.input[0].name
        self.output = self.graph.output[0].name

    def forward(self, x):
        env = {self.input: x}
        get = lambda n: env[n] if n in env else getattr(self, self.names[n])
        for op, ins, outs, a in self.nodes:
            if op == "Conv":
                pads = a.get("pads", [0, 0, 0, 0])
                assert pads[0] == pads[2] and pads[1] == pads[3], "symmetric padding only"
                bias = get(ins[2]) if len(ins) > 2 and ins[2] else None
                y = F.conv2d(get(ins[0]), get(ins[1]), bias, stride=a.get("strides", [1, 1]),
                             padding=pads[:2], dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
            elif op == "Relu":
                y = F.relu(get(ins[0]))
            elif op == "Add":
                y = get(ins[0]) + get(ins[1])
            elif op == "Mul":
                y = get(ins[0]) * get(ins[1])
            elif op == "Constant":
                y = torch.from_numpy(numpy_helper.to_array(a["value"]).copy()).to(x.device)
                if y.is_floating_point():
                    y = y.to(x.dtype)
            elif op == "Shape":
                y = torch.tensor(get(ins[0]).shape, dtype=torch.int64)
            elif op == "Reshape":
                src, shape = get(ins[0]), [int(s) for s in get(ins[1]).tolist()]
                shape = [src.shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = src.reshape(shape)
            elif op == "Sigmoid":
                y = torch.sigmoid(get(ins[0]))
            elif op == "MatMul":
                y = torch.matmul(get(ins[0]), get(ins[1]))
            elif op == "Transpose":
                y = get(ins[0]).permute(*a["perm"])
            elif op == "Softmax":
                y = torch.softmax(get(ins[0]), dim=a.get("axis", -1))
            elif op == "Identity":
                y = get(ins[0])
            elif op == "Cast":
                # Casts around norms in an fp16 export: keep the module's compute type.
                src = get(ins[0])
                y = src.to(x.dtype) if src.is_floating_point() else src
            elif op == "InstanceNormalization":
                y = F.instance_norm(get(ins[0]), weight=get(ins[1]), bias=get(ins[2]), eps=a.get("epsilon", 1e-5))
            else:
                raise NotImplementedError(f"op {op}")
            env[outs[0]] = y
        return env[self.output]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    proto = onnx.load(args.model)
    module = OnnxModule(proto).eval()

    import onnxruntime as ort
    x = np.random.RandomState(0).rand(1, 3, 64, 64).astype(np.float32)
    ref = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"]).run(None, {module.input: x})[0]
    with torch.no_grad():
        ours = module.float()(torch.from_numpy(x)).numpy()
    check = float(np.abs(ours - ref).max())

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    module = module.to(device=device, dtype=dtype)
    for name, buf in module.named_buffers():
        if buf.dim() == 4:
            setattr(module, name, buf.contiguous(memory_format=memory))
    run = torch.compile(module) if args.compile else module
    batch = torch.rand(args.batch_size, 3, args.size, args.size, device=device, dtype=dtype)
    batch = batch.contiguous(memory_format=memory)
    with torch.no_grad():
        for _ in range(3):
            run(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        while done < args.images:
            run(batch)
            done += args.batch_size
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(json.dumps({
        "peer": "torch", "device": device, "dtype": args.dtype, "compile": args.compile,
        "channels_last": args.channels_last,
        "size": args.size, "batch_size": args.batch_size, "images": done, "seconds": seconds,
        "images_per_second": done / seconds, "max_abs_diff_vs_onnxruntime_fp32": check,
    }))


if __name__ == "__main__":
    main()
