"""Shared test setup: compiled artifacts go to the repo's .cache (kept between runs, ignored by git)."""

import os
from pathlib import Path

os.environ.setdefault("IREE_RUNNER_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "iree"))
