"""The two-phase warm-up (Sec. 3.2.1) on UNets: players built from the teacher, bound to data.

Phase 1 (warm-up): generator UNet and the primary condition's ControlNet trained jointly.
Phase 2 (extension): the generator UNet frozen; only a new ControlNet trained, same objective.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..conditions import Condition
from ..config import AccelerationParams
from ..data import EMPTY_PROMPT_ID
from ..errors import UserError
from ..models.backbone import Backbone
from ..models.generator import OneStepGenerator, controlnet_from_unet
from ..objectives import VPSchedule, cfg_condition_grad, cfg_eps
from ..variants import TEXT_TO_IMAGE_VARIANTS
from .checkpoint import CheckpointSpec
from .jdm import Players
from .parallel import Shard

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from ..config import JDMParams
    from ..rewards import RewardNet


@dataclass
class ControlData:
    """What the generator is conditioned on: prompt ids with their embeddings, and control maps drawn
    from p(c) (maps of real images, with the prompt of the image they came from); `maps` None for a
    text-to-image student, which draws prompts only."""

    maps: torch.Tensor | None   # [M,C,H,W] in [0,1]
    prompt_ids: torch.Tensor    # [M]
    hidden: torch.Tensor        # [P,L,D]
    mask: torch.Tensor          # [P,L]
    images: torch.Tensor | None = None  # [M,C,H,W] the images the maps came from: only the denoising
                                        # baselines train on them; JDM needs none

    def to(self, device: torch.device | str) -> "ControlData":
        """The tensors networks read, on `device`; prompt ids stay on the CPU, where batches are drawn."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return replace(self, maps=move(self.maps), hidden=move(self.hidden), mask=move(self.mask))


def build_generator(teacher_unet: UNet2DConditionModel, schedule: VPSchedule, condition: Condition, backbone: Backbone,
                    t_gen: int, unet: UNet2DConditionModel | None = None, with_controlnet: bool = True) -> OneStepGenerator:
    """Phase 1: a fresh copy of the teacher UNet; phase 2: the given (frozen) generator UNet. Without
    ControlNet: a plain one-step text-to-image student (the Diff-Instruct baseline)."""
    unet = copy.deepcopy(teacher_unet).requires_grad_(True) if unet is None else unet
    controlnets = {condition.name: controlnet_from_unet(unet, condition.channels, backbone.factor)} if with_controlnet else {}
    return OneStepGenerator(unet, controlnets, schedule, t_gen)


def prompt_and_null(unet: UNet2DConditionModel, hidden: torch.Tensor, mask: torch.Tensor
                    ) -> Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]:
    """`eps(x_t, t, ctx) -> (eps(x_t, y), eps(x_t, null))` from one batched pass, as CFG samplers do;
    `hidden`/`mask` [P,L,D]/[P,L] are the prompt table this model reads, looked up by `ctx["prompt_ids"]`."""
    def eps(x_t, t, ctx):
        n, pid = len(x_t), ctx["prompt_ids"]
        table_hidden, table_mask = hidden.to(x_t.device), mask.to(x_t.device)
        null_hidden, null_mask = table_hidden[EMPTY_PROMPT_ID], table_mask[EMPTY_PROMPT_ID]
        both_hidden = torch.cat([table_hidden[pid], null_hidden.expand(n, *null_hidden.shape)])
        both_mask = torch.cat([table_mask[pid], null_mask.expand(n, *null_mask.shape)])
        out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=both_hidden,
                   encoder_attention_mask=both_mask).sample
        return out.chunk(2)
    return eps


def unet_players(generator: OneStepGenerator, teacher_unet: UNet2DConditionModel, fake_score: UNet2DConditionModel,
                 condition: Condition | None, data: ControlData, backbone: Backbone, rng: torch.Generator,
                 prompt_dropout: float = 0.0, with_condition: bool = True, real_guidance_scale: float = 1.0,
                 shard: Shard = Shard()) -> Players:
    """Bind prompts and controls: the generator and the condition see the control, the teacher and
    the fake score see only the prompt (docs/method.md: the teacher never needs to understand c).
    `with_condition=False` drops the condition term: plain score distillation (Diff-Instruct, Eq. 12).
    `real_guidance_scale` s != 1 guides the real score with the teacher's classifier-free guidance
    (DMD's coupled form): the student then matches the distribution the teacher samples with CFG s,
    the one the evaluation's reference and ControlNet-50 are drawn from. Without control maps in
    `data` (and `condition` None) the student is text-to-image only. `shard`: this process's rows of the
    batches every process draws from `rng` (jdm/training/parallel.py)."""
    name = condition.name if condition is not None else None
    controlled = name in generator.names
    size = (data.maps.shape[-1] // backbone.factor if data.maps is not None
            else generator.unet.config.sample_size)

    def sample(n: int, grad: bool):
        idx = shard.draw(lambda m: torch.randint(len(data.prompt_ids), (m,), generator=rng), n)
        pid = data.prompt_ids[idx]
        if prompt_dropout:
            pid = torch.where(shard.draw(lambda m: torch.rand(m, generator=rng), n) < prompt_dropout, EMPTY_PROMPT_ID, pid)
        ctx = {"prompt_ids": pid, "hidden": data.hidden[pid], "mask": data.mask[pid],
               "control": data.maps[idx] if data.maps is not None else None}
        z = shard.draw(lambda m: torch.randn((m, backbone.channels, size, size), generator=rng), n).to(data.hidden.device)
        with torch.set_grad_enabled(grad):
            return generator(z, ctx["hidden"], ctx["mask"], {name: ctx["control"]} if controlled else {}), ctx

    def eps_of(unet):
        return lambda x_t, t, ctx: unet(x_t, t, encoder_hidden_states=ctx["hidden"],
                                        encoder_attention_mask=ctx["mask"]).sample

    real_eps = eps_of(teacher_unet)
    if real_guidance_scale != 1.0:
        teacher_pair = prompt_and_null(teacher_unet, data.hidden, data.mask)
        real_eps = lambda x_t, t, ctx: cfg_eps(*teacher_pair(x_t, t, ctx), real_guidance_scale)  # noqa: E731
    log_likelihood = lambda x0, ctx: condition.log_likelihood(backbone.decode_differentiable(x0), ctx["control"])  # noqa: E731
    return Players(sample=sample, real_eps=real_eps, fake_eps=eps_of(fake_score), fake_score=fake_score,
                   log_likelihood=log_likelihood if with_condition else None)


