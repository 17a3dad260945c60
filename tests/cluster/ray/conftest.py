"""Fixtures for the Ray launcher test: a real local Ray cluster, plus the Python tests' fixtures.

- `shared`, `binary`, `cards`: reused from tests/python/conftest.py (loaded under another module
  name, so that the two conftest.py files do not clash); `vp_helpers` comes from tests/python too.
- `ray_cluster`: `ray start --head --block` on 127.0.0.1 with 2 CPUs, in its own session and a
  short temporary folder; yields its address (HOST:PORT) and the environment to run drivers with.
  At the end the `ray start` process gets SIGTERM (it stops the GCS, the raylet and the workers), and
  any process left in its session is killed by pid and reported as a failure.

Ray must come from the `.venv-ray` environment (tests/cluster/ray/requirements.txt).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CLUSTER_TESTS = Path(__file__).resolve().parents[1]
if str(CLUSTER_TESTS) not in sys.path:
    sys.path.insert(0, str(CLUSTER_TESTS))

from python_fixtures import binary, cards, shared  # noqa: E402,F401

#: How long `ray start --head` may take to come up here (it takes 3 to 5 s on 2 cores).
RAY_START_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Pids of the live processes in session `sid` (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after the command (which may hold spaces) start after the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry))
    return pids


def ray_env() -> dict[str, str]:
    """Environment for the cluster and its drivers: no usage stats, no token file in ~/.ray."""
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns token authentication on by default and writes ~/.ray/auth_token; the test's
    # cluster listens on 127.0.0.1 only, so it runs without a token and leaves $HOME alone.
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="session")
def ray_cluster():
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.is_file():
        pytest.fail(
            f"no `ray` next to {sys.executable}: run these tests with .venv-ray/bin/python "
            "(python3 -m venv .venv-ray && .venv-ray/bin/pip install -r tests/cluster/ray/requirements.txt)",
            pytrace=False,
        )
    # Short on purpose: Ray puts Unix sockets under it and a socket path must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="vpray-", dir="/tmp")
    port = _free_port()
    env = ray_env()
    cmd = [
        str(ray_cli), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=2", "--num-gpus=0",
        "--object-store-memory=200000000",
        "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    log = open(log_path, "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ready = False
    while time.monotonic() - t0 < RAY_START_TIMEOUT and proc.poll() is None:
        if b"block forever" in log_path.read_bytes():
            ready = True
            break
        time.sleep(0.2)
    startup = time.monotonic() - t0
    if not ready:
        exited = proc.poll()
        how = f"exited with {exited}" if exited is not None else f"did not come up in {RAY_START_TIMEOUT} s"
        if exited is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session and process group
            proc.wait()
        text = log_path.read_text(errors="replace")
        pytest.fail(f"`ray start --head` {how}:\n{text[-4000:]}", pytrace=False)
    print(f"\nray start --head: ready in {startup:.1f} s at 127.0.0.1:{port}")
    try:
        yield {"address": f"127.0.0.1:{port}", "env": env, "startup_s": startup, "temp_dir": temp_dir}
    finally:
        sid = proc.pid  # start_new_session: the `ray start` process leads its own session
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        leftovers = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            leftovers = _session_pids(sid)
            if not leftovers:
                break
            time.sleep(0.5)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not leftovers:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"Ray left processes {leftovers} after SIGTERM to `ray start` (killed them); logs in {temp_dir}"
