"""The README's Makefile pattern, run as `make dataset`: a second make does nothing; a changed
image re-runs precompute (encoding only that image), verify and report."""
from __future__ import annotations

import shutil
import subprocess

from vp_helpers import REPO, require


def _make(images, out):
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "dataset", f"DATASET_IMAGES={images}", f"DATASET_OUT={out}"],
        capture_output=True, text=True,
    )


def test_make_dataset_rebuilds_only_what_changed(binary, shared, tmp_path):
    kodak = require(shared / "data" / "kodak", "Kodak images")
    images = tmp_path / "images"
    images.mkdir()
    for name in ["kodim01.png", "kodim02.png", "kodim03.png"]:
        shutil.copyfile(kodak / name, images / name)
    out = tmp_path / "out"

    first = _make(images, out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (out / "report" / "summary.json").exists() and (out / "shards" / ".verified").exists()

    second = _make(images, out)
    assert second.returncode == 0 and "Nothing to be done" in second.stdout, second.stdout + second.stderr

    shutil.copyfile(kodak / "kodim04.png", images / "kodim02.png")
    third = _make(images, out)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log
    assert "encoded 1 images, 2 already committed" in log, log
    assert "ok: 3 rows" in log and "report" in log, log
