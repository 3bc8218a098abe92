"""`jdm sample --out`: a bad output path gets one line naming it and what is allowed, before any model
loads (no models folder exists here) and without writing anything."""

import pytest

from jdm.cli import main


def sample(tmp_path, out):
    return main(["sample", "--condition", "hed", "--control", str(tmp_path / "hed.png"), "--prompt", "x",
                 "--out", str(out), "--models", str(tmp_path / "no-models")])


@pytest.mark.parametrize("out, expected", [
    ("", "is a directory; give an image file path, e.g."),
    ("boot", "has suffix '(none)'; allowed: .png, .jpg"),
    ("boot.txt", "has suffix '.txt'; allowed: .png, .jpg"),
])
def test_a_bad_out_path_is_named_before_any_work(tmp_path, capsys, out, expected):
    assert sample(tmp_path, tmp_path / out) == 2
    err = capsys.readouterr().err
    assert expected in err and str(tmp_path / out) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_missing_out_folder_is_made_and_an_unwritable_one_is_named(tmp_path, capsys):
    assert sample(tmp_path, tmp_path / "new" / "boot.png") == 2  # fails later, on the missing models folder
    assert (tmp_path / "new").is_dir() and "--out" not in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert sample(tmp_path, tmp_path / "file" / "boot.png") == 2
    assert "cannot make the folder of --out" in capsys.readouterr().err
