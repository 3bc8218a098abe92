"""One JDM iteration on the real players (UNet + ControlNet generator, LoRA fake score), smoke-sized:
which weights each update touches, and the frozen generator of phase 2."""

import torch

from jdm.conditions import load_condition
from jdm.config import JDMParams
from jdm.models.backbone import Backbone
from jdm.models.lora import base_parameters, consistency_mode
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule, generator_loss
from jdm.training.jdm import JDMSettings, JDMTrainer, context_rows
from jdm.models.fake_score import build_fake_score
from jdm.training.phases import ControlData, build_generator, unet_players


def setup(smoke_params, freeze_unet: bool, **jdm):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    p = smoke_params.teacher
    teacher = build_unet(p.unet, 16, 1, 32).eval().requires_grad_(False)
    schedule = VPSchedule.from_scheduler(build_noise_scheduler(p))
    condition, backbone = load_condition("canny", smoke_params), Backbone(1)
    images = torch.rand(32, 1, 16, 16, generator=g)
    data = ControlData(condition.extract(images), torch.randint(1, 5, (32,), generator=g),
                       torch.randn(5, 4, 32, generator=g), torch.ones(5, 4, dtype=torch.long))
    generator = build_generator(teacher, schedule, condition, backbone, t_gen=900)
    if freeze_unet:
        generator.unet.requires_grad_(False)
    fake, lora = build_fake_score(teacher, lora_rank=4)
    players = unet_players(generator, teacher, fake, condition, data, backbone, g)
    settings = JDMSettings.from_params(JDMParams(**{"fake_steps": 2, "condition_t_max": 0.5, **jdm}))
    trainer = JDMTrainer(players, schedule, settings,
                         generator_optimizer=torch.optim.AdamW([q for q in generator.parameters() if q.requires_grad], lr=1e-3),
                         fake_optimizer=torch.optim.AdamW(base_parameters(fake), lr=1e-3),
                         lora_optimizer=torch.optim.AdamW(lora, lr=1e-3), lora_params=lora, batch_size=8, rng=g)
    return trainer, generator, teacher, fake, lora, data


def snapshot(params):
    return [q.detach().clone() for q in params]


def changed(before, params):
    return any(not torch.equal(a, b.detach()) for a, b in zip(before, params))


def test_controlnet_starts_as_a_no_op(smoke_params):
    trainer, generator, _, _, _, data = setup(smoke_params, freeze_unet=False)
    z = torch.randn(4, 1, 16, 16)
    hidden, mask = data.hidden[data.prompt_ids[:4]], data.mask[data.prompt_ids[:4]]
    with torch.no_grad():
        plain = generator(z, hidden, mask)
        controlled = generator(z, hidden, mask, {"canny": data.maps[:4]})
    assert torch.equal(plain, controlled)  # zero convolutions: the control adds nothing until trained


def test_phase1_updates_generator_controlnet_fake_score_and_lora_but_not_the_teacher(smoke_params):
    trainer, generator, teacher, fake, lora, _ = setup(smoke_params, freeze_unet=False)
    before = {k: snapshot(v) for k, v in {"unet": generator.unet.parameters(), "controlnet": generator.controlnets.parameters(),
                                          "teacher": teacher.parameters(), "fake": base_parameters(fake), "lora": lora}.items()}
    for _ in range(2):
        logs = trainer.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert logs["condition_norm"] > 0 and logs["fidelity_norm"] > 0
    assert changed(before["unet"], generator.unet.parameters())
    assert changed(before["controlnet"], generator.controlnets.parameters())
    assert changed(before["fake"], base_parameters(fake)) and changed(before["lora"], lora)
    assert not changed(before["teacher"], teacher.parameters())


def test_phase2_leaves_the_generator_unet_byte_identical(smoke_params):
    trainer, generator, _, _, _, _ = setup(smoke_params, freeze_unet=True)
    unet_before = {k: v.clone() for k, v in generator.unet.state_dict().items()}
    cn_before = snapshot(generator.controlnets.parameters())
    for _ in range(2):
        trainer.step()
    assert all(torch.equal(unet_before[k], v) for k, v in generator.unet.state_dict().items())
    assert changed(cn_before, generator.controlnets.parameters())


