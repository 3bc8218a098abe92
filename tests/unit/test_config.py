import re
import subprocess

import pytest
import yaml

from jdm.config import PROFILES, ParamsError, load_params, parse_params
from jdm.profiles import profile_params, render_profile

from ..conftest import REPO


def raw(profile="tiny"):
    return yaml.safe_load(render_profile(profile, REPO))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_valid(profile):
    assert profile_params(profile, REPO).profile == profile


def test_an_overlay_holds_only_what_differs_from_the_base(tmp_path):
    base = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    for name in ("smoke", "sd15"):
        overlay = yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text())

        def same_as_base(over, under):
            return [k for k, v in over.items() if k in under and (same_as_base(v, under[k]) if isinstance(v, dict)
                                                                   else v == under[k]) and k != "profile"]
        assert not same_as_base(overlay, base), name
    # an overlay's typo is named like any params file's
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text((REPO / "profiles" / "tiny.yaml").read_text())
    (tmp_path / "profiles" / "smoke.yaml").write_text("profile: smoke\nteacher:\n  stepz: 3\n")
    with pytest.raises(ParamsError, match="teacher.stepz: unknown key"):
        profile_params("smoke", tmp_path)


def test_committed_params_is_the_embedded_default():
    assert (REPO / "params.yaml").read_text() == (REPO / "profiles" / "tiny.yaml").read_text()


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["teacher"].update(stepz=3), ["teacher.stepz: unknown key", "allowed here:", "steps"]),
    (lambda r: r["teacher"].update(steps=-5), ["teacher.steps", "greater than 0", "-5"]),
    (lambda r: r["teacher"].update(lr="fast"), ["teacher.lr", "'fast'"]),
    (lambda r: r.update(profile="huge"), ["profile", "'smoke', 'tiny' or 'sd15'", "'huge'"]),
    (lambda r: r["data"].update(image_size=20), ["multiple of 8", "20"]),
    (lambda r: r["data"].update(templates=["no slot"]), ["'no slot'", "'{}'"]),
    (lambda r: r["data"].update(templates=[]), ["data.templates", "at least 1 item"]),
    (lambda r: r["checkpoint"].update(keep=0), ["checkpoint.keep", "greater than 0"]),
    (lambda r: r["evaluation"].update(sampler="euler"), ["evaluation.sampler", "'ddim' or 'unipc'"]),
    (lambda r: r.update(bogus={}), ["bogus: unknown key", "teacher"]),
    (lambda r: r["guide"].update(text_encoder={"kind": "minilm"}), ["guide.text_encoder is for a pretrained guide"]),
    (lambda r: r["acceleration"].update(mixed_precision="fp16"), ["acceleration.mixed_precision", "'no' or 'bf16'", "'fp16'"]),
    (lambda r: r["acceleration"].update(compile="tensorrt"), ["acceleration.compile", "'inductor'", "'tensorrt'"]),
    (lambda r: r["jdm"].update(real_guidance_scale=0), ["jdm.real_guidance_scale", "greater than 0"]),
    (lambda r: r["evaluation"].update(control_samples=900),
     ["evaluation.control_samples (900) + jdm.eval_samples (256)", "data.num_eval (1000)", "overlap"]),
])
def test_bad_params_name_the_key_and_what_is_allowed(edit, expected):
    r = raw()
    edit(r)
    with pytest.raises(ParamsError) as err:
        parse_params(r)
    for text in expected:
        assert text in str(err.value)


def test_stage_rejects_bad_params_before_any_work(tmp_path):
    r = raw("smoke")
    r["teacher"]["steps"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(r))
    out = subprocess.run(["jdm", "data"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    assert "teacher.steps" in out.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_profile_switch_keeps_user_edits(tmp_path):
    (tmp_path / "profiles").mkdir()
    for p in PROFILES:
        (tmp_path / "profiles" / f"{p}.yaml").write_text((REPO / "profiles" / f"{p}.yaml").read_text())
    params = tmp_path / "params.yaml"
    def run(*args):
        return subprocess.run(["jdm", "profile", *args], cwd=tmp_path, capture_output=True, text=True)
    assert run("smoke").returncode == 0 and load_params(params).profile == "smoke"
    assert run("tiny").returncode == 0 and load_params(params).profile == "tiny"
    edited = params.read_text().replace("seed: 0", "seed: 7")
    params.write_text(edited)
    out = run("smoke")
    assert out.returncode == 2 and "--force" in out.stderr
    assert params.read_text() == edited  # nothing lost
    assert run("smoke", "--force").returncode == 0 and load_params(params).profile == "smoke"
    assert run("nope").returncode == 2


def test_unreadable_params_files_are_named(tmp_path):
    (tmp_path / "params.yaml").write_text("teacher:\n  steps: [1,\n")
    with pytest.raises(ParamsError, match=r"params.yaml is not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match=r"nowhere.yaml not found: run from the repository root"):
        load_params(tmp_path / "nowhere.yaml")


def test_seed_params_move_the_seed_and_nothing_else(tmp_path):
    from jdm.profiles import seed_params

    text = seed_params(REPO / "profiles" / "tiny.yaml", 2)
    assert text.startswith("# generated from tiny.yaml by `jdm seed-params 2`")
    moved = yaml.safe_load(text)
    assert moved == {**raw("tiny"), "seed": raw("tiny")["seed"] + 2}
    assert parse_params(moved).seed == raw("tiny")["seed"] + 2
    with pytest.raises(ParamsError, match=r"seed offset must be a positive integer \(got 0\)"):
        seed_params(REPO / "profiles" / "tiny.yaml", 0)


def test_params_are_read_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2: `no` unquoted and exponents without a dot.
    They must mean what DVC meant (YAML 1.1 would read False and the string '1e-4')."""
    text = (REPO / "params.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: no")
    text = re.sub(r"generator_lr: \S+", "generator_lr: 3e-5", text)
    assert "mixed_precision: no " in text and "generator_lr: 3e-5" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.acceleration.mixed_precision == "no" and params.jdm.generator_lr == 3e-5
