"""pipelines/ray/launch.py on a real local Ray cluster, with the real binary.

The 24 Kodak images are encoded with the `avgpool8` card at 256² in 6 partitions, one Ray task
each (0.5 CPU per task, so that 4 run at once on 2 cores and Ray's own work is never starved).
The launcher's `--bin` is a wrapper script that makes the first `precompute --partition 2` exit 1
and otherwise execs the real binary, so Ray's retry of an application error is exercised.

Checked: the launcher exits 0; partition 2 ran twice and every other partition once; `verify`
passes; the rows equal those of a single-process `precompute` (pyarrow, numpy); a second launch
resubmits nothing. Run from the repository root:

    .venv-ray/bin/python -m pytest tests/cluster/ray -q
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vp_helpers import REPO, read_shards, require, run_precompute, tensor

LAUNCHER = REPO / "pipelines" / "ray" / "launch.py"
PARTITIONS = 6
CRASH_PARTITION = 2
SIZE = 256
LAUNCH_TIMEOUT = 150


def write_wrapper(path: Path, real: Path, marker: Path, log: Path) -> Path:
    """A `--bin` that logs every call and fails the first `precompute --partition 2` once."""
    q = shlex.quote
    path.write_text(
        "#!/bin/sh\n"
        "# Test wrapper for the Ray launcher: logs each call; the first `precompute --partition "
        f"{CRASH_PARTITION}`\n# exits 1 (the marker file is created atomically with noclobber); "
        "everything else runs the real binary.\n"
        f'echo "$$ $*" >> {q(str(log))}\n'
        f'if [ "$1" = precompute ]; then\n'
        f'  case " $* " in\n'
        f'    *" --partition {CRASH_PARTITION} "*)\n'
        f"      if ( set -C; : > {q(str(marker))} ) 2>/dev/null; then\n"
        f'        echo "wrapper: simulated crash of partition {CRASH_PARTITION}" >&2\n'
        f"        exit 1\n"
        f"      fi ;;\n"
        f"  esac\n"
        f"fi\n"
        f'exec {q(str(real))} "$@"\n'
    )
    path.chmod(0o755)
    return path


def precompute_calls(log: Path) -> dict[int, int]:
    """Partition -> number of `precompute` calls the wrapper saw."""
    calls: dict[int, int] = {}
    for line in log.read_text().splitlines():
        args = line.split()[1:]
        if args and args[0] == "precompute":
            i = int(args[args.index("--partition") + 1])
            calls[i] = calls.get(i, 0) + 1
    return calls


def launch(ray_cluster, wrapper: Path, flags: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(LAUNCHER), "--bin", str(wrapper), "--partitions", str(PARTITIONS),
        "--num-cpus", "0.5", "--max-retries", "2", "--address", ray_cluster["address"],
        "--", *flags,
    ]
    try:
        # cwd = the checkout: the tasks run there too, where a dev build finds `.ort/`.
        return subprocess.run(cmd, cwd=REPO, env=ray_cluster["env"], capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"launcher timed out after {LAUNCH_TIMEOUT} s (hang?)\n{e.stdout}\n{e.stderr}", pytrace=False)


def read_all_shards(out: Path) -> pa.Table:
    """Every committed shard under OUT (any layout; hidden temporary files skipped), sorted by key."""
    files = sorted(
        p for p in out.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(out).parts)
    )
    assert files, f"no .parquet files under {out}"
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")


def test_launcher_retries_a_crashed_partition_and_matches_one_process(ray_cluster, binary, cards, shared, tmp_path):
    kodak = require(shared / "data" / "kodak", "Kodak images")
    card = cards["avgpool8"]
    flags = ["--model", str(card), "--size", str(SIZE), "--input", str(kodak), "--threads", "1"]

    single = tmp_path / "single"
    run_precompute(binary, [*flags, "--out", single])
    expected = read_shards(single, SIZE)
    assert expected.num_rows == 24

    multi = tmp_path / "multi"
    marker, log = tmp_path / "crashed-once", tmp_path / "wrapper.log"
    wrapper = write_wrapper(tmp_path / "vae-pipeline-wrapper", binary, marker, log)
    t0 = time.monotonic()
    proc = launch(ray_cluster, wrapper, [*flags, "--out", str(multi)])
    elapsed = time.monotonic() - t0
    report = f"--- launcher stdout ---\n{proc.stdout[-6000:]}\n--- launcher stderr ---\n{proc.stderr[-6000:]}"
    print(f"launcher: {elapsed:.1f} s\n{report}")
    assert proc.returncode == 0, f"launcher exited {proc.returncode}\n{report}"

    # The crash happened and Ray retried it; nothing else ran twice; plan ran once.
    assert marker.exists(), f"the wrapper never crashed partition {CRASH_PARTITION}\n{report}"
    calls = precompute_calls(log)
    assert calls == {i: (2 if i == CRASH_PARTITION else 1) for i in range(PARTITIONS)}, (
        f"precompute calls per partition: {calls}\n{log.read_text()}"
    )
    subcommands = [line.split()[1] for line in log.read_text().splitlines()]
    assert subcommands.count("plan") == 1 and subcommands.count("finalize") == 1, subcommands

    verify = subprocess.run([str(binary), "verify", str(multi)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, f"verify failed ({verify.returncode}):\n{verify.stdout}\n{verify.stderr}"

    # The same rows as one process: same keys (each once), same columns, equal latents.
    got = read_all_shards(multi)
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key is stored twice"
    assert keys == expected.column("key").to_pylist()
    for name in expected.column_names:
        if name == "latent":
            a, b = tensor(got, name), tensor(expected, name)
            assert a.shape == b.shape == (24, 4, SIZE // 8, SIZE // 8) and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        else:
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name

    # A second launch finds every partition done: it submits nothing and finalizes again.
    before = log.read_text()
    again = launch(ray_cluster, wrapper, [*flags, "--out", str(multi)])
    assert again.returncode == 0, f"second launch exited {again.returncode}\n{again.stdout}\n{again.stderr}"
    assert "submitting 0" in again.stdout, again.stdout
    new = log.read_text()[len(before):]
    assert " precompute " not in f" {new}", f"second launch ran precompute:\n{new}"


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "after `--`"),
        (["--input", "in"], "must include --out"),
        (["--input", "in", "--out", "o", "--partition", "1"], "--partition must not"),
        (["--input", "in", "--out", "o", "--overwrite"], "--overwrite must not"),
    ],
)
def test_launcher_rejects_bad_usage_before_running_anything(binary, tmp_path, flags, message):
    cmd = [sys.executable, str(LAUNCHER), "--bin", str(binary), "--partitions", "2", *(["--", *flags] if flags else [])]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "a rejected launch wrote something"