def test_lora_switches_between_fake_score_and_consistency_model(smoke_params):
    trainer, _, _, fake, lora, _ = setup(smoke_params, freeze_unet=False)
    for q in lora:
        torch.nn.init.normal_(q, std=0.1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    h, m = torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        off = fake(x, t, encoder_hidden_states=h, encoder_attention_mask=m).sample
        with consistency_mode(fake):
            on = fake(x, t, encoder_hidden_states=h, encoder_attention_mask=m).sample
        off_again = fake(x, t, encoder_hidden_states=h, encoder_attention_mask=m).sample
    assert not torch.allclose(on, off) and torch.equal(off, off_again)



def test_the_merged_lora_is_the_same_consistency_model_and_leaves_the_fake_score_as_it_was(smoke_params):
    _, _, _, fake, lora, _ = setup(smoke_params, freeze_unet=False)
    for q in lora:
        torch.nn.init.normal_(q, std=0.1)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([10, 300, 500, 900])
    h, m = torch.randn(4, 4, 32), torch.ones(4, 4, dtype=torch.long)

    def fake_score():
        with torch.no_grad():
            return fake(x, t, encoder_hidden_states=h, encoder_attention_mask=m).sample

    before = fake_score()

    def consistency(merged):
        """The consistency model's output, its loss's gradient to the LoRA and to its input."""
        x_in = x.clone().requires_grad_(True)
        with consistency_mode(fake, merged):
            out = fake(x_in, t, encoder_hidden_states=h, encoder_attention_mask=m).sample
            *to_lora, to_x = torch.autograd.grad((out ** 2).sum(), [*lora, x_in])
        return out.detach(), to_lora, to_x

    def close(a, b):
        """Equal up to float rounding, relative to the whole tensor: an element near zero in a gradient
        of norm ~100 may differ by 1e-5 after another order of the same sums (measured at one thread)."""
        return (a - b).norm() <= 1e-4 * b.norm()

    (peft_out, peft_lora, peft_x), (merged_out, merged_lora, merged_x) = consistency(False), consistency(True)
    assert close(merged_out, peft_out) and close(merged_x, peft_x)
    assert all(close(a, b) for a, b in zip(merged_lora, peft_lora))
    assert not torch.equal(merged_out, peft_out)  # computed another way, not peft's path again
    # after the block: the fake score again (adapter off, LoRA frozen to its losses), on peft's own layers
    assert torch.equal(fake_score(), before)
    assert not any(q.requires_grad for q in lora)
    assert not any("forward" in vars(module) for module in fake.modules())

def test_guided_real_score_is_the_teachers_cfg(smoke_params):
    """`real_guidance_scale` s: the real score is eps(null) + s (eps(y) - eps(null)) of the teacher, with the
    null prompt at index 0 of the table; s = 1 leaves the plain prompt-conditioned teacher."""
    from jdm.objectives import cfg_eps

    trainer, generator, teacher, fake, _, data = setup(smoke_params, freeze_unet=False)
    condition, backbone = load_condition("canny", smoke_params), Backbone(1)
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([100, 500, 900])
    pid = data.prompt_ids[:3]
    ctx = {"prompt_ids": pid, "hidden": data.hidden[pid], "mask": data.mask[pid]}
    null = {"hidden": data.hidden[[0, 0, 0]], "mask": data.mask[[0, 0, 0]]}
    with torch.no_grad():
        eps_y = teacher(x_t, t, encoder_hidden_states=ctx["hidden"], encoder_attention_mask=ctx["mask"]).sample
        eps_null = teacher(x_t, t, encoder_hidden_states=null["hidden"], encoder_attention_mask=null["mask"]).sample
        guided = unet_players(generator, teacher, fake, condition, data, backbone, g, real_guidance_scale=3.0)
        plain = unet_players(generator, teacher, fake, condition, data, backbone, g)
        assert torch.allclose(guided.real_eps(x_t, t, ctx), cfg_eps(eps_y, eps_null, 3.0), atol=1e-5)
        assert torch.equal(plain.real_eps(x_t, t, ctx), eps_y)
        assert not torch.allclose(eps_y, eps_null)  # the prompts matter, so the test can fail


def test_the_whole_range_of_t_stays_on_the_schedule(smoke_params):
    """t_max and condition_t_max of 1.0 mean the schedule's last timestep, T - 1 (the full-range row): no
    timestep drawn, nor a rung of the consistency ladder, falls off the end of the schedule."""
    for condition_t_max in (1.0, None):
        trainer, *_ = setup(smoke_params, freeze_unet=True, t_max=1.0, condition_t_max=condition_t_max)
        last = trainer.schedule.num_timesteps - 1
        assert trainer.t_range[1] == last and int(trainer.ladder.max()) == last
        assert trainer.cond_t_max in (last, None)
        logs = trainer.step()
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


def test_the_condition_gradient_is_taken_only_on_the_rows_that_use_it(smoke_params):
    """The consistency model's passes run on the rows with t <= condition_t_max alone, and the update
    equals the whole batch's condition gradient with the other rows zeroed (up to float reassociation)."""
    trainer, *_ = setup(smoke_params, freeze_unet=True, condition_weight=0.3)
    g = torch.Generator().manual_seed(1)
    x, ctx = trainer.p.sample(8, True)
    t = torch.tensor([100, 900, 200, 800, 400, 999, 10, 600])
    eps = torch.randn(x.shape, generator=g)
    x_t = trainer.schedule.noisy(x.detach(), eps, t)
    whole = trainer._condition_grad(ctx, x_t, t)
    rows = t <= trainer.cond_t_max
    assert 0 < rows.sum() < len(t)  # both kinds of row, so the test can fail
    asked = []

    def on_rows(a, b, r):
        asked.append(r.clone())
        return trainer._condition_grad(context_rows(ctx, r), a, b)

    kwargs = dict(real_eps=lambda a, b: trainer.p.real_eps(a, b, ctx), fake_eps=lambda a, b: trainer.p.fake_eps(a, b, ctx),
                  condition_weight=0.3, condition_t_max=trainer.cond_t_max)
    sub = generator_loss(x, t, eps, trainer.schedule, condition=on_rows, **kwargs)
    masked = generator_loss(x, t, eps, trainer.schedule, condition=lambda a, b, r: whole[r], **kwargs)
    assert len(asked) == 1 and torch.equal(asked[0], rows)
    assert whole[rows].abs().max() > 0
    assert torch.allclose(sub.loss, masked.loss, rtol=1e-5)
    assert abs(sub.condition_norm - masked.condition_norm) < 1e-4 * masked.condition_norm
    assert sub.fidelity_norm == masked.fidelity_norm


def test_a_lora_that_merging_would_change_is_refused_and_left_as_it_was():
    import pytest
    from peft import LoraConfig, inject_adapter_in_model

    from jdm.models.lora import ADAPTER

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=0.1), model, adapter_name=ADAPTER)
    model[0].lora_dropout[ADAPTER] = torch.nn.Identity()  # the first layer could merge, the last could not
    with pytest.raises(ValueError, match="merge_lora: false"):
        with consistency_mode(model, merged=True):
            pass
    assert not any("forward" in vars(module) for module in model.modules())
