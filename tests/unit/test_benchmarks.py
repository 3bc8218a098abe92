"""The CI regression check of issue 8: the inference benchmark on smoke must find the one-step path
faster than the 50-step ControlNet pipeline with CFG (a relation between two timings measured side by
side in one process, never an absolute time)."""

import json
import subprocess
import sys

from ..conftest import REPO


def test_one_step_path_is_faster_than_the_multi_step_path_on_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/inference.py", "--profile", "smoke", "--batch", "8",
                          "--repeats", "3", "--rounds", "1", "--results", str(tmp_path), "--check"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "inference_smoke.json").read_text())
    assert result["nfe"] == {"one_step": 1, "multi_step": 50}
    assert result["batch"] == 8 and result["resolution"] == 16
    assert result["speedup_throughput"] > 1 and result["speedup_latency"] > 1
    assert set(result["images_per_s"]) == {"one_step", "one_step_inference_mode", "one_step_channels_last", "multi_step"}
    assert "faster at batch 8" in out.stdout
