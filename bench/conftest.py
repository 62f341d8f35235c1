"""pytest-benchmark entry (``pytest bench --benchmark-only``): the bench scripts' own cases, so a
change can be compared with a saved run (``--benchmark-autosave``, then ``--benchmark-compare``)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