def text_to_image_players(variant: str, generator: OneStepGenerator, teacher_unet: UNet2DConditionModel,
                          fake_score: UNet2DConditionModel, data: ControlData, backbone: Backbone, schedule: VPSchedule,
                          rng: torch.Generator, *, guidance_scale: float = 1.0, guide_unet: UNet2DConditionModel | None = None,
                          guide_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, reward: RewardNet | None = None,
                          prompt_dropout: float = 0.0, shard: Shard = Shard()) -> Players:
    """The players of one text-to-image variant (no ControlNet):

    - `di`: plain score distillation (Diff-Instruct);
    - `coupled-cfg`: CFG inside the real score, the teacher's eps guided at `guidance_scale` (DMD's way);
    - `decoupled-cfg`: the teacher's unguided real score for fidelity, and as the condition term the
      classifier-free guidance of `guide_unet`, another model (-(w / sigma_t)(eps_g(y) - eps_g(null)),
      w = guidance_scale - 1), taken directly at x_t; `guide_embeddings` (hidden [P,L,D], mask [P,L] by
      prompt id) when the guide reads prompts through its own encoder (SD 2.1 guiding SD 1.5);
    - `hfl`, `hfl-on-x`: the reward as log p(preferred | x) (Eq. 9), through the consistency model f(x_t, t)
      or on the generator's output (the caller sets `condition_on_x`, the paper's Fig. 6 ablation).
    """
    if variant not in TEXT_TO_IMAGE_VARIANTS:
        raise ValueError(f"unknown text-to-image variant {variant!r}; available: {', '.join(TEXT_TO_IMAGE_VARIANTS)}")
    # the variants of Table 3 differ in how the prompt is enforced: only coupled CFG guides the real score
    players = unet_players(generator, teacher_unet, fake_score, None, data, backbone, rng, prompt_dropout,
                           with_condition=False,
                           real_guidance_scale=guidance_scale if variant == "coupled-cfg" else 1.0, shard=shard)
    if variant == "coupled-cfg":
        return players
    if variant == "decoupled-cfg":
        if guide_unet is None:
            raise ValueError("decoupled-cfg needs a guidance model (guide_unet)")
        guide_pair = prompt_and_null(guide_unet, *((data.hidden, data.mask) if guide_embeddings is None else guide_embeddings))

        def condition_grad(x_t, t, ctx):
            with torch.no_grad():
                return cfg_condition_grad(*guide_pair(x_t, t, ctx), schedule.coeffs(t, x_t)[1], guidance_scale - 1)
        return replace(players, condition_grad=condition_grad)
    if variant in ("hfl", "hfl-on-x"):
        if reward is None:
            raise ValueError(f"{variant} needs a reward model")
        return replace(players, log_likelihood=lambda x0, ctx: reward(backbone.decode_differentiable(x0)))
    return players


def _adam(groups, p) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=tuple(p.adam_betas), weight_decay=0.0)


