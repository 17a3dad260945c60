"""pipelines/slurm/*.sbatch on a real single-node Slurm cluster, with the real binary.

The Kodak images (24 PNGs, linked COPIES times into subfolders so that a partition runs for a few
seconds) are encoded with the `avgpool8` card at 256² in PARTITIONS = 8 partitions, by two job
arrays of 4 tasks: `--array=0-3` with OFFSET=0 and `--array=0-3` with OFFSET=4. That is how a run
larger than Slurm's MaxArraySize is windowed, and it keeps the Slurm idiom of one array index per
partition (index + OFFSET = partition), which is also what `status`'s `sbatch --array=3,7` resubmit
line assumes. A finalize job waits on both arrays with `--dependency=afterany:A:B`.

1. `plan` creates the run's plan; both arrays and the finalize job are submitted.
2. While the task for partition VICTIM runs, a second worker on the same partition is refused;
   then the task is cancelled (`scancel`: SIGTERM; the script forwards it, the worker commits and
   exits non-zero).
3. When the arrays have ended, the finalize job has failed (a partition is missing), and
   `status --json` shows exactly the gap and a resubmit line for it.
4. The index that `status` names is resubmitted (OFFSET=0, `--gpus-per-task=0` as on a CPU-only
   cluster) with a new finalize job; it completes: `_SUCCESS`, `_manifest.jsonl`, `verify` passes.
5. The rows equal those of a single-process `precompute` of the same input (pyarrow, numpy): same
   keys, every key once, same latents.

Slurm's `scontrol requeue` restarts a job only after about 150 s here (measured on Slurm 22.05), so
the test cancels and resubmits instead. Run from the repository root (as root, Slurm installed by
tests/cluster/install_slurm.sh):

    VAE_PIPELINE_BIN=target/release/vae-pipeline .venv/bin/python -m pytest tests/cluster/test_slurm.py -q
"""
from __future__ import annotations

import json
import re
from collections import Counter
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vp_helpers import REPO, require, run_precompute, tensor

SBATCH_PRECOMPUTE = REPO / "pipelines" / "slurm" / "precompute.sbatch"
SBATCH_FINALIZE = REPO / "pipelines" / "slurm" / "finalize.sbatch"
PARTITIONS = 8
WINDOW = 4  # tasks per array: two windows, OFFSET=0 and OFFSET=4
VICTIM = 5  # the partition whose task is cancelled mid-run (second window, array index 1)
COPIES = 80  # 24 images x 80 = 1,920 inputs, 240 a partition: a task runs for seconds, not less
SIZE = 256
# The test node has 2 CPUs: ask for one a task (the script's 8 are for real GPU nodes).
SBATCH_RESOURCES = ["--cpus-per-task=1", "--time=00:10:00"]
ARRAY_TIMEOUT = 180


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


class Run:
    """The test's run: paths, the environment the sbatch scripts read, and the cluster helpers."""

    def __init__(self, slurm, binary: Path, tmp: Path, pipeline: Path, inp: Path):
        self.slurm, self.binary = slurm, binary
        self.out = tmp / "out"
        self.logs = tmp / "slurm-logs"
        self.logs.mkdir()
        self.env = {"BIN": str(binary), "PIPELINE": str(pipeline), "INPUT": str(inp), "OUT": str(self.out),
                    "PARTITIONS": str(PARTITIONS)}
        self.times: dict[str, float] = {}

    def job_logs(self) -> str:
        parts = [f"--- {p.name} ---\n{_tail(p.read_text(errors='replace'))}" for p in sorted(self.logs.glob("*"))]
        return "\n".join(parts) or "(no job logs)"

    def fail(self, msg: str):
        pytest.fail(f"{msg}\n=== job logs ===\n{self.job_logs()}\n=== daemons ===\n{self.slurm.logs(15)}",
                    pytrace=False)

    def submit_array(self, array: str, offset: int, *extra: str) -> str:
        return self.slurm.sbatch(
            f"--array={array}", *SBATCH_RESOURCES, *extra, f"--output={self.logs}/%x-%A_%a.out",
            str(SBATCH_PRECOMPUTE), env={**self.env, "OFFSET": str(offset)})

    def submit_finalize(self, *after: str) -> str:
        return self.slurm.sbatch(
            f"--dependency=afterany:{':'.join(after)}", *SBATCH_RESOURCES, f"--output={self.logs}/%x-%j.out",
            str(SBATCH_FINALIZE), env=self.env)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # Run outside any Slurm job: no SLURM_* variables (the cluster env has only SLURM_CONF).
        env = {k: v for k, v in self.slurm.env.items() if k != "SLURM_CONF"}
        return subprocess.run([str(self.binary), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env)

    def status(self) -> dict:
        p = self.cli("status", self.out, "--json", timeout=60)
        if p.returncode != 0:
            self.fail(f"`status {self.out} --json` exited {p.returncode}:\n{p.stderr}")
        try:
            st = json.loads(p.stdout)
        except json.JSONDecodeError as e:
            self.fail(f"`status --json` printed no JSON ({e}):\n{p.stdout[-3000:]}")
        for k in ("partitions", "done", "running", "missing", "resubmit"):
            assert k in st, f"`status --json` lacks {k!r}: {st}"
        return st

    def wait(self, jobs: list[str], timeout: float = ARRAY_TIMEOUT) -> dict[str, dict[str, str]]:
        try:
            return self.slurm.wait_done(jobs, timeout)
        except Exception as e:  # noqa: BLE001 - add the job logs to the cluster's message
            self.fail(str(e))


def _array_indices(spec: str) -> set[int]:
    """`3,5-7` (an sbatch --array value, without a %throttle) -> {3, 5, 6, 7}."""
    out: set[int] = set()
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi.split(":")[0]) + 1))
        elif part:
            out.add(int(part))
    return out


