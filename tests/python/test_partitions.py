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

from vp_helpers import REPO, environment, moto_server, require, run_precompute, s3_env, tensor

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
    # OFFSET=0 too: sbatch hands on the caller's environment, which may hold another window's OFFSET.
    assert st["resubmit"] == ["OFFSET=0 sbatch --array=1,4 pipelines/slurm/precompute.sbatch"]
    unfinished = vp(binary, "verify", out)
    assert unfinished.returncode != 0
    assert "partition(s) 1,4 are not done" in unfinished.stderr and "then run `vae-pipeline finalize" in unfinished.stderr, \
        unfinished.stderr
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
    assert again.returncode == 0 and "partition 0 was done and its inputs are unchanged" in again.stderr, again.stderr


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
    assert "flip: false there, true now" in other_size.stderr and "--overwrite" not in other_size.stderr, other_size.stderr
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


def nine_photos(shared, d: Path) -> Path:
    """Nine files in three partitions of three: kodim01..07, a copy of kodim07 in the same partition
    (2) and a copy of kodim01 (partition 0) that lands in partition 2."""
    kodak = require(shared / "data" / "kodak", "Kodak photos")
    d.mkdir()
    for i in range(1, 8):
        shutil.copy(kodak / f"kodim0{i}.png", d / f"kodim0{i}.png")
    shutil.copy(kodak / "kodim07.png", d / "kodim07b.png")
    shutil.copy(kodak / "kodim01.png", d / "zz-copy-of-01.png")
    return d


def side_files(out: Path) -> dict[str, bytes]:
    """What finalize writes or may rewrite, besides the shards: the side files and done markers."""
    names = ["_SUCCESS", "_manifest.jsonl", "_errors.jsonl", *(f"_partitions/p0000{p}.json" for p in range(3))]
    return {n: (out / n).read_bytes() for n in names if (out / n).exists()}


