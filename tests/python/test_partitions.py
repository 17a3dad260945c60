"""Many workers, one shard set: `--partitions N` workers as separate processes (local folder and
the S3 endpoint), killed and rerun, give exactly the rows of one process; `status` and
`finalize` tell what is left and complete the set. pyarrow reads everything back.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vp_helpers import environment, moto_server, require, run_precompute, s3_env, tensor

SIZE = "128"


@pytest.fixture(scope="module")
def photos(shared, tmp_path_factory) -> Path:
    """The 24 Kodak photos, plus two byte-for-byte copies named to land in other partitions."""
    d = tmp_path_factory.mktemp("photos")
    kodak = require(shared / "data" / "kodak", "Kodak photos")
    for p in sorted(kodak.glob("*.png")):
        shutil.copy(p, d / p.name)
    shutil.copy(kodak / "kodim01.png", d / "zz-copy-of-01.png")
    shutil.copy(kodak / "kodim02.png", d / "zz-copy-of-02.png")
    return d


def flags(binary, cards, photos: Path, out, *extra, model="taef2") -> list[str]:
    """One row per shard on one thread: slow enough to interrupt, with many commits."""
    return [str(binary), "precompute", "--input", str(photos), "--out", str(out), "--model", str(cards[model]),
            "--size", SIZE, "--shard-rows", "1", "--batch-size", "1", "--threads", "1", *map(str, extra)]


def vp(binary, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def rows(files: list) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in files).sort_by("key")


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    keys = got.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key written twice"
    assert keys == want.column("key").to_pylist()
    assert np.array_equal(tensor(got, "latent"), tensor(want, "latent"))
    assert got.column("source_sha256").to_pylist() == want.column("source_sha256").to_pylist()


@pytest.fixture(scope="module")
def single(binary, cards, photos, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("single") / "out"
    run_precompute(binary, flags(binary, cards, photos, out)[2:])
    return rows(sorted(out.rglob("part-*.parquet")))


def status(binary, out) -> dict:
    proc = vp(binary, "status", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_srun_workers_killed_and_rerun_give_one_process_rows(binary, cards, photos, single, tmp_path):
    out = tmp_path / "out"
    cmd = flags(binary, cards, photos, out, "--partitions", 6)
    # Three `srun` tasks: each takes the partitions p with p mod 3 = its SLURM_PROCID.
    workers = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "SLURM_PROCID": str(r), "SLURM_NTASKS": "3"}) for r in range(3)]
    victim = workers[1]
    end = time.monotonic() + 120
    while not list(out.glob("*/part-p00001-*.parquet")):
        assert time.monotonic() < end and victim.poll() is None, "worker 1 committed nothing"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for w in workers[::2]:
        assert w.wait(timeout=600) == 0, w.stderr.read()

    st = status(binary, out)
    assert st["partitions"] == 6 and st["units"] == 26
    assert st["done"] == [0, 2, 3, 5] and st["running"] == [] and st["missing"] == [1, 4], st
    assert st["resubmit"] == ["sbatch --array=1,4 pipelines/slurm/precompute.sbatch"]
    refused = vp(binary, "finalize", out)
    assert refused.returncode != 0 and "2 of 6 partitions are not done (1,4)" in refused.stderr, refused.stderr
    assert not (out / "_SUCCESS").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "SLURM_PROCID": "1", "SLURM_NTASKS": "3"})
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr, "partition 1 continues from its committed rows"
    assert status(binary, out)["done"] == list(range(6))
    done = vp(binary, "finalize", out)
    assert done.returncode == 0, done.stderr
    assert vp(binary, "finalize", out).returncode == 0, "finalize again is harmless"
    verdict = vp(binary, "verify", out)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert_same_rows(rows(sorted(out.rglob("part-*.parquet"))), single)
    manifest = [json.loads(line) for line in (out / "_manifest.jsonl").read_text().splitlines()]
    assert sum(m["rows"] for m in manifest) == 26


def test_a_second_worker_on_a_partition_is_refused_and_a_done_partition_is_skipped(binary, cards, photos, tmp_path):
    out = tmp_path / "out"
    cmd = flags(binary, cards, photos, out, "--partitions", 2, "--partition", 0)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while not ((out / "_plan.json").exists() and status(binary, out)["running"] == [0]):
            assert time.monotonic() < end and first.poll() is None, "the first worker never ran"
            time.sleep(0.05)
        second = vp(binary, *cmd[1:])
        assert second.returncode != 0 and "being written by another vae-pipeline run" in second.stderr, second.stderr
    finally:
        assert first.wait(timeout=600) == 0
    again = vp(binary, *cmd[1:])
    assert again.returncode == 0 and "partition 0 is done: nothing to do" in again.stderr, again.stderr


def test_workers_refuse_a_plan_they_do_not_match(binary, cards, photos, tmp_path):
    out = tmp_path / "out"
    plan = vp(binary, "plan", *flags(binary, cards, photos, out, "--partitions", 4)[2:])
    assert plan.returncode == 0 and "plan: 4 partitions over 26 units" in plan.stdout, plan.stderr
    assert vp(binary, "plan", *flags(binary, cards, photos, out, "--partitions", 4)[2:]).returncode == 0

    # The same inputs seen through another path (a symlink, another working directory) plan the
    # same: no absolute path is in the plan, only who made it and when differ.
    link = tmp_path / "link"
    link.symlink_to(photos)
    other = subprocess.run([str(binary), "plan", *flags(binary, cards, Path("link"), tmp_path / "out2", "--partitions", 4)[2:]],
                           capture_output=True, text=True, cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    plans = [json.loads((d / "_plan.json").read_text()) for d in (out, tmp_path / "out2")]
    for plan in plans:
        plan.pop("created")
    assert plans[0] == plans[1] and str(tmp_path) not in json.dumps(plans[0])

    other_count = vp(binary, *flags(binary, cards, photos, out, "--partitions", 5, "--partition", 0)[1:])
    assert "--partitions 5, but the plan in this --out has 4" in other_count.stderr, other_count.stderr
    other_size = vp(binary, *flags(binary, cards, photos, out, "--partitions", 4, "--partition", 0)[1:], "--flip")
    assert "the settings differ from the plan's" in other_size.stderr, other_size.stderr
    changed = tmp_path / "changed"
    shutil.copytree(photos, changed)
    (changed / "kodim05.png").unlink()
    fewer = vp(binary, *flags(binary, cards, changed, out, "--partitions", 4, "--partition", 0)[1:])
    assert "the inputs changed since the plan was made (26 units then, 25 now" in fewer.stderr, fewer.stderr
    no_index = vp(binary, *flags(binary, cards, photos, out, "--partitions", 4)[1:])
    assert "needs to know which partition to run" in no_index.stderr, no_index.stderr
    beyond = vp(binary, *flags(binary, cards, photos, out, "--partitions", 4)[1:], env={"SLURM_ARRAY_TASK_ID": "4"})
    assert "partition 4 does not exist: --partitions 4 numbers them 0 to 3" in beyond.stderr, beyond.stderr
    whole = vp(binary, *flags(binary, cards, photos, out)[1:])
    assert "is a many-worker run" in whole.stderr, whole.stderr
    assert not list(out.rglob("part-*.parquet")), "a refused worker wrote shards"


def test_dedupe_across_partitions_keeps_the_first_copy(binary, cards, photos, tmp_path):
    single = tmp_path / "single"
    run_precompute(binary, flags(binary, cards, photos, single, "--dedupe", model="avgpool8")[2:])
    out = tmp_path / "out"
    for p in range(3):
        run_precompute(binary, flags(binary, cards, photos, out, "--dedupe", "--partitions", 3, "--partition", p,
                                     model="avgpool8")[2:])
    done = vp(binary, "finalize", out)
    assert done.returncode == 0 and "2 cross-partition duplicates dropped" in done.stderr, done.stderr
    assert vp(binary, "verify", out).returncode == 0
    want = rows(sorted(single.rglob("part-*.parquet")))
    assert_same_rows(rows(sorted(out.rglob("part-*.parquet"))), want)
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert sorted((e["key"], e["kind"]) for e in errors) == [
        ("zz-copy-of-01.png", "duplicate"), ("zz-copy-of-02.png", "duplicate")]


def test_indexed_job_pods_on_object_storage(binary, cards, photos, tmp_path):
    import io

    import boto3

    single = tmp_path / "single"
    run_precompute(binary, flags(binary, cards, photos, single, model="avgpool8")[2:])
    with moto_server() as endpoint, environment(s3_env(endpoint)):
        client = boto3.client("s3")
        client.create_bucket(Bucket="runs")
        url = "s3://runs/set"
        cmd = flags(binary, cards, photos, url, "--partitions", 3, model="avgpool8")
        # Three pods of an Indexed Job, and a replacement pod on index 1 started while the first
        # still runs (what a Job without podReplacementPolicy: Failed can do): pod 1 is paused
        # once it holds its lease, so the twin meets it alive.
        pods = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "JOB_COMPLETION_INDEX": str(i)}) for i in range(3)]
        try:
            end = time.monotonic() + 120
            while "Contents" not in client.list_objects_v2(Bucket="runs", Prefix="set/_partitions/p00001.lock"):
                assert time.monotonic() < end and pods[1].poll() is None, "pod 1 took no lease"
                time.sleep(0.02)
            pods[1].send_signal(signal.SIGSTOP)
            twin = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "JOB_COMPLETION_INDEX": "1"})
        finally:
            pods[1].send_signal(signal.SIGCONT)
        for pod in pods:
            assert pod.wait(timeout=600) == 0, pod.stderr.read()
        assert twin.returncode != 0 and "being written by another vae-pipeline run" in twin.stderr, twin.stderr
        assert vp(binary, "finalize", url).returncode == 0
        verdict = vp(binary, "verify", url)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        listed = client.list_objects_v2(Bucket="runs", Prefix="set/")["Contents"]
        bodies = [client.get_object(Bucket="runs", Key=o["Key"])["Body"].read()
                  for o in listed if o["Key"].endswith(".parquet")]
        got = pa.concat_tables(pq.read_table(io.BytesIO(b)) for b in bodies).sort_by("key")
        assert_same_rows(got, rows(sorted(single.rglob("part-*.parquet"))))
        assert not [o for o in listed if o["Key"].endswith(".lock")], "leases are released"
