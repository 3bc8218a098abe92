"""Every DVC stage depends on exactly the code it runs (infra/stage_deps.py reads it off the source):
an edit to a stage's code reruns that stage, and an edit elsewhere reruns nothing."""

import sys

from ..conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import stage_deps  # noqa: E402


def test_every_stage_lists_exactly_the_code_it_runs():
    mismatches = stage_deps.mismatches()
    assert not mismatches, "run `python infra/stage_deps.py --write`:\n" + "\n".join(
        f"{name}: missing {sorted(missing)}, extra {sorted(extra)}" for name, (missing, extra) in mismatches.items())


def test_the_code_of_a_stage_follows_its_imports_into_the_library():
    data = stage_deps.stage_code("jdm.stages.foundation", "run_data")
    assert {"jdm/stages/foundation.py", "jdm/stages/common.py", "jdm/data.py", "jdm/text.py", "jdm/io.py"} <= data
    assert not any(f.startswith(("jdm/annotators/", "jdm/training/", "jdm/models/")) for f in data)
    # the generator update: the phase stage -> training/phases.py -> training/jdm.py -> objectives.py
    warmup = stage_deps.stage_code("jdm.stages.phases", "run_jdm_phase")
    assert {"jdm/training/phases.py", "jdm/training/jdm.py", "jdm/objectives.py", "jdm/variants.py",
            "jdm/models/lora.py"} <= warmup
    assert "jdm/cli.py" not in warmup and "jdm/stages/text_to_image.py" not in warmup
    # a helper of a sibling stage module brings its own imports
    report = stage_deps.stage_code("jdm.stages.report", "run_report")
    assert "jdm/stages/evaluation.py" in report and "jdm/report.py" in report


def test_a_command_is_traced_through_the_cli_to_the_function_it_runs():
    assert stage_deps.command_code("jdm baseline denoising hed") == \
        stage_deps.stage_code("jdm.stages.baselines", "run_controlnet_baseline")
    assert stage_deps.command_code("jdm baseline implicit hed") == \
        stage_deps.stage_code("jdm.stages.phases", "run_jdm_phase")


def test_imports_for_annotations_only_are_not_code_a_stage_runs():
    import ast

    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jdm import rewards\n"
                     "else:\n    from jdm import metrics\nfrom jdm import io\n")
    assert stage_deps._imports(tree, "jdm.x", False) == {"jdm", "jdm.io", "jdm.metrics"}
