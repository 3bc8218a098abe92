"""Table 3's variants on smoke-sized UNets: decoupled CFG's condition term comes from the guidance
model alone, the coupled baseline guides the real score, HFL's condition is the reward."""

import pytest
import torch

from jdm.config import JDMParams
from jdm.models.backbone import Backbone
from jdm.models.fake_score import build_fake_score
from jdm.models.lora import base_parameters
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule, cfg_condition_grad, cfg_eps, generator_loss
from jdm.rewards import RewardNet
from jdm.training.jdm import JDMSettings, JDMTrainer, Players, context_rows
from jdm.training.phases import ControlData, build_generator, text_to_image_players
from jdm.variants import TEXT_TO_IMAGE_VARIANTS

SCALE = 3.0


class Recording(torch.nn.Module):
    """A UNet that records the prompts (encoder hidden states) of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x_t, t, encoder_hidden_states, encoder_attention_mask):
        self.calls.append(encoder_hidden_states.detach().clone())
        return self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)


def setup(smoke_params, variant: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    p = smoke_params.teacher
    teacher = build_unet(p.unet, 16, 1, 32).eval().requires_grad_(False)
    guide = build_unet(p.unet, 16, 1, 32).eval().requires_grad_(False)  # another model: other weights
    schedule = VPSchedule.from_scheduler(build_noise_scheduler(p))
    backbone = Backbone(1)
    hidden = torch.randn(5, 4, 32, generator=g)
    data = ControlData(None, torch.randint(1, 5, (64,), generator=g), hidden, torch.ones(5, 4, dtype=torch.long))
    generator = build_generator(teacher, schedule, None, backbone, t_gen=900, with_controlnet=False)
    fake, lora = build_fake_score(teacher, lora_rank=4)
    teacher_rec, guide_rec = Recording(teacher), Recording(guide)
    reward = RewardNet(8, 16).eval().requires_grad_(False)
    players = text_to_image_players(variant, generator, teacher_rec, fake, data, backbone, schedule, g,
                                    guidance_scale=SCALE, guide_unet=guide_rec, reward=reward)
    return players, schedule, teacher, guide, teacher_rec, guide_rec, reward, data, fake, lora, g


def eps(unet, x_t, t, hidden, mask):
    return unet(x_t, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample


def test_decoupled_cfg_gradient_comes_from_the_guide_and_the_teacher_keeps_its_plain_real_score(smoke_params):
    players, schedule, teacher, guide, teacher_rec, guide_rec, _, data, _, _, g = setup(smoke_params, "decoupled-cfg")
    x, ctx = players.sample(6, False)
    t = torch.randint(20, 980, (6,), generator=g)
    x_t = schedule.noisy(x, torch.randn(x.shape, generator=g), t)
    null_hidden = data.hidden[0].expand(6, -1, -1)
    with torch.no_grad():
        grad = players.condition_grad(x_t, t, ctx)
        expected = -((SCALE - 1) / schedule.coeffs(t, x_t)[1]) * (eps(guide, x_t, t, ctx["hidden"], ctx["mask"])
                                                                   - eps(guide, x_t, t, null_hidden, ctx["mask"]))
        assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)
        assert grad.abs().max() > 0
        # the teacher is not asked for guidance: its real score is the plain conditional one
        assert torch.equal(players.real_eps(x_t, t, ctx), eps(teacher, x_t, t, ctx["hidden"], ctx["mask"]))

    # in a generator update the teacher runs once, on the prompt only; the guide once, prompt and null batched
    teacher_rec.calls.clear(), guide_rec.calls.clear()
    x, ctx = players.sample(6, True)
    terms = generator_loss(x, t, torch.randn(x.shape, generator=g), schedule,
                           real_eps=lambda a, b: players.real_eps(a, b, ctx), fake_eps=lambda a, b: players.fake_eps(a, b, ctx),
                           condition=lambda a, b, rows: players.condition_grad(a, b, context_rows(ctx, rows)))
    assert len(teacher_rec.calls) == 1 and torch.equal(teacher_rec.calls[0], ctx["hidden"])
    assert len(guide_rec.calls) == 1 and torch.equal(guide_rec.calls[0], torch.cat([ctx["hidden"], null_hidden]))
    # the fake score starts as the teacher's copy: fidelity is 0 and the update is the guide's alone
    assert terms.condition_norm > 0 and terms.fidelity_norm == 0


def test_coupled_cfg_puts_the_teachers_guidance_in_the_real_score_and_equals_decoupled_with_the_teacher_as_guide(smoke_params):
    players, schedule, teacher, _, _, _, _, data, _, _, g = setup(smoke_params, "coupled-cfg")
    assert players.condition_grad is None and players.log_likelihood is None
    x, ctx = players.sample(4, False)
    t = torch.randint(20, 980, (4,), generator=g)
    x_t = schedule.noisy(x, torch.randn(x.shape, generator=g), t)
    with torch.no_grad():
        e_y = eps(teacher, x_t, t, ctx["hidden"], ctx["mask"])
        e_null = eps(teacher, x_t, t, data.hidden[0].expand(4, -1, -1), ctx["mask"])
        assert torch.allclose(players.real_eps(x_t, t, ctx), e_null + SCALE * (e_y - e_null), atol=1e-5)
        # fidelity against the CFG'd teacher = unguided fidelity + decoupled CFG with the teacher as guide
        sigma = schedule.coeffs(t, x_t)[1]
        e_fake = torch.randn_like(e_y)
        coupled = (e_fake - cfg_eps(e_y, e_null, SCALE)) / sigma
        decoupled = (e_fake - e_y) / sigma + cfg_condition_grad(e_y, e_null, sigma, SCALE - 1)
        assert torch.allclose(coupled, decoupled, atol=1e-4)


def test_hfl_condition_is_the_reward_through_the_consistency_model_or_on_x(smoke_params):
    for variant in ("hfl", "hfl-on-x"):
        players, schedule, _, _, _, _, reward, _, fake, lora, g = setup(smoke_params, variant)
        x, ctx = players.sample(4, False)
        assert torch.equal(players.log_likelihood(x, ctx), reward((x + 1) / 2))
        settings = JDMSettings.from_params(JDMParams(condition_on_x=variant == "hfl-on-x", condition_t_max=0.5))
        trainer = JDMTrainer(players, schedule, settings,
                             generator_optimizer=torch.optim.AdamW(players.fake_score.parameters(), lr=0),
                             fake_optimizer=torch.optim.AdamW(base_parameters(fake), lr=1e-3),
                             lora_optimizer=torch.optim.AdamW(lora, lr=1e-3), lora_params=lora, batch_size=4, rng=g)
        # the reward's gradient at x_t (through f) or at x: non-zero, as the generator will follow it
        t = torch.full((4,), 100)
        assert trainer._condition_grad(ctx, schedule.noisy(x, torch.randn_like(x), t), t).abs().sum() > 0


def test_variants_refuse_what_they_cannot_use(smoke_params):
    players, schedule, *_ = setup(smoke_params, "di")
    assert players.condition_grad is None and players.log_likelihood is None
    with pytest.raises(ValueError, match="unknown text-to-image variant 'cfg'; available: " + ", ".join(TEXT_TO_IMAGE_VARIANTS)):
        setup(smoke_params, "cfg")
    both = Players(players.sample, players.real_eps, players.fake_eps, players.fake_score,
                   log_likelihood=lambda x0, ctx: x0.sum(), condition_grad=lambda x_t, t, ctx: x_t)
    with pytest.raises(ValueError, match="give one of the two"):
        JDMTrainer(both, schedule, JDMSettings.from_params(JDMParams()), generator_optimizer=None, fake_optimizer=None,
                   lora_optimizer=None, lora_params=[], batch_size=2, rng=torch.Generator())


def test_decoupled_cfg_guide_reads_prompts_through_its_own_encoder(smoke_params):
    """SD 2.1 guiding SD 1.5: the guide takes its own (wider) prompt states, looked up by prompt id; the
    teacher and the generator keep theirs."""
    players, schedule, teacher, _, _, _, _, data, fake, _, g = setup(smoke_params, "di")
    guide = build_unet(smoke_params.teacher.unet, 16, 1, 48).eval().requires_grad_(False)
    table = (torch.randn(5, 4, 48, generator=g), torch.ones(5, 4, dtype=torch.long))
    generator = build_generator(teacher, schedule, None, Backbone(1), t_gen=900, with_controlnet=False)
    players = text_to_image_players("decoupled-cfg", generator, teacher, fake, data, Backbone(1), schedule, g,
                                    guidance_scale=SCALE, guide_unet=guide, guide_embeddings=table)
    x, ctx = players.sample(6, False)
    t = torch.randint(20, 980, (6,), generator=g)
    x_t = schedule.noisy(x, torch.randn(x.shape, generator=g), t)
    pid = ctx["prompt_ids"]
    with torch.no_grad():
        expected = -((SCALE - 1) / schedule.coeffs(t, x_t)[1]) * (eps(guide, x_t, t, table[0][pid], table[1][pid])
                                                                   - eps(guide, x_t, t, table[0][0].expand(6, -1, -1),
                                                                         table[1][0].expand(6, -1)))
        assert torch.allclose(players.condition_grad(x_t, t, ctx), expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(players.real_eps(x_t, t, ctx), eps(teacher, x_t, t, ctx["hidden"], ctx["mask"]))


def test_a_pretrained_guide_that_cannot_guide_is_refused_naming_why(smoke_params):
    from diffusers import DDPMScheduler

    from jdm.errors import UserError
    from jdm.stages.text_to_image import _check_guide

    teacher = build_unet(smoke_params.teacher.unet, 16, 1, 32)
    epsilon, v = DDPMScheduler(), DDPMScheduler(prediction_type="v_prediction")
    _check_guide(build_unet(smoke_params.teacher.unet, 16, 1, 32), epsilon, teacher, 32, "guide-dir")  # fits
    with pytest.raises(UserError, match="guide.pretrained 'sd21' predicts 'v_prediction'; the decoupled CFG term"):
        _check_guide(teacher, v, teacher, 32, "sd21")
    with pytest.raises(UserError, match="reads 48-d prompt states, the prompt embeddings are 32-d: set guide.text_encoder"):
        _check_guide(build_unet(smoke_params.teacher.unet, 16, 1, 48), epsilon, teacher, 32, "sd21")
    with pytest.raises(UserError, match="takes 3 latent channels, the teacher 1"):
        _check_guide(build_unet(smoke_params.teacher.unet, 16, 3, 32), epsilon, teacher, 32, "sd21")


def test_table_3_summary_says_whether_each_comparison_is_outside_the_intervals():
    """A reward or accuracy difference is a claim only with its interval: the summary says which."""
    from jdm.report import text_to_image_summary

    def row(method, reward, accuracy):
        return {"method": method, "reward_train": reward, "prompt_accuracy": accuracy,
                **{f"{key}{end}": value + delta for key, value in (("reward_heldout", reward), ("prompt_accuracy", accuracy))
                   for end, delta in (("", 0.0), ("_low", -0.1), ("_high", 0.1))}}

    rows = [row("di", -7.0, 0.60), row("coupled-cfg", -6.5, 0.90), row("decoupled-cfg", -6.45, 0.95)]
    lines = text_to_image_summary(rows)
    assert len(lines) == 2
    against_di, against_coupled = lines
    assert "held-out reward +0.550 (intervals disjoint)" in against_di
    assert "prompt accuracy +0.35 (intervals disjoint)" in against_di
    assert "held-out reward +0.050 (intervals overlap)" in against_coupled
    assert "prompt accuracy +0.05 (intervals overlap)" in against_coupled
    older = [{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in rows]  # files before intervals
    assert all("intervals" not in line for line in text_to_image_summary(older))
