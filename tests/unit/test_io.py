import subprocess
import sys

import pytest
import torch

from jdm.io import atomic_dir, load_tensors, save_tensors


def test_failed_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        save_tensors({"x": torch.ones(3)}, d / "a.safetensors")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            save_tensors({"x": torch.zeros(3)}, d / "a.safetensors")
            (d / "half").write_text("partial")
            raise RuntimeError("killed mid-write")
    assert torch.equal(load_tensors(out / "a.safetensors")["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors"]


def test_success_replaces_the_output(tmp_path):
    out = tmp_path / "out"
    for value in (1.0, 2.0):
        with atomic_dir(out) as d:
            save_tensors({"x": torch.full((2,), value)}, d / "a.safetensors")
    assert load_tensors(out / "a.safetensors")["x"].tolist() == [2.0, 2.0]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)


def test_saved_bytes_do_not_depend_on_the_process(tmp_path):
    """DVC hashes outputs: an unchanged tensor file must not change bytes from one process to the next
    (safetensors alone writes its metadata in a per-process random order)."""
    script = ("import sys, torch; from jdm.io import save_tensors; "
              "save_tensors({'b': torch.ones(3), 'a': torch.zeros(2)}, sys.argv[1], "
              "metadata={'condition': 'hed', 'channels': 1, 'source': 'x', 'model': 'y', 'size': 8})")
    written = []
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
        written.append(path.read_bytes())
    assert all(b == written[0] for b in written)
    assert load_tensors(tmp_path / "0.safetensors")["b"].tolist() == [1.0, 1.0, 1.0]
