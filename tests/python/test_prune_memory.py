"""Pruning is bounded: rewriting a large shard to drop one changed row holds about a row group,
not the shard. Measured with `benches/prune_rss.py` (the README's numbers come from it too):
peak RSS of the rerun that prunes, against the first run's own peak.
"""
import json
import subprocess
import sys

from vp_helpers import REPO

ROWS = 400  # 4x128x128 f32 latents at 1024²: 256 KiB a row, a 100 MiB shard


def test_prune_peak_rss_stays_within_a_row_group_of_the_run(binary, cards, tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "benches" / "prune_rss.py"), str(binary), str(cards["avgpool8"]), str(ROWS)],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["shard_mib"] > 90, m
    # One row group is at most 64 MiB of tensors; a prune that read the shard whole would add the
    # shard's size (and a filtered copy of it) on top of the run's own peak.
    assert m["prune_run_peak_mib"] <= m["first_run_peak_mib"] + 64, m
