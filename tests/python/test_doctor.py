"""`vae-pipeline doctor` is what a user runs when a setup does not work: it must fail (exit 2,
saying what to install) when no ONNX Runtime library loads, and name every folder it searched as
an absolute path (a bare `models` is the working directory's, which the reader may not know).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def doctor(binary: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), "doctor"], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_doctor_fails_without_onnx_runtime_and_prints_absolute_folders(binary, tmp_path):
    if binary.parent.name == "bin":
        # An installed binary finds the onnxruntime package beside it: use a copy outside bin/.
        copy = tmp_path / "elsewhere" / "vae-pipeline"
        copy.parent.mkdir()
        shutil.copy2(binary, copy)
        binary = copy
    empty = tmp_path / "empty-path"
    empty.mkdir()
    # No ORT_DYLIB_PATH, no `.ort/` in the working directory, no python3 on the PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DYLIB_PATH", "VAE_PIPELINE_MODELS")}
    env.update(PATH=str(empty), HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = doctor(binary, tmp_path, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ONNX Runtime: not found" in proc.stdout, proc.stdout
    assert "pip install onnxruntime" in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"  {tmp_path / 'models'}: (none)" in lines, proc.stdout
    assert f"  {tmp_path / 'config' / 'vae-pipeline' / 'models'}: (none)" in lines, proc.stdout
    assert not [line for line in lines if line.startswith("  models")], proc.stdout

    if "ORT_DYLIB_PATH" in os.environ:
        proc = doctor(binary, tmp_path, {**env, "ORT_DYLIB_PATH": os.environ["ORT_DYLIB_PATH"]})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "execution providers: CPU" in proc.stdout, proc.stdout
