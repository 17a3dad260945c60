"""Fixtures for the Slurm test (tests/cluster/test_slurm.py).

- `shared`, `binary`, `cards`: reused from tests/python/conftest.py, loaded under another module
  name so that the two conftest.py files do not clash; `vp_helpers` comes from tests/python too.
- `slurm`: a real single-node Slurm cluster (munged, slurmctld, slurmd as root, no systemd) in a
  temporary folder, from slurm_cluster.py; at the end every job is cancelled and the daemons are
  stopped, and any process left behind is killed by pid and reported as a failure.

A missing Slurm install, or not being root, is a failure with the fix in the message, never a skip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from python_fixtures import binary, cards, shared  # noqa: E402,F401

from slurm_cluster import SlurmCluster, SlurmClusterError, missing_commands  # noqa: E402

#: Fake GPUs on the test node: the sbatch script's `--gpus-per-task=1` runs unchanged.
SLURM_GPUS = 4


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the Slurm test starts slurmctld/slurmd as root: run it as root", pytrace=False)
    missing = missing_commands()
    if missing:
        pytest.fail(f"Slurm/munge not installed (missing {', '.join(missing)}): run "
                    "tests/cluster/install_slurm.sh (apt-get install slurm-wlm munge)", pytrace=False)
    root = tmp_path_factory.mktemp("slurm")
    cluster = SlurmCluster(root, gpus=SLURM_GPUS)
    try:
        cluster.start()
    except SlurmClusterError as e:
        pytest.fail(f"could not start the Slurm test cluster:\n{e}", pytrace=False)
    print(f"\nslurm: munged + slurmctld + slurmd up, node idle, in {cluster.startup_seconds:.1f} s")
    try:
        yield cluster
    finally:
        forced = cluster.stop()
        assert not forced, "Slurm teardown had to force-stop:\n" + "\n".join(forced) + "\n" + cluster.logs()
