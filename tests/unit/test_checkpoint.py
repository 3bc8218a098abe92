"""Checkpoints: everything a run needs comes back, a damaged or unwritable file costs nothing written before."""

import resource
import signal

import pytest
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from jdm.stages.common import recording
from jdm.training.checkpoint import Checkpointer, CheckpointSpec
from jdm.training.errors import CheckpointWriteFailed, TrainingDiverged
from jdm.training.loop import check_trainable_fp32, run_steps


def players(seed=0):
    """A model with every kind of state a training stage checkpoints: weights, AdamW (state keyed by
    int), a warm-up + cosine LR schedule, an EMA, a data RNG."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = get_cosine_schedule_with_warmup(opt, 2, 20)
    ema = EMAModel(model.parameters(), decay=0.9)
    rng = torch.Generator().manual_seed(seed + 1)
    return model, opt, sched, ema, rng


def train(model, opt, sched, ema, rng, steps, ckpt=None, start=0):
    def step_fn(step):
        x = torch.randn(4, 3, generator=rng)
        loss = ((model(x) - x) ** 2).mean() + 1e-3 * torch.rand(()).item()  # uses the global RNG too
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        ema.step(model.parameters())
    if ckpt is None:
        for step in range(start + 1, steps + 1):
            step_fn(step)
        return 0
    return run_steps(ckpt, steps, step_fn)


def checkpointer(path, objs, settings=None, every=2, keep=2):
    model, opt, sched, ema, rng = objs
    return Checkpointer(path, settings or {"lr": 0.1}, every, {"model": model, "opt": opt, "sched": sched, "ema": ema},
                        {"data": rng}, keep=keep)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_resume_is_bit_identical_to_an_unbroken_run_and_keeps_a_bounded_number(tmp_path):
    unbroken = players()
    train(*unbroken, steps=10)

    first = players()
    train(*first, steps=7, ckpt=checkpointer(tmp_path, first))      # as if killed after step 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004.safetensors", "step-00000006.safetensors"]
    resumed = players(seed=5)                                          # a fresh process: other weights and RNGs
    assert run_steps(checkpointer(tmp_path, resumed), 10, lambda s: train(*resumed, steps=s, start=s - 1)) == 6
    assert all(torch.equal(a, b) for a, b in zip(weights(unbroken[0]), weights(resumed[0])))
    assert all(torch.equal(a, b) for a, b in zip(unbroken[3].shadow_params, resumed[3].shadow_params))
    assert unbroken[2].get_last_lr() == resumed[2].get_last_lr()
    assert torch.equal(unbroken[4].get_state(), resumed[4].get_state())
    assert not list(tmp_path.glob("*.tmp*"))


def test_other_settings_start_afresh_and_replace_the_old_files(tmp_path):
    objs = players()
    train(*objs, steps=4, ckpt=checkpointer(tmp_path, objs))
    other = players(seed=3)
    before = weights(other[0])
    ckpt = checkpointer(tmp_path, other, settings={"lr": 0.2})
    assert ckpt.restore() == 0 and all(torch.equal(a, b) for a, b in zip(before, weights(other[0])))
    ckpt.save(2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002.safetensors"]


def curve_run(objs, steps, spec=None):
    """Train `steps`, logging a validation record (the weights' norm) every 2 steps as the stages do;
    with `spec`, checkpoint every 4 steps and keep the records beside the checkpoints."""
    model, opt, sched, ema, rng = objs
    curve = []
    record = recording(lambda step, values: None, curve, keep=spec.records if spec else None)

    def step_fn(step):
        train(*objs, steps=step, start=step - 1)
        if step % 2 == 0:
            record(step, {"eval_norm": sum(p.norm().item() for p in model.parameters()), "loss": 0.0})
    if spec is None:
        for step in range(1, steps + 1):
            step_fn(step)
    else:
        run_steps(spec.checkpointer({"model": model, "opt": opt, "sched": sched, "ema": ema}, {"data": rng}), steps, step_fn)
    return curve


def test_a_resumed_run_continues_its_curve_row_for_row(tmp_path):
    unbroken = curve_run(players(), 10)
    assert [r["step"] for r in unbroken] == [2, 4, 6, 8, 10]
    spec = CheckpointSpec(tmp_path, {"lr": 0.1}, every=4)
    assert [r["step"] for r in curve_run(players(), 7, spec)] == [2, 4, 6]   # as if killed after step 7
    with spec.records.open("a") as f:
        f.write('{"step": 8, "eval_no')                                        # and mid-append
    # resumed from step 4: steps 5-10 are trained again, their records replace the killed run's
    assert curve_run(players(seed=5), 10, spec) == unbroken
    # other settings neither read these records nor, when they replace the checkpoints, lose their own
    other = CheckpointSpec(tmp_path, {"lr": 0.2}, every=4)
    assert other.records != spec.records
    assert [r["step"] for r in curve_run(players(), 6, other)] == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.records.name, "step-00000004.safetensors"])


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not safetensors"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_is_used(tmp_path, damage, caplog):
    objs = players()
    train(*objs, steps=6, ckpt=checkpointer(tmp_path, objs))
    newest = tmp_path / "step-00000006.safetensors"
    data = bytearray(newest.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped byte":
        data[-5] ^= 0xFF  # inside the last tensor's bytes: only the CRC can see it
    else:
        data = b"\x80\x04 not a checkpoint"
    newest.write_bytes(bytes(data))
    again = players(seed=9)
    assert checkpointer(tmp_path, again).restore() == 4
    assert f"checkpoint {newest} is unreadable" in caplog.text


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: the file-size limit, EFBIG like ENOSPC)."""
    objs = players()
    ckpt = checkpointer(tmp_path, objs)
    train(*objs, steps=2, ckpt=ckpt)
    good = (tmp_path / "step-00000002.safetensors").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, hard))
    try:
        with pytest.raises(CheckpointWriteFailed, match=r"could not write checkpoint .*step-00000004.*at step 4 .*"
                                                        r"the checkpoint of step 2 is kept"):
            train(*objs, steps=4, ckpt=ckpt, start=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002.safetensors"]  # no partial file left
    assert (tmp_path / "step-00000002.safetensors").read_bytes() == good


def test_a_nan_gradient_with_a_finite_loss_stops_with_the_step_and_the_checkpoint(tmp_path):
    objs = players()
    model = objs[0]
    ckpt = checkpointer(tmp_path, objs)
    from jdm.training.loop import check_finite

    def step_fn(step):
        x = torch.randn(4, 3)
        out = model(x)
        # sqrt'(0) is inf: at step 5 the gradient is NaN while the loss stays finite
        loss = out.pow(2).mean() + (torch.sqrt(out[0, 0] * 0) if step == 5 else 0)
        loss.backward()
        check_finite(loss, model.parameters(), "toy")
        objs[1].step(), objs[1].zero_grad()

    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: toy gradient norm is nan \(loss [0-9.]+\); "
                                               r"the checkpoint of step 4 is kept in"):
        run_steps(ckpt, 10, step_fn)
    assert (tmp_path / "step-00000004.safetensors").is_file()


def test_half_precision_trainable_weights_are_refused():
    check_trainable_fp32(torch.nn.Linear(2, 2).parameters(), "ok")
    frozen = torch.nn.Linear(2, 2).half().requires_grad_(False)
    check_trainable_fp32(frozen.parameters(), "a frozen half-precision teacher is fine")
    with pytest.raises(ValueError, match=r"the toy has trainable weights in \['torch.bfloat16'\]"):
        check_trainable_fp32(torch.nn.Linear(2, 2).bfloat16().parameters(), "the toy")
