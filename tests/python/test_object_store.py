"""`--out s3://…`: the same shard set as a local `--out`, committed whole, resumable after
`kill -9`, one writer at a time, and read back by `verify`, `inspect`, `report --shards` and the
Python loader. Everything runs against a real S3 API on loopback (moto_server); boto3 and pyarrow
read the results independently of the binary.
"""
from __future__ import annotations

import http.client
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from report_reference import report_card, run_report
from vp_helpers import REPO, environment, moto_server, require, run_precompute, s3_env, tensor

sys.path.insert(0, str(REPO / "python"))
import vae_pipeline  # noqa: E402
from vae_pipeline.dataset import LatentsDataset  # noqa: E402

#: Must never be written anywhere: objects, logs, errors.
SECRET = "vp-secret-Zq81xT"
SIZE = "128"


@pytest.fixture(scope="module")
def store():
    import boto3

    with moto_server() as endpoint, environment(s3_env(endpoint, secret=SECRET)):
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        yield client


def kodak_folder(shared, tmp_path_factory, n: int) -> Path:
    """The first `n` Kodak photos in a folder of their own."""
    d = tmp_path_factory.mktemp(f"kodak{n}")
    kodak = require(shared / "data" / "kodak", "Kodak photos")
    for p in sorted(kodak.glob("*.png"))[:n]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def images(shared, tmp_path_factory) -> Path:
    return kodak_folder(shared, tmp_path_factory, 6)


def objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, by name relative to it."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="data", Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = client.get_object(Bucket="data", Key=o["Key"])["Body"].read()
    return out


def shards_table(files: dict[str, bytes]) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(b)) for n, b in sorted(files.items()) if n.endswith(".parquet")]
    return pa.concat_tables(tables).sort_by("key")


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "_lock"}


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    assert a.schema == b.schema
    for name in a.column_names:
        if isinstance(a.schema.field(name).type, pa.FixedShapeTensorType):
            assert np.array_equal(tensor(a, name), tensor(b, name)), name
        else:
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


