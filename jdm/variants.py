"""The methods of the paper's two tables, in one place: what each row is, where its models live and how
it is labelled. The stages, the evaluation, the report, the command line and the flows all read this.

Table 1 (controllable generation): JDM, the multi-step ControlNet, and the baselines and ablations of
the paper's Sec. 4.2, each differing from JDM in one thing. Table 3 (one-step text-to-image): students
trained from the Diff-Instruct generator with plain score distillation, CFG in the real score, human
feedback, or decoupled CFG. docs/method.md explains each; docs/design.md why they are trained as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

MODELS = Path("models")
JDM_MODELS = MODELS / "jdm"
BASELINES = MODELS / "baselines"


@dataclass(frozen=True)
class Variant:
    """A model trained by the warm-up phases' machinery: JDM itself, or a baseline that changes one thing.
    Phase 1 writes <root>/generator and <root>/fake_score; phase 2 writes <root>/controlnet-<c>,
    starting from the frozen generator and fake score in <source>. A variant with `own_warmup` runs its
    own phase 1, whose ControlNet is its row for the warm-up's condition, as JDM's is."""

    method: str
    root: Path
    source: Path = JDM_MODELS
    overrides: tuple = ()           # jdm params changed, (key, value) pairs
    with_controlnet: bool = True
    own_warmup: bool = False
    on_warmup_condition: bool = True  # False: no row on the warm-up's condition (see `full-range`)


VARIANTS = {
    "jdm": Variant("jdm", JDM_MODELS, own_warmup=True),
    # Diff-Instruct: the one-step student of plain score distillation (no condition term, no ControlNet)
    "di": Variant("di", BASELINES / "di", overrides=(("condition_weight", 0.0),), with_controlnet=False,
                  own_warmup=True),
    # Eq. 12: a ControlNet trained by the plain VSD/DI loss on the DI generator: nothing asks it to obey c
    "implicit": Variant("implicit", BASELINES / "implicit", source=BASELINES / "di", overrides=(("condition_weight", 0.0),)),
    # ablation: the extension phase on the DI generator instead of the jointly warmed-up one
    "wo-warmup": Variant("wo-warmup", BASELINES / "wo-warmup", source=BASELINES / "di"),
    # ablation: the condition gradient from log p(c | x) on the generator output, not via f(x_t, t), in
    # both phases: its own warm-up too, so no row of it inherits a generator trained with the modelling
    "wo-modelling": Variant("wo-modelling", BASELINES / "wo-modelling", source=BASELINES / "wo-modelling",
                            overrides=(("condition_on_x", True),), own_warmup=True),
    # the paper's Eq. 5 at every t: JDM's extension with the condition term over the whole distillation
    # range (condition_t_max null) instead of t <= condition_t_max, on JDM's own warm-up generator. No row
    # on the warm-up's condition: JDM's row there is phase 1's ControlNet, trained with the generator, and
    # a full-range phase 1 would change the generator too, so the rows would differ in two things
    "full-range": Variant("full-range", BASELINES / "full-range", overrides=(("condition_t_max", None),),
                          on_warmup_condition=False),
}

# ControlNets trained by denoising (jdm/training/controlnet.py) rather than by the JDM objective
CONTROLNET_BASELINES = {"controlnet-50": BASELINES / "controlnet-50",  # on the teacher, sampled with 50 steps + CFG
                        "denoising": BASELINES / "denoising"}          # Eq. 11, on the frozen DI generator

# what `jdm baseline METHOD` trains (paper/dvc.yaml)
TRAINED_BASELINES = ("di", "denoising", "implicit", "wo-warmup", "wo-modelling", "full-range")

# Table 1's rows: method -> (folder of the one-step generator, or None for the teacher sampled with 50
# steps + CFG; folder holding controlnet-<c>)
METHODS = {
    "jdm": (JDM_MODELS, JDM_MODELS),
    "controlnet-50": (None, CONTROLNET_BASELINES["controlnet-50"]),
    "di-controlnet": (VARIANTS["di"].root, CONTROLNET_BASELINES["controlnet-50"]),  # the teacher's ControlNet
    "denoising": (VARIANTS["di"].root, CONTROLNET_BASELINES["denoising"]),
    "implicit": (VARIANTS["di"].root, VARIANTS["implicit"].root),
    "wo-warmup": (VARIANTS["di"].root, VARIANTS["wo-warmup"].root),
    "wo-modelling": (VARIANTS["wo-modelling"].root, VARIANTS["wo-modelling"].root),
    "full-range": (JDM_MODELS, VARIANTS["full-range"].root),
}
LABELS = {"jdm": "JDM (one step)", "controlnet-50": "ControlNet (DM), multi-step + CFG",
          "di-controlnet": "DI + teacher's ControlNet", "denoising": "ControlNet via denoising (Eq. 11)",
          "implicit": "implicit ControlNet, plain VSD (Eq. 12)", "wo-warmup": "JDM w/o warm-up (DI generator)",
          "wo-modelling": "JDM w/o modelling log p(c|x_t)", "full-range": "JDM, condition term at every t (Eq. 5)"}

# Table 3's students, each the DI generator trained further, and the jdm params each changes; `hfl`'s
# condition weight is text_to_image.reward_weight (REWARD_WEIGHT marks it)
REWARD_WEIGHT = "text_to_image.reward_weight"
TEXT_TO_IMAGE_VARIANTS = {
    "di": {"condition_weight": 0.0},
    "coupled-cfg": {"condition_weight": 0.0},
    # guidance is an exact score of the guidance model: no t-range restriction (that is for f(x_t, t))
    "decoupled-cfg": {"condition_weight": 1.0, "condition_t_max": None},
    "hfl": {"condition_weight": REWARD_WEIGHT},
    "hfl-on-x": {"condition_weight": REWARD_WEIGHT, "condition_on_x": True},
}
TEXT_ROWS = ("teacher", "di", "coupled-cfg", "hfl", "decoupled-cfg", "hfl-on-x")  # Table 3's rows, in order
TEXT_LABELS = {"teacher": "teacher, multi-step + CFG", "di": "Diff-Instruct (DI)",
               "coupled-cfg": "coupled CFG (in the real score, DMD-style)", "hfl": "JDM w/ HFL (reward via f(x_t, t))",
               "decoupled-cfg": "JDM w/ decoupled CFG (stronger guide)", "hfl-on-x": "HFL on x (Fig. 6 ablation)"}


def text_to_image_overrides(variant: str, reward_weight: float) -> dict:
    """The jdm params Table 3's `variant` trains with, its reward weight filled in."""
    return {k: reward_weight if v == REWARD_WEIGHT else v for k, v in TEXT_TO_IMAGE_VARIANTS[variant].items()}


def has_row(method: str, condition: str, warmup_condition: str) -> bool:
    """Whether Table 1 has a row of `method` on `condition` (`full-range` has none on the warm-up's)."""
    variant = VARIANTS.get(method)
    return variant is None or variant.on_warmup_condition or condition != warmup_condition


def require_row(method: str, condition: str, warmup_condition: str) -> None:
    """Refuse, naming what is allowed, a row the table does not have."""
    if not has_row(method, condition, warmup_condition):
        raise UserError(f"{method} has no row on {condition!r}, the warm-up's condition (warmup.condition): JDM's "
                        f"row there is the warm-up's ControlNet, trained with the generator, so a {method} row "
                        f"would differ from it in more than one thing; {method} runs on any other condition")


def variant_phase(method: str, name: str, warmup_condition: str) -> str:
    """`warmup` for a variant's own phase 1 (DI's, whatever the condition; the others' on the warm-up's
    condition), else `extend`."""
    v = VARIANTS[method]
    own_phase1 = v.own_warmup and (not v.with_controlnet or name == warmup_condition)
    return "warmup" if own_phase1 else "extend"
