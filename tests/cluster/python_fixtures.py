"""The fixtures of tests/python/conftest.py (`shared`, `binary`, `cards`) for the cluster tests,
loaded once under another module name so that the conftest.py files do not clash. The Slurm and
the Ray conftest both import them from here; `vp_helpers` comes from tests/python too."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PYTHON_TESTS = Path(__file__).resolve().parents[1] / "python"
if str(PYTHON_TESTS) not in sys.path:
    sys.path.insert(0, str(PYTHON_TESTS))

if "vp_python_conftest" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("vp_python_conftest", PYTHON_TESTS / "conftest.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["vp_python_conftest"] = _module
    _spec.loader.exec_module(_module)
_conftest = sys.modules["vp_python_conftest"]

shared = _conftest.shared
binary = _conftest.binary
cards = _conftest.cards