def vp(binary, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_s3_in_s3_out_writes_the_local_set_and_every_reader_reads_it(binary, cards, shared, images, store, tmp_path):
    for p in sorted(images.iterdir()):
        store.upload_file(str(p), "data", f"in/{p.name}")
    flags = ["--model", cards["taef2"], "--size", SIZE, "--shard-rows", "3"]
    local = tmp_path / "local"
    run_precompute(binary, ["--input", images, "--out", local, *flags])
    proc = run_precompute(binary, ["--input", "s3://data/in/", "--out", "s3://data/sets/a", *flags])

    remote = objects(store, "sets/a/")
    want = local_files(local)
    assert sorted(remote) == sorted(want), "the same files, and no lease left behind"
    assert_same_rows(shards_table(remote), shards_table(want))
    for name in ("_manifest.jsonl", "_config.toml"):
        assert remote[name] == want[name], name
    assert json.loads(remote["_SUCCESS"])["rows"] == 6

    verdict = vp(binary, "verify", "s3://data/sets/a")
    assert verdict.returncode == 0 and "ok: 6 rows in 2 shards" in verdict.stdout, verdict.stdout + verdict.stderr
    inspect = vp(binary, "inspect", "s3://data/sets/a")
    assert "128x128: 6 rows in 2 shard(s)" in inspect.stdout, inspect.stdout + inspect.stderr

    assert_same_rows(vae_pipeline.read("s3://data/sets/a").sort_by("key"), vae_pipeline.read(local).sort_by("key"))
    ds_remote, ds_local = LatentsDataset("s3://data/sets/a"), LatentsDataset(local)
    assert len(ds_remote) == len(ds_local) == 6
    for i in (0, 5):
        assert ds_remote[i]["key"] == ds_local[i]["key"]
        assert np.array_equal(ds_remote[i]["latent"], ds_local[i]["latent"])

    card = report_card(shared, tmp_path)
    run_report(binary, ["--shards", "s3://data/sets/a", "--input", images, "--model", card, "--out", tmp_path / "r-s3"])
    run_report(binary, ["--shards", local, "--input", images, "--model", card, "--out", tmp_path / "r-local"])
    metrics = [pq.read_table(tmp_path / r / "metrics.parquet").sort_by("key") for r in ("r-s3", "r-local")]
    assert metrics[0].column("psnr").to_pylist() == metrics[1].column("psnr").to_pylist()

    for name, body in remote.items():
        assert SECRET.encode() not in body, f"the secret key is in {name}"
    assert SECRET not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def dozen(shared, tmp_path_factory) -> Path:
    return kodak_folder(shared, tmp_path_factory, 12)


def one_row_shards(binary, cards, folder: Path, url: str) -> list[str]:
    """A run that commits one row per shard, on one thread: many commits to interrupt."""
    return [str(binary), "precompute", "--input", str(folder), "--out", url, "--model", str(cards["taef2"]),
            "--size", SIZE, "--shard-rows", "1", "--batch-size", "1", "--threads", "1"]


def wait_for(what, condition, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.05)


def parts(client, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket="data", Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in listed if o["Key"].endswith(".parquet")]


def assert_every_key_once(client, prefix: str, binary, n: int) -> None:
    table = shards_table(objects(client, prefix))
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == n, f"{len(keys)} rows, {len(set(keys))} keys"
    verdict = vp(binary, "verify", f"s3://data/{prefix}")
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_kill_9_mid_run_leaves_only_whole_shards_and_a_rerun_completes(binary, cards, dozen, store):
    cmd = one_row_shards(binary, cards, dozen, "s3://data/sets/k")
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("two committed shards", lambda: len(parts(store, "sets/k/")) >= 2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    committed = objects(store, "sets/k/")
    assert "_SUCCESS" not in committed and len(parts(store, "sets/k/")) < 12
    for name, body in committed.items():
        if name.endswith(".parquet"):
            assert pq.read_table(io.BytesIO(body)).num_rows == 1, f"{name} is not a whole shard"
    # The lease names a process that is gone from this machine: the rerun takes it over at once.
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "committed rows of this identity: resuming" in rerun.stderr
    assert_every_key_once(store, "sets/k/", binary, 12)


def test_a_second_writer_is_refused_by_the_lease_and_by_create_only_commits(binary, cards, dozen, store):
    cmd = one_row_shards(binary, cards, dozen, "s3://data/sets/l")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the first run's lease", lambda: "Contents" in store.list_objects_v2(Bucket="data", Prefix="sets/l/_lock"))
        first.send_signal(signal.SIGSTOP)
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0
        assert "is being written by another vae-pipeline run" in refused.stderr, refused.stderr
        assert f"pid {first.pid}" in refused.stderr, refused.stderr

        first.send_signal(signal.SIGCONT)
        wait_for("the first run's first shard", lambda: len(parts(store, "sets/l/")) >= 1)
        first.send_signal(signal.SIGSTOP)
        # Forge the lease as a dead process's on this machine: a second run takes it over while
        # the first still holds shard names it has not committed. The second numbers its shards
        # after those committed, so the first's next create is of a name the second already
        # committed, and the store refuses it.
        forged = {"holder": "forged", "host": socket.gethostname(), "pid": 2**31 - 1}
        store.put_object(Bucket="data", Key="sets/l/_lock", Body=json.dumps(forged).encode())
        committed = len(parts(store, "sets/l/"))
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for("the second run's first shard", lambda: len(parts(store, "sets/l/")) > committed)
    finally:
        first.send_signal(signal.SIGCONT)
    first_err = first.communicate(timeout=600)[1]
    second_err = second.communicate(timeout=600)[1]
    assert first.returncode != 0 and "already exists: another writer committed it first" in first_err, first_err
    assert second.returncode == 0, second_err
    assert_every_key_once(store, "sets/l/", binary, 12)


def test_bad_credentials_and_a_missing_bucket_fail_before_work(binary, cards, images, store, tmp_path):
    flags = ["--input", images, "--model", cards["taef2"], "--size", SIZE]
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as strict:
        proc = vp(binary, "precompute", *flags, "--out", "s3://data/x", env=s3_env(strict, "AKIAWRONGKEY", SECRET))
    assert proc.returncode != 0
    assert "the credentials were rejected" in proc.stderr, proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    buckets = store.list_buckets()["Buckets"]
    proc = vp(binary, "precompute", *flags, "--out", "s3://nosuchbucket/x")
    assert proc.returncode != 0 and "bucket s3://nosuchbucket does not exist" in proc.stderr, proc.stderr
    assert store.list_buckets()["Buckets"] == buckets


@contextmanager
def flaky(endpoint: str, every: int):
    """A proxy in front of the S3 endpoint that answers every `every`-th request with 503 SlowDown
    (moto never throttles) and forwards the rest unchanged. Yields (proxy URL, refused count)."""
    upstream = endpoint.removeprefix("http://")
    count = {"seen": 0, "refused": 0}
    lock = threading.Lock()

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def handle_any(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            with lock:
                count["seen"] += 1
                refuse = count["seen"] % every == 0
                count["refused"] += refuse
            if refuse:
                reply = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return
            conn = http.client.HTTPConnection(upstream, timeout=30)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            # A HEAD's Content-Length is the object's, not the (empty) body's.
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", count
    finally:
        server.shutdown()


def test_transient_errors_are_retried_and_counted(binary, cards, images, store):
    for p in sorted(images.iterdir()):
        store.upload_file(str(p), "data", f"flaky-in/{p.name}")
    with flaky(os.environ["AWS_ENDPOINT_URL"], every=4) as (proxy, count):
        proc = vp(binary, "precompute", "--input", "s3://data/flaky-in/", "--out", "s3://data/sets/f",
                  "--model", cards["taef2"], "--size", SIZE, env={"AWS_ENDPOINT_URL": proxy})
    assert proc.returncode == 0, proc.stderr
    assert count["refused"] > 0
    summary = json.loads(store.get_object(Bucket="data", Key="sets/f/_SUCCESS")["Body"].read())
    # Requests after the summary (the manifest, _SUCCESS itself) may be refused too.
    assert 0 < summary["retried_requests"] <= count["refused"], (summary["retried_requests"], count)
    assert f"{summary['retried_requests']} request(s) failed transiently and were retried" in proc.stderr
    assert summary["rows"] == 6
