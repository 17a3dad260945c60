"""Crash safety for real: SIGKILL the binary mid-run (twice), rerun the same command, and check with
pyarrow that every input is there exactly once and equals an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from vp_helpers import read_shards, require, run_precompute, tensor

SIZE = 128


def _args(binary, inp, out, card):
    return [str(binary), "precompute", "--input", str(inp), "--out", str(out), "--model", str(card),
            "--size", str(SIZE), "--batch-size", "2", "--shard-rows", "2", "--dtype", "f32", "--threads", "2"]


def _kill_after_shards(cmd, out: Path, shards: int) -> None:
    """Start `cmd`, SIGKILL it as soon as `shards` committed shards exist; it must not have finished."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list(out.glob("*/part-*.parquet"))) >= shards:
            break
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read().decode()}")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "_SUCCESS").exists(), "killed before the end: no _SUCCESS"


def test_sigkill_then_rerun_gives_every_row_exactly_once(binary, cards, shared, tmp_path):
    kodak = require(shared / "data" / "kodak", "Kodak images")
    inp = tmp_path / "in"
    inp.mkdir()
    names = sorted(p.name for p in kodak.glob("*.png"))
    for n in names:
        (inp / n).symlink_to(kodak / n)
    out = tmp_path / "out"
    cmd = _args(binary, inp, out, cards["taef2"])

    _kill_after_shards(cmd, out, 1)
    _kill_after_shards(cmd, out, 4)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "already committed" in done.stderr, done.stderr
    assert (out / "_SUCCESS").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left"

    table = read_shards(out, SIZE)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == names, "every input exactly once"
    assert len(set(keys)) == len(keys)

    clean = tmp_path / "clean"
    run_precompute(binary, cmd[2:4] + ["--out", clean] + cmd[6:])
    ref = read_shards(clean, SIZE)
    got = dict(zip(keys, tensor(table, "latent")))
    want = dict(zip(ref.column("key").to_pylist(), tensor(ref, "latent")))
    for k in names:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
