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
import unicodedata
import urllib.parse
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
    assert first.returncode != 0, first_err
    # The first run is told why: its lease was taken over; no full disk is suspected.
    assert "already exists: another run took over this run's lease s3://data/sets/l/_lock" in first_err, first_err
    assert "disk full" not in first_err, first_err
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
    slow_down = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    with proxy(endpoint, lambda method, path, seen: (503, slow_down) if seen % every == 0 else None) as got:
        yield got


@contextmanager
def proxy(endpoint: str, answer):
    """A proxy in front of the S3 endpoint: `answer(method, path, n)` (n counts requests from 1)
    gives (status, body) to send instead of the store's reply, or None to forward the request
    unchanged. Yields (proxy URL, {"seen": requests, "refused": requests answered})."""
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
                refuse = answer(self.command, self.path, count["seen"])
                count["refused"] += refuse is not None
            if refuse is not None:
                status, reply = refuse
                self.send_response(status)
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


#: Object keys S3 allows that object_store's `Path::from` would percent-encode (and so name
#: another object): spaces, `+`, `%`, `#`, `?`, `=`, non-ASCII and emoji, both Unicode forms of one
#: name (two different keys), and a key of about 900 bytes.
CAFE_NFC = unicodedata.normalize("NFC", "café photo.png")
CAFE_NFD = unicodedata.normalize("NFD", "café photo.png")
LONG = "long/" + "é" * 200 + "/" + "x" * 480 + ".png"
ODD_KEYS = [CAFE_NFC, CAFE_NFD, "a%b.png", "a%25b.png", "1+1=2 #?.png", "ü/x.png", "\U0001F642.png", LONG]


def dataset_key(rel: str) -> str:
    """FORMAT.md's key for an object key relative to the pattern's folder: `%` escaped as `%25`."""
    return rel.replace("%", "%25")


def avgpool(binary, cards, *args, env=None) -> subprocess.CompletedProcess:
    return vp(binary, "precompute", "--model", cards["avgpool8"], "--size", "64", "--threads", "2", *args, env=env)


def set_keys(client, bucket: str, prefix: str) -> list[str]:
    tables = [pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()))
              for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
              if o["Key"].endswith(".parquet")]
    return sorted(k for t in tables for k in t.column("key").to_pylist())


def test_every_key_s3_allows_round_trips_as_input_and_as_out_prefix(binary, cards, shared, store, tmp_path):
    assert len(LONG.encode()) > 880 and CAFE_NFC != CAFE_NFD
    photos = sorted(require(shared / "data" / "kodak", "Kodak photos").glob("*.png"))
    for photo, key in zip(photos, ODD_KEYS):
        store.upload_file(str(photo), "data", f"uni/{key}")
    want = sorted(dataset_key(k) for k in ODD_KEYS)
    assert len(set(want)) == len(ODD_KEYS), "the dataset keys are unique"

    # A prefix, and as `--out` a prefix of the same odd characters in a bucket of its own.
    store.create_bucket(Bucket="emp")
    out = "ü #?%+=\U0001F642/" + CAFE_NFD
    proc = avgpool(binary, cards, "--input", "s3://data/uni/", "--out", f"s3://emp/{out}")
    assert proc.returncode == 0, proc.stderr
    assert set_keys(store, "emp", out + "/") == want
    listed = [o["Key"] for o in store.list_objects_v2(Bucket="emp")["Contents"]]
    assert listed and all(k.startswith(out + "/") for k in listed), listed
    assert b"" == store.get_object(Bucket="emp", Key=f"{out}/_errors.jsonl")["Body"].read()
    verdict = vp(binary, "verify", f"s3://emp/{out}")
    assert verdict.returncode == 0 and f"ok: {len(ODD_KEYS)} rows" in verdict.stdout, verdict.stdout + verdict.stderr
    again = avgpool(binary, cards, "--input", "s3://data/uni/", "--out", f"s3://emp/{out}")
    assert again.returncode == 0 and "encoded 0 images" in again.stderr, again.stderr
    assert set_keys(store, "emp", out + "/") == want

    # One object named by its key, each odd form: keys are relative to its folder.
    for key in (CAFE_NFD, "a%b.png", "1+1=2 #?.png", LONG):
        proc = avgpool(binary, cards, "--input", f"s3://data/uni/{key}", "--out", tmp_path / f"one-{ODD_KEYS.index(key)}")
        assert proc.returncode == 0, f"{key}: {proc.stderr}"
        assert "encoded 1 images" in proc.stderr, proc.stderr
    # A glob and a brace list over the odd keys; a `?` in a glob matches any one character.
    proc = avgpool(binary, cards, "--input", "s3://data/uni/*.png", "--out", tmp_path / "glob")
    assert proc.returncode == 0 and "encoded 6 images, 0 failed" in proc.stderr, proc.stderr
    proc = avgpool(binary, cards, "--input", f"s3://data/uni/{{ü/x,{CAFE_NFC[:-4]}}}.png", "--out", tmp_path / "brace")
    assert proc.returncode == 0 and "encoded 2 images, 0 failed" in proc.stderr, proc.stderr
    # NFC and NFD are two keys: naming one form does not find the other.
    store.delete_object(Bucket="data", Key=f"uni/{CAFE_NFC}")
    proc = avgpool(binary, cards, "--input", f"s3://data/uni/{CAFE_NFC}", "--out", tmp_path / "nfc")
    assert proc.returncode == 2 and "there is no object" in proc.stderr, proc.stderr
    for key in ODD_KEYS:
        store.delete_object(Bucket="data", Key=f"uni/{key}")