def test_finalize_is_idempotent_and_survives_kill_9(binary, cards, shared, tmp_path):
    photos = nine_photos(shared, tmp_path / "photos")
    base = tmp_path / "base"
    for p in range(3):
        run_precompute(binary, flags(binary, cards, photos, base, "--dedupe", "--partitions", 3, "--partition", p,
                                     model="avgpool8")[2:])
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    done = vp(binary, "finalize", ref)
    assert done.returncode == 0 and "1 cross-partition duplicates dropped" in done.stderr, done.stderr
    want, want_rows = side_files(ref), rows(sorted(ref.rglob("part-*.parquet")))
    success = json.loads(want["_SUCCESS"])
    assert success["rows"] == 7 and success["cross_partition_duplicates"] == 1, success
    assert success["duplicates"] == success["failures"]["duplicate"] == 2, success
    errors = sorted((e["key"], e["kind"]) for e in map(json.loads, want["_errors.jsonl"].decode().splitlines()))
    assert errors == [("kodim07b.png", "duplicate"), ("zz-copy-of-01.png", "duplicate")]
    for _ in range(2):
        again = vp(binary, "finalize", ref)
        assert again.returncode == 0, again.stderr
        assert side_files(ref) == want, "finalize again changed the side files"
        verdict = vp(binary, "verify", ref)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr

    # Two at once: one takes the set's lock, the other is refused; the files are the same.
    out = tmp_path / "concurrent"
    shutil.copytree(base, out)
    both = [subprocess.Popen([str(binary), "finalize", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(w.wait(timeout=60), w.stderr.read()) for w in both]
    assert any(rc == 0 for rc, _ in results), results
    assert all(rc == 0 or "being written by another vae-pipeline run" in err for rc, err in results), results
    assert side_files(out) == want

    def finalized_again(out: Path) -> None:
        rerun = vp(binary, "finalize", out)
        assert rerun.returncode == 0, rerun.stderr
        assert side_files(out) == want
        assert_same_rows(rows(sorted(out.rglob("part-*.parquet"))), want_rows)
        verdict = vp(binary, "verify", out)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr

    # SIGKILL at moments spread over a first finalize (about 60 ms here), then finalize again.
    for delay in [i * 0.006 for i in range(12)]:
        out = tmp_path / f"killed-{delay}"
        shutil.copytree(base, out)
        victim = subprocess.Popen([str(binary), "finalize", str(out)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        finalized_again(out)
    # The moments between finalize's first writes, made exactly: partition 2's marker already
    # lists its dropped row while its shard still holds it; then the emptied shard is gone too.
    for step in ("marker", "marker+shard"):
        out = tmp_path / step
        shutil.copytree(base, out)
        shutil.copy(ref / "_partitions" / "p00002.json", out / "_partitions" / "p00002.json")
        if step == "marker+shard":
            for shard in out.rglob("part-*.parquet"):
                if not (ref / shard.relative_to(out)).exists():
                    shard.unlink()
        finalized_again(out)

    # A done partition run again keeps the rows finalize dropped while their sources are unchanged:
    # nothing is encoded, the set stays final.
    def worker(p: int) -> subprocess.CompletedProcess:
        return vp(binary, *flags(binary, cards, photos, ref, "--dedupe", "--partitions", 3, "--partition", p,
                                 model="avgpool8")[1:])

    again = worker(2)
    assert again.returncode == 0 and "its done marker stands" in again.stderr, again.stderr
    assert side_files(ref) == want
    # The kept copy changes: the dropped one must be encoded after all. finalize says so and marks
    # its partition not done; its rerun encodes it; the set then equals one process's.
    shutil.copy(shared / "data" / "kodak" / "kodim20.png", photos / "kodim01.png")
    assert worker(0).returncode == 0
    refused = vp(binary, "finalize", ref)
    assert refused.returncode != 0 and "partition 2 is no longer done" in refused.stderr, refused.stderr
    assert status(binary, ref)["missing"] == [2]
    assert worker(2).returncode == 0
    assert vp(binary, "finalize", ref).returncode == 0
    verdict = vp(binary, "verify", ref)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    single = tmp_path / "single"
    run_precompute(binary, flags(binary, cards, photos, single, "--dedupe", model="avgpool8")[2:])
    assert_same_rows(rows(sorted(ref.rglob("part-*.parquet"))), rows(sorted(single.rglob("part-*.parquet"))))


def test_finalize_on_object_storage_is_idempotent(binary, cards, shared, tmp_path):
    import boto3

    photos = nine_photos(shared, tmp_path / "photos")
    with moto_server() as endpoint, environment(s3_env(endpoint)):
        client = boto3.client("s3")
        client.create_bucket(Bucket="runs")

        def objects(prefix: str) -> dict[str, bytes]:
            listed = client.list_objects_v2(Bucket="runs", Prefix=prefix).get("Contents", [])
            return {o["Key"][len(prefix):]: client.get_object(Bucket="runs", Key=o["Key"])["Body"].read()
                    for o in listed if not o["Key"].endswith("lock")}

        for p in range(3):
            run_precompute(binary, flags(binary, cards, photos, "s3://runs/set", "--dedupe", "--partitions", 3,
                                         "--partition", p, model="avgpool8")[2:])
        # SIGKILL moments spread over a first finalize (about 1 s against moto here, its writes last).
        delays = (0.5, 0.8, 0.95)
        for i in range(len(delays)):
            for key, body in objects("set/").items():
                client.put_object(Bucket="runs", Key=f"copy{i}/{key}", Body=body)
        assert vp(binary, "finalize", "s3://runs/set").returncode == 0
        want = objects("set/")
        assert vp(binary, "finalize", "s3://runs/set").returncode == 0
        assert objects("set/") == want, "finalize again changed the set"
        for i, delay in enumerate(delays):
            victim = subprocess.Popen([str(binary), "finalize", f"s3://runs/copy{i}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(delay)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            # The killed finalize's lease is taken over at once: its process is gone from this machine.
            rerun = vp(binary, "finalize", f"s3://runs/copy{i}")
            assert rerun.returncode == 0, rerun.stderr
            assert objects(f"copy{i}/") == want
        verdict = vp(binary, "verify", "s3://runs/copy0")
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_a_done_partition_is_checked_and_resumes_per_row(binary, cards, shared, tmp_path):
    kodak = require(shared / "data" / "kodak", "Kodak photos")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(1, 7):
        shutil.copy(kodak / f"kodim0{i}.png", photos / f"kodim0{i}.png")
    out = tmp_path / "out"

    def worker(p: int, inp: Path = photos, model: str = "avgpool8") -> subprocess.CompletedProcess:
        return vp(binary, *flags(binary, cards, inp, out, "--partitions", 2, "--partition", p, model=model)[1:])

    for p in range(2):
        assert worker(p).returncode == 0
    assert vp(binary, "finalize", out).returncode == 0
    marker = (out / "_partitions" / "p00000.json").read_bytes()
    success = (out / "_SUCCESS").read_bytes()

    # Same settings, same inputs: nothing is encoded, the set stays final.
    again = worker(0)
    assert again.returncode == 0 and "its done marker stands" in again.stderr, again.stderr
    assert (out / "_partitions" / "p00000.json").read_bytes() == marker
    assert (out / "_SUCCESS").read_bytes() == success

    # While a worker holds partition 0 (as a rerun of it would), finalize waits for it.
    import fcntl

    with open(out / "_partitions" / "p00000.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = vp(binary, "finalize", out)
    assert busy.returncode != 0 and "partition(s) 0 are being written by a worker now" in busy.stderr, busy.stderr

    # Another card, or other inputs, on the done partition: refused, naming what differs.
    other_card = worker(0, model="taef2")
    assert other_card.returncode != 0, other_card.stderr
    assert 'model.name: "avgpool8" there, "taef2" now' in other_card.stderr, other_card.stderr
    assert "--overwrite" not in other_card.stderr
    fewer = tmp_path / "fewer"
    shutil.copytree(photos, fewer)
    (fewer / "kodim01.png").unlink()
    other_input = worker(0, inp=fewer)
    assert other_input.returncode != 0 and "the inputs changed since the plan was made" in other_input.stderr, \
        other_input.stderr
    assert (out / "_SUCCESS").read_bytes() == success, "a refused worker changed the set"

    # An image changed inside the done partition: encoded again, and the set is not final until
    # finalize runs again.
    shutil.copy(kodak / "kodim20.png", photos / "kodim02.png")
    changed = worker(0)
    assert changed.returncode == 0 and "resuming" in changed.stderr, changed.stderr
    assert json.loads((out / "_partitions" / "p00000.json").read_text())["encoded"] == 1
    assert not (out / "_SUCCESS").exists()
    unfinalized = vp(binary, "verify", out)
    assert unfinalized.returncode != 0 and "every partition is done: run `vae-pipeline finalize" in unfinalized.stderr, \
        unfinalized.stderr
    assert vp(binary, "finalize", out).returncode == 0
    verdict = vp(binary, "verify", out)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    single = tmp_path / "single"
    run_precompute(binary, flags(binary, cards, photos, single, model="avgpool8")[2:])
    assert_same_rows(rows(sorted(out.rglob("part-*.parquet"))), rows(sorted(single.rglob("part-*.parquet"))))


def test_no_units_no_plan_and_no_rows_no_success(binary, cards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = vp(binary, "plan", *flags(binary, cards, empty, tmp_path / "nothing", "--partitions", 2, model="avgpool8")[2:])
    assert plan.returncode != 0 and "holds no images" in plan.stderr, plan.stderr
    assert not (tmp_path / "nothing" / "_plan.json").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png"):
        (broken / name).write_bytes(b"not a png")
    out = tmp_path / "out"
    for p in range(2):
        run_precompute(binary, flags(binary, cards, broken, out, "--partitions", 2, "--partition", p,
                                     "--max-failures", 1, model="avgpool8")[2:])
    refused = vp(binary, "finalize", out)
    assert refused.returncode != 0 and "no rows" in refused.stderr, refused.stderr
    assert not (out / "_SUCCESS").exists()


def test_launchers_take_input_and_out_from_the_preset(binary, cards, shared, tmp_path):
    import importlib.util

    kodak = require(shared / "data" / "kodak", "Kodak photos")
    (tmp_path / "photos").mkdir()
    for name in ("kodim01.png", "kodim02.png", "kodim03.png"):
        shutil.copy(kodak / name, tmp_path / "photos" / name)
    preset = tmp_path / "preset.toml"
    preset.write_text(f'model = "{cards["avgpool8"]}"\nsize = 64\nthreads = 1\ninput = "photos"\nout = "latents"\n')
    # The Slurm scripts, run as an array's tasks and the finalize job would run them, with neither
    # INPUT nor OUT set: the preset's are used.
    env = {k: v for k, v in os.environ.items() if k not in ("INPUT", "OUT", "OFFSET") and not k.startswith("SLURM_")}
    env.update(BIN=str(binary), PIPELINE=str(preset), PARTITIONS="2", SLURM_ARRAY_JOB_ID="7", SLURM_JOB_ID="8")
    for task in ("0", "1"):
        worker = subprocess.run(["bash", str(REPO / "pipelines" / "slurm" / "precompute.sbatch")], capture_output=True,
                                text=True, env={**env, "SLURM_ARRAY_TASK_ID": task}, timeout=300)
        assert worker.returncode == 0, worker.stdout + worker.stderr
    closing = subprocess.run(["bash", str(REPO / "pipelines" / "slurm" / "finalize.sbatch")], capture_output=True,
                             text=True, env=env, timeout=300)
    assert closing.returncode == 0, closing.stdout + closing.stderr
    assert (tmp_path / "latents" / "_SUCCESS").exists() and "ok: 3 rows" in closing.stdout, closing.stdout
    # The Ray launcher finds the run's --out in the preset, as the workers do.
    spec = importlib.util.spec_from_file_location("launch", REPO / "pipelines" / "ray" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    assert launch.resolved_out(str(binary), ["--pipeline", str(preset)]) == str(tmp_path / "latents")
    assert launch.resolved_out(str(binary), ["--pipeline", str(preset), "--out", "elsewhere"]) == "elsewhere"
