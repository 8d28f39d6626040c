"""scripts/gpu_check.py cannot rot: its dry run (CPU, tiny sizes, a phantom) runs every step the GPU run does."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check  # noqa: E402


def test_the_gpu_check_dry_run(tmp_path, capsys, no_figures):
    lines = gpu_check.main(["--dry_run", "--out", str(tmp_path)])
    assert not [line for line in lines if "FAILED" in line], lines
    assert sorted(name for name in os.listdir(tmp_path) if os.path.isfile(tmp_path / name)) == sorted(
        ["env.json", "bench256.json", "cv.txt", "cv_metrics.json", "summary.md"])
    assert json.loads((tmp_path / "cv_metrics.json").read_text())["split"].startswith("out-of-fold")
    assert "x naive" in (tmp_path / "summary.md").read_text()
