"""`report --lpips MODEL.onnx`: the LPIPS plumbing, with stand-in ONNX graphs built here by the
`onnx` package. A real LPIPS export has the same I/O (README, "Reconstruction report"): two
float32 [N, 3, H, W] images in [-1, 1], original first, and one output of N distances.

The stand-in computes mean((x - y)^2) over C, H, W. With x, y = 2·image - 1 that is 4·MSE of the
[0, 1] images, so every row's lpips must equal 4 · 10^(-psnr/10): this checks the input range,
the batching and the column.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper

from report_reference import report_card, run_report


def save_model(path: Path, inputs: list[str]) -> Path:
    dims = ["N", 3, "H", "W"]
    value_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in inputs]
    out = helper.make_tensor_value_info("distance", TensorProto.FLOAT, ["N"])
    other = inputs[1] if len(inputs) > 1 else inputs[0]
    nodes = [
        helper.make_node("Sub", [inputs[0], other], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["square"]),
        helper.make_node("ReduceMean", ["square"], ["distance"], axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "mse_as_lpips", value_inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def three_images(shared, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lpips-in")
    for name in ("kodim01.png", "kodim02.png", "kodim03.png"):
        (d / name).symlink_to(shared / "data" / "kodak" / name)
    return d


def test_lpips_column_from_a_user_onnx(binary, shared, three_images, tmp_path):
    lpips = save_model(tmp_path / "lpips.onnx", ["x", "y"])
    out = tmp_path / "report"
    run_report(binary, [
        "--input", three_images, "--model", report_card(shared, tmp_path), "--size", 64, "--batch-size", 2,
        "--lpips", lpips, "--out", out,
    ])
    table = pq.read_table(out / "metrics.parquet")
    assert table.column_names == ["key", "model", "psnr", "ssim", "lpips", "latent_mean", "latent_std"]
    psnr = np.array(table.column("psnr").to_pylist())
    got = np.array(table.column("lpips").to_pylist())
    np.testing.assert_allclose(got, 4 * 10 ** (-psnr / 10), rtol=1e-4)

    m = json.loads((out / "summary.json").read_text())["models"]["taef2"]
    assert m["lpips_mean"] == pytest.approx(got.mean(), rel=1e-12)
    assert m["lpips_std"] == pytest.approx(got.std(), rel=1e-9)
    assert "LPIPS, mean ± std" in (out / "report.html").read_text()


def test_lpips_with_the_wrong_io_fails_before_work(binary, shared, three_images, tmp_path):
    lpips = save_model(tmp_path / "one-input.onnx", ["x"])
    out = tmp_path / "report"
    cmd = [
        str(binary), "report", "--input", str(three_images), "--model", str(report_card(shared, tmp_path)),
        "--size", "64", "--lpips", str(lpips), "--out", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "expected two images" in proc.stderr, proc.stderr
    assert not (out / "report.html").exists()