def _rows(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every key (duplicates kept) and key -> latent, from every part-*.parquet under `out`."""
    files = sorted(out.rglob("part-*.parquet"))
    assert files, f"no part-*.parquet under {out}: {sorted(str(p.relative_to(out)) for p in out.rglob('*'))[:50]}"
    keys: list[str] = []
    latents: dict[str, np.ndarray] = {}
    for f in files:
        t = pq.read_table(f)
        ks = t.column("key").to_pylist()
        keys += ks
        latents.update(zip(ks, tensor(t, "latent")))
    return keys, latents


@pytest.fixture
def run_input(shared, cards, tmp_path):
    kodak = require(shared / "data" / "kodak", "Kodak images")
    names = sorted(p.name for p in kodak.glob("*.png"))
    assert len(names) == 24, f"expected the 24 Kodak PNGs in {kodak}, found {len(names)}"
    inp = tmp_path / "in"
    for c in range(COPIES):
        d = inp / f"c{c:03d}"
        d.mkdir(parents=True)
        for n in names:
            (d / n).symlink_to(kodak / n)
    pipeline = tmp_path / "slurm-test.toml"
    pipeline.write_text(
        f'model = "{cards["avgpool8"]}"\n'
        f"size = {SIZE}\n"
        'resize = "center-crop"\n'
        'dtype = "f32"\n'
        "batch_size = 8\n"
        "shard_rows = 64\n"  # several commits a partition: a cancelled task leaves committed rows
        "threads = 1\n"  # two tasks share the 2 cores
    )
    return inp, pipeline, len(names) * COPIES


def test_slurm_arrays_cancel_resubmit_finalize_match_one_process(slurm, binary, run_input, tmp_path):
    t0 = time.monotonic()
    inp, pipeline, n_inputs = run_input
    for p in (SBATCH_PRECOMPUTE, SBATCH_FINALIZE):
        require(p, "sbatch script")
    run = Run(slurm, binary, tmp_path, pipeline, inp)

    # 1. plan, two windows of 4 array tasks, and a finalize job after both.
    plan = run.cli("plan", "--pipeline", pipeline, "--input", inp, "--out", run.out, "--partitions", PARTITIONS)
    assert plan.returncode == 0, f"plan exited {plan.returncode}:\n{plan.stderr}\n{plan.stdout}"
    assert str(PARTITIONS) in plan.stdout + plan.stderr, f"plan does not print the partition count:\n{plan.stdout}"
    st = run.status()
    assert st["partitions"] == PARTITIONS and not st["done"], st
    assert sorted(st["missing"]) == list(range(PARTITIONS)), f"a fresh plan: every partition missing: {st}"

    a = run.submit_array(f"0-{WINDOW - 1}", 0)
    b = run.submit_array(f"0-{WINDOW - 1}", WINDOW)
    fin1 = run.submit_finalize(a, b)
    run.times["submit"] = time.monotonic() - t0
    victim_task = f"{b}_{VICTIM - WINDOW}"

    # 2. wait for the victim's worker to be writing; a second worker is refused; cancel the task.
    deadline = time.monotonic() + ARRAY_TIMEOUT
    while True:
        state = slurm.states(victim_task).get(victim_task)
        if state == "RUNNING":
            st = run.status()
            if VICTIM in st["running"]:
                break
            if VICTIM in st["done"]:
                run.fail(f"partition {VICTIM} finished before it could be cancelled: raise COPIES ({st})")
        elif state in ("COMPLETED", "FAILED", "CANCELLED"):
            run.fail(f"task {victim_task} (partition {VICTIM}) is {state} before it could be cancelled")
        if time.monotonic() > deadline:
            run.fail(f"task {victim_task} not seen running partition {VICTIM} in {ARRAY_TIMEOUT}s "
                     f"(state {state}; squeue:\n{slurm.run('squeue', '-a', check=False).stdout})")
        time.sleep(0.1)
    run.times["victim running"] = time.monotonic() - t0

    second = run.cli("precompute", "--pipeline", pipeline, "--input", inp, "--out", run.out,
                     "--partitions", PARTITIONS, "--partition", VICTIM, timeout=120)
    if second.returncode == 0 and VICTIM in run.status()["done"]:
        run.fail(f"partition {VICTIM} finished before the second worker could be refused: raise COPIES")
    assert second.returncode != 0, (
        f"a second worker on partition {VICTIM} (while task {victim_task} writes it) was not refused:\n"
        f"{second.stderr[-3000:]}")
    assert re.search(r"being written", second.stderr + second.stdout, re.I), (
        f"the refusal does not say the partition is being written by another worker:\n{second.stderr[-3000:]}")

    slurm.run("scancel", victim_task)
    recs = run.wait([a, b])
    run.times["arrays ended"] = time.monotonic() - t0
    states = {k: v["JobState"] for k, v in recs.items()}
    assert states.pop(victim_task) == "CANCELLED", f"{victim_task}: {recs.get(victim_task)}"
    assert set(states.values()) == {"COMPLETED"}, f"the other tasks: {states}\n{run.job_logs()}"
    assert len(states) == 2 * WINDOW - 1, states
    victim_log = (run.logs / f"vae-precompute-{victim_task}.out").read_text()
    assert "got SIGTERM, forwarding" in victim_log, victim_log
    m = re.search(r"worker exited (\d+)", victim_log)
    assert m and m.group(1) != "0", (
        f"the cancelled worker did not stop by itself within KillWait (no non-zero 'worker exited'):\n{victim_log}")

    # 3. the first finalize ran after both arrays and refused; status shows the gap.
    fin = run.wait([fin1], 60)[fin1]
    assert fin["JobState"] == "FAILED", f"finalize with partition {VICTIM} missing: {fin}\n{run.job_logs()}"
    assert not (run.out / "_SUCCESS").exists(), "_SUCCESS written with a partition missing"
    st = run.status()
    assert st["partitions"] == PARTITIONS, st
    assert sorted(st["done"]) == sorted(set(range(PARTITIONS)) - {VICTIM}), st
    assert st["missing"] == [VICTIM] and st["running"] == [], st
    resubmit = [m.group(1) for r in st["resubmit"] for m in [re.search(r"--array[= ](\S+)", r)] if m]
    assert resubmit and set().union(*map(_array_indices, resubmit)) == {VICTIM}, (
        f"resubmit lines should name --array={VICTIM}: {st['resubmit']}")
    human = run.cli("status", run.out)
    assert human.returncode == 0 and str(VICTIM) in human.stdout, f"status (human):\n{human.stdout}{human.stderr}"

    # 4. resubmit the index that status names (OFFSET=0), on no GPU, and finalize again.
    r = run.submit_array(",".join(str(i) for i in sorted(st["missing"])), 0, "--gpus-per-task=0")
    fin2 = run.submit_finalize(r)
    recs = run.wait([r, fin2])
    run.times["resubmit done"] = time.monotonic() - t0
    assert {k: v["JobState"] for k, v in recs.items()} == {f"{r}_{VICTIM}": "COMPLETED", fin2: "COMPLETED"}, (
        f"{recs}\n{run.job_logs()}")
    for name in ("_SUCCESS", "_manifest.jsonl"):
        require(run.out / name, f"{name} written by finalize")
    st = run.status()
    assert sorted(st["done"]) == list(range(PARTITIONS)) and not st["missing"] and not st["running"], st
    verify = run.cli("verify", run.out, timeout=300)
    assert verify.returncode == 0, f"verify exited {verify.returncode}:\n{verify.stderr}\n{verify.stdout}"

    # 5. the same rows as one process.
    ref = tmp_path / "ref"
    run_precompute(binary, ["--pipeline", pipeline, "--input", inp, "--out", ref, "--threads", "2"])
    run.times["reference"] = time.monotonic() - t0
    keys, got = _rows(run.out)
    ref_keys, want = _rows(ref)
    assert len(ref_keys) == n_inputs, f"the single-process run has {len(ref_keys)} rows for {n_inputs} inputs"
    dup = sorted(k for k, n in Counter(keys).items() if n > 1)
    assert not dup, f"{len(dup)} keys written more than once by the partitioned run, e.g. {dup[:5]}"
    assert set(keys) == set(ref_keys), (
        f"keys differ: only partitioned {sorted(set(keys) - set(ref_keys))[:5]}, "
        f"only single {sorted(set(ref_keys) - set(keys))[:5]}")
    for k in ref_keys:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)

    print("\ntimings (s since start): " + ", ".join(f"{k} {v:.1f}" for k, v in run.times.items()))