def test_a_listed_object_that_cannot_be_read_fails_the_run_and_no_password_is_shown(binary, cards, images, store):
    for p in sorted(images.iterdir()):
        store.upload_file(str(p), "data", f"gone-in/{p.name}")
    gone = f"/data/gone-in/{sorted(p.name for p in images.iterdir())[2]}"
    no_such_key = b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"
    # The listing names the object; fetching it says there is no such key (it vanished).
    answer = lambda method, path, n: (404, no_such_key) if method == "GET" and urllib.parse.unquote(path) == gone else None  # noqa: E731
    password = "vp-endpoint-pass-7Qk2"
    with proxy(os.environ["AWS_ENDPOINT_URL"], answer) as (url, count):
        endpoint = url.replace("http://", f"http://vpuser:{password}@")
        proc = avgpool(binary, cards, "--input", "s3://data/gone-in/", "--out", "s3://data/sets/gone",
                       env={"AWS_ENDPOINT_URL": endpoint})
        missing = avgpool(binary, cards, "--input", "s3://data/gone-in/", "--out", "s3://nosuchbucket/x",
                          env={"AWS_ENDPOINT_URL": endpoint})
    assert count["refused"] >= 1
    assert proc.returncode == 2, proc.stderr
    assert "1 read(s) of input objects failed" in proc.stderr and "no such object" in proc.stderr, proc.stderr
    written = objects(store, "sets/gone/")
    assert "_SUCCESS" not in written and b"no such object" in written["_errors.jsonl"]
    assert missing.returncode == 2 and "bucket s3://nosuchbucket does not exist" in missing.stderr, missing.stderr
    assert "***@127.0.0.1" in missing.stderr, "the store's words, with the endpoint's password taken out"
    for text in (proc.stderr, proc.stdout, missing.stderr, missing.stdout):
        assert password not in text
    for name, body in written.items():
        assert password.encode() not in body, name

    direct = os.environ["AWS_ENDPOINT_URL"].replace("http://", f"http://vpuser:{password}@")
    rerun = avgpool(binary, cards, "--input", "s3://data/gone-in/", "--out", "s3://data/sets/gone",
                    env={"AWS_ENDPOINT_URL": direct})
    assert rerun.returncode == 0 and "encoded 1 images" in rerun.stderr, rerun.stderr
    written = objects(store, "sets/gone/")
    assert "_SUCCESS" in written
    for name, body in written.items():
        assert password.encode() not in body, name


def test_no_credentials_is_said_before_any_work(binary, cards, images, store):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # No instance metadata service here: a closed port answers at once, as 169.254.169.254 would not.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env.update(AWS_PROFILE="vp-dev", AWS_METADATA_ENDPOINT=f"http://127.0.0.1:{port}")
    before = store.list_objects_v2(Bucket="data", Prefix="sets/nocred/").get("KeyCount")
    proc = subprocess.run([str(binary), "precompute", "--input", str(images), "--out", "s3://data/sets/nocred",
                           "--model", str(cards["avgpool8"]), "--size", "64"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "no credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in proc.stderr, proc.stderr
    assert "AWS_PROFILE and ~/.aws are not read" in proc.stderr, proc.stderr
    assert "169.254" not in proc.stderr and f"127.0.0.1:{port}" not in proc.stderr, proc.stderr
    assert store.list_objects_v2(Bucket="data", Prefix="sets/nocred/").get("KeyCount") == before
