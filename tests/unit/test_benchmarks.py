"""The inference benchmark runs on smoke and writes what `make bench` reports: images per second and
latency of the one-step and multi-step paths, and their ratios. Which path is faster is the benchmark's
finding (benchmarks/results/), measured side by side in one process; no test asserts a timing."""

import json
import subprocess
import sys

from ..conftest import REPO


def test_inference_benchmark_writes_both_paths_and_their_ratios_on_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/inference.py", "--profile", "smoke", "--batch", "4",
                          "--steps", "4", "--repeats", "1", "--rounds", "1", "--results", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "inference_smoke.json").read_text())
    assert result["nfe"] == {"one_step": 1, "multi_step": 4}
    assert result["batch"] == 4 and result["resolution"] == 16
    assert set(result["images_per_s"]) == {"one_step", "one_step_inference_mode", "one_step_channels_last", "multi_step"}
    assert all(v > 0 for v in result["images_per_s"].values()) and set(result["latency_ms_batch1"]) == {"one_step", "multi_step"}
    assert result["speedup_throughput"] == result["images_per_s"]["one_step"] / result["images_per_s"]["multi_step"]
    assert "faster at batch 4" in out.stdout
