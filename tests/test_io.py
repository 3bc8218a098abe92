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
