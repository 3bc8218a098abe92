"""`jdm sample --out`: a bad output path gets one line naming it and what is allowed, before any model
loads (no models folder exists here) and without writing anything."""

import pytest
import torch

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


@pytest.mark.parametrize("mode, channels, shape", [
    ("RGBA", 4, (1, 4, 8, 8)), ("RGB", 1, (1, 1, 8, 8)), ("L", 3, (1, 3, 8, 8)), ("LA", 2, (1, 2, 8, 8)),
    ("RGBA", None, (1, 3, 8, 8)), ("L", None, (1, 1, 8, 8))])
def test_a_control_image_is_read_as_the_channels_its_controlnet_takes(mode, channels, shape):
    from PIL import Image

    from jdm.pipeline import control_tensor

    c = control_tensor(Image.new(mode, (8, 8), 255 if mode == "L" else (255,) * len(mode)), "x", channels)
    assert c.shape == shape and c.dtype == torch.float32 and c.max() == 1


def test_a_control_image_cannot_hold_more_than_four_channels_or_sixteen_bit_colour():
    from PIL import Image

    from jdm.errors import UserError
    from jdm.pipeline import control_tensor

    with pytest.raises(UserError, match="takes 5 channels, more than an image holds"):
        control_tensor(Image.new("L", (8, 8)), "'m.png'", 5)
    with pytest.raises(UserError, match="'m.png' is 16-bit grayscale; the ControlNet takes 3 channels"):
        control_tensor(Image.new("I;16", (8, 8)), "'m.png'", 3)


def test_the_log_level_is_checked_before_any_work_and_applied(tmp_path, capsys, monkeypatch):
    import logging

    from jdm.cli import configure_logging

    monkeypatch.setenv("JDM_LOG_LEVEL", "loud")
    assert main(["--params", str(tmp_path / "params.yaml"), "profile", "smoke"]) == 2
    assert "JDM_LOG_LEVEL='LOUD'; allowed: DEBUG, INFO, WARNING, ERROR" in capsys.readouterr().err
    assert not (tmp_path / "params.yaml").exists()
    stage = logging.getLogger("jdm.stages.common")
    try:
        monkeypatch.setenv("JDM_LOG_LEVEL", "warning")
        configure_logging()
        stage.info("step 1: loss=0.5")
        stage.warning("checkpoint x is unreadable")
        assert capsys.readouterr().out == "WARNING: checkpoint x is unreadable\n"
        monkeypatch.setenv("JDM_LOG_LEVEL", "INFO")
        configure_logging()
        stage.info("step 1: loss=0.5")
        assert capsys.readouterr().out == "step 1: loss=0.5\n"  # results and progress as plain lines
        # the CLI's -q / -v win over the variable
        assert main(["-q", "--params", str(tmp_path / "params.yaml"), "profile", "smoke"]) == 0
        assert logging.getLogger("jdm").level == logging.WARNING
        assert main(["--verbose", "--params", str(tmp_path / "params.yaml"), "check"]) == 0
        assert logging.getLogger("jdm").level == logging.DEBUG
        assert main(["--params", str(tmp_path / "params.yaml"), "check"]) == 0
        assert logging.getLogger("jdm").level == logging.INFO
    finally:
        logging.getLogger("jdm").setLevel(logging.INFO)