def train_phase(generator: OneStepGenerator, teacher_unet: UNet2DConditionModel, fake_score: UNet2DConditionModel,
                condition: Condition | None, data: ControlData, backbone: Backbone, schedule: VPSchedule, p: JDMParams,
                steps: int, *,
                train_unet: bool, seed: int, checkpoint: CheckpointSpec | None, log: Callable[[int, dict], None],
                evaluate: Callable[[], dict] | None = None,
                make_players: Callable[[torch.Generator, ControlData, Shard], Players] | None = None,
                frozen: Sequence[torch.nn.Module] = (), acceleration: AccelerationParams = AccelerationParams()) -> int:
    """Run one warm-up phase for `steps` JDM iterations (p: the `jdm` params section); return the step
    it resumed from (0 = a fresh start).

    Phase 1 (`train_unet=True`) trains the generator UNet and the ControlNet; phase 2 only the
    ControlNet (the UNet is frozen and never handed to an optimiser). Checkpoints as `checkpoint`
    says and resumes from there; at the end the generator holds its EMA weights when `p.ema_decay` > 0.
    `evaluate()` (validation scores, of the EMA weights when there is an EMA) is logged at step 0 and
    every `p.eval_every` steps, so a run's convergence can be watched in MLflow. `make_players(rng,
    data, shard)` replaces the condition's players (text-to-image variants), `frozen` the networks those
    players run besides teacher and fake score.

    Every network and `data` train on accelerate's device in `acceleration`'s precision,
    and are back on the CPU when it returns (jdm/training/accel.py). Under `accelerate launch` each of
    N processes trains on its 1/N of the `p.batch_size` rows one process would draw, the gradients
    averaged (jdm/training/parallel.py), so the result does not depend on N beyond float rounding;
    only the main process logs and validates, every process checkpoints its own copy (identical
    state) and all resume from the newest step they share.
    """
    from diffusers.training_utils import EMAModel

    from ..models.lora import base_parameters, lora_parameters
    from .accel import compile_networks, make_accelerator
    from .loop import check_trainable_fp32, run_steps
    from .jdm import JDMSettings, JDMTrainer

    accelerator = make_accelerator(acceleration)
    shard = Shard.of(accelerator)
    if p.batch_size % shard.count:
        raise UserError(f"jdm.batch_size {p.batch_size} does not split over {shard.count} processes: it is the batch "
                         f"of all processes together, so it must be a multiple of their number")
    networks = [generator, teacher_unet, fake_score, backbone, *frozen]  # a condition's network follows its input
    for net in networks:
        net.to(accelerator.device)
    # the consistency LoRA's parameters from the placed model: moving keeps Parameter objects only
    # where the devices' tensors can share `.data` (CPU, CUDA; not the meta device)
    lora = lora_parameters(fake_score)
    data = data.to(accelerator.device)
    rng = torch.Generator().manual_seed(seed)  # the same stream on every process: each keeps its shard
    torch.manual_seed(seed)
    generator.unet.requires_grad_(train_unet)
    groups = [{"params": list(generator.controlnets.parameters()), "lr": p.controlnet_lr}] if generator.names else []
    if train_unet:
        groups.append({"params": list(generator.unet.parameters()), "lr": p.generator_lr})
    trained = [q for group in groups for q in group["params"]]
    check_trainable_fp32(trained + list(fake_score.parameters()), "the one-step generator or the fake score")
    if make_players is None:
        players = unet_players(generator, teacher_unet, fake_score, condition, data, backbone, rng, p.prompt_dropout,
                               with_condition=p.condition_weight > 0, real_guidance_scale=p.real_guidance_scale,
                               shard=shard)
    else:
        players = make_players(rng, data, shard)
    trainer = JDMTrainer(players, schedule, JDMSettings.from_params(p), generator_optimizer=_adam(groups, p),
                         fake_optimizer=_adam([{"params": base_parameters(fake_score), "lr": p.fake_lr}], p),
                         lora_optimizer=_adam([{"params": lora, "lr": p.lora_lr}], p), lora_params=lora,
                         batch_size=p.batch_size // shard.count, rng=rng, shard=shard,
                         merge_lora=acceleration.merge_lora)
    ema = EMAModel(trained, decay=p.ema_decay) if p.ema_decay else None
    stateful = {"controlnets": generator.controlnets, "fake_score": fake_score, "lora_target": trainer.lora_target,
                "generator_optimizer": trainer.gen_opt, "fake_optimizer": trainer.fake_opt,
                "lora_optimizer": trainer.lora_opt}
    if train_unet:
        stateful["unet"] = generator.unet
    if ema is not None:
        stateful["generator_ema"] = ema
    checkpoints = checkpoint.checkpointer(stateful, {"data": rng}, accelerator) if checkpoint is not None else None
    main = accelerator.is_main_process
    compile_networks([generator.unet, *generator.controlnets.values(), teacher_unet, fake_score, *frozen], acceleration)

    def validate(step: int) -> None:
        """Score the weights the phase will save: the EMA's, swapped in and back (diffusers' recipe)."""
        if ema is not None:
            ema.store(trained)
            ema.copy_to(trained)
        try:
            log(step, evaluate())
        finally:
            if ema is not None:
                ema.restore(trained)

    validating = main and evaluate is not None and p.eval_every

    def step_fn(step: int) -> None:
        if step == 1 and validating:
            validate(0)  # a fresh start's curve begins at the initialisation, before any update
        with accelerator.autocast():
            logs = trainer.step()
        if ema is not None:
            ema.step(trained)
        if main and (step % p.log_every == 0 or step == steps):
            log(step, logs)
        if validating and step % p.eval_every == 0:
            validate(step)

    start = run_steps(checkpoints, steps, step_fn, accelerator)
    if ema is not None:
        ema.copy_to(trained)
    for net in networks:
        net.cpu()
    return start
