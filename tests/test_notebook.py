"""notebooks/cohort_evaluation.ipynb runs top to bottom (nbmake) on a small trained run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cohort_notebook_executes(slide_run, tmp_path):
    _, _, run = slide_run
    start = time.time() - 1
    env = dict(os.environ, WSIMAMBA_RUN_DIR=str(run), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake", "--nbmake-timeout=300",
         "-o", "addopts=", str(ROOT / "notebooks" / "cohort_evaluation.ipynb")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    # the notebook drew heatmaps of held-out slides into the run folder
    fresh = [p for p in (run / "heatmaps").glob("*.png") if p.stat().st_mtime >= start]
    assert len(fresh) >= 3
