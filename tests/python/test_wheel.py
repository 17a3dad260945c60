"""`pip install` of the wheel `make wheel` built, into a fresh venv, used from outside the repo.

Nothing of the repository is on sys.path or the working directory there: the binary must find
ONNX Runtime in its own environment, the shipped cards in <prefix>/share/vae-pipeline/models, and
the TAEF2 weights through $VAE_PIPELINE_MODELS. `auditwheel show` reports the platform tag the
README claims.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

import pytest

from vp_helpers import REPO, require

TAG = "manylinux_2_34_x86_64"


@pytest.fixture(scope="module")
def wheel():
    wheels = sorted((REPO / "target" / "wheels").glob("vae_pipeline-*.whl"))
    assert len(wheels) == 1, f"run `make wheel` first; found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([py, "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    work = root / "work"  # outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DYLIB_PATH", "PYTHONPATH", "VAE_PIPELINE_MODELS")}
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
    env["HOME"] = str(root)  # no user card folder
    return {"py": py, "bin": env_dir / "bin" / "vae-pipeline", "work": work, "env": env, "root": root}


def run(installed, *args, env=None, **kw):
    r = subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=installed["work"],
                       env=env or installed["env"], timeout=600, **kw)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r


def test_platform_tag(wheel):
    assert wheel.name.endswith(f"-py3-none-{TAG}.whl"), wheel.name
    r = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'platform tag: "{TAG}"' in " ".join(r.stdout.split()), r.stdout


def test_version_doctor_and_shim(installed):
    version = run(installed, "vae-pipeline", "--version").stdout
    assert version.startswith("vae-pipeline "), version
    assert run(installed, installed["py"], "-m", "vae_pipeline", "--version").stdout == version
    doctor = run(installed, "vae-pipeline", "doctor").stdout
    site = f"{installed['root']}/venv/lib"
    assert "found through the onnxruntime package installed with vae-pipeline" in doctor, doctor
    assert site in doctor, doctor
    assert "execution providers: CPU" in doctor, doctor
    shipped = f"{installed['root']}/venv/share/vae-pipeline/models: avgpool8, flux1, hunyuanimage-2.1, qwen-image, sana, sd15, sd2, sd3, sdxl, taef2, taef2-fp16, tiny-kl, wan2.1, wan2.2"
    assert shipped in doctor, doctor


def test_precompute_with_the_shipped_card_and_read_it_back(installed, shared):
    weights = installed["root"] / "weights" / "onnx"
    weights.mkdir(parents=True)
    os.symlink(require(shared / "models" / "taef2_encoder.onnx", "TAEF2"), weights / "taef2_encoder.onnx")
    env = dict(installed["env"], VAE_PIPELINE_MODELS=str(weights.parent))
    kodak = require(shared / "data" / "kodak", "Kodak")
    out = installed["work"] / "shards"
    run(installed, "vae-pipeline", "precompute", "--input", kodak, "--out", out, "--model", "taef2",
        "--size", 64, "--limit", 6, env=env)
    check = (
        "import json, vae_pipeline\n"
        "from vae_pipeline.dataset import LatentsDataset\n"
        f"t = vae_pipeline.read({str(out)!r})\n"
        "a = t.column('latent').chunk(0).to_numpy_ndarray()\n"
        f"ds = LatentsDataset({str(out)!r})\n"
        "print(json.dumps({'rows': t.num_rows, 'shape': list(a.shape), 'chunks': t.column('latent').num_chunks,\n"
        "  'loader': len(ds), 'item': list(ds[0]['latent'].shape), 'module': vae_pipeline.__file__}))\n"
    )
    got = json.loads(run(installed, installed["py"], "-c", check, env=env).stdout)
    assert got["rows"] == 6 and got["shape"] == [6, 32, 8, 8] and got["chunks"] == 1, got
    assert got["loader"] == 6 and got["item"] == [32, 8, 8], got
    assert got["module"].startswith(str(installed["root"])), got
