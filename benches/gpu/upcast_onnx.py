#!/usr/bin/env python3
"""Rewrite an fp16 ONNX model as fp32: weights, constants, I/O and Cast targets.

    python upcast_onnx.py IN_FP16.onnx OUT_FP32.onnx

The device check carries only `taef2_encoder_fp16.onnx` (the CUDA bundle leaves no room for both
models under the 64 MiB carry limit) and makes the fp32 model from it. Its weights are the fp16
ones widened, so it runs the fp32 arithmetic of the same architecture: right for throughput,
not for parity (the parity tests use the real fp32 file).
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def widen(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == F16:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))


def main(src: str, dst: str) -> None:
    model = onnx.load(src)
    graph = model.graph
    for init in graph.initializer:
        widen(init)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == F16:
                attr.i = F32
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == F16:
            value.type.tensor_type.elem_type = F32
    onnx.checker.check_model(model)
    onnx.save(model, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
