"""The training loops' acceleration (jdm/training/accel.py), on CPU: bf16 autocast with float32
trainable weights, and torch.compile behind the flag, through the real loops on smoke-sized networks."""

import pytest
import torch

from jdm.conditions import load_condition
from jdm.config import AccelerationParams
from jdm.data import Split
from jdm.models.backbone import Backbone
from jdm.models.fake_score import build_fake_score
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule
from jdm.training.phases import ControlData, build_generator, train_phase
from jdm.training.teacher import train_teacher


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one precision per process (its AcceleratorState refuses a change, as a stage
    process never needs one); these tests train in several, so the state is reset around each, the
    way accelerate's own tests do."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class OutputDtypes:
    """The dtype of every output a UNet's forward returns (what autocast computed it in)."""

    def __init__(self, net: torch.nn.Module):
        self.seen = set()
        net.register_forward_hook(lambda _m, _i, out: self.seen.add(out.sample.dtype))


def jdm_phase(smoke_params, acceleration: AccelerationParams, steps: int = 2):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = build_unet(smoke_params.teacher.unet, 16, 1, 32).eval().requires_grad_(False)
    schedule = VPSchedule.from_scheduler(build_noise_scheduler(smoke_params.teacher))
    condition, backbone = load_condition("canny", smoke_params), Backbone(1)
    data = ControlData(condition.extract(torch.rand(32, 1, 16, 16, generator=g)), torch.randint(1, 5, (32,), generator=g),
                       torch.randn(5, 4, 32, generator=g), torch.ones(5, 4, dtype=torch.long))
    generator = build_generator(teacher, schedule, condition, backbone, t_gen=900)
    fake, _ = build_fake_score(teacher, lora_rank=4)
    teacher_dtypes, logs = OutputDtypes(teacher), []
    train_phase(generator, teacher, fake, condition, data, backbone, schedule, smoke_params.jdm, steps,
                train_unet=True, seed=0, checkpoint=None, log=lambda step, values: logs.append(values),
                acceleration=acceleration)
    return generator, fake, teacher_dtypes.seen, logs


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights(smoke_params):
    generator, fake, dtypes, logs = jdm_phase(smoke_params, AccelerationParams(mixed_precision="bf16"))
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(v)) for entry in logs for v in entry.values())
    assert logs[-1]["condition_norm"] > 0 and logs[-1]["fidelity_norm"] > 0
    assert {q.dtype for q in [*generator.parameters(), *fake.parameters()]} == {torch.float32}

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    ref_generator, _, ref_dtypes, _ = jdm_phase(smoke_params, AccelerationParams())
    assert ref_dtypes == {torch.float32}
    diffs = [(a - b).abs().max().item() for a, b in zip(generator.parameters(), ref_generator.parameters())]
    # the same run in another precision: moved apart (autocast is on), not far apart (it is the same run)
    assert 0 < max(diffs) < 0.05


def test_compile_flag_changes_no_result_and_no_state_dict_key(smoke_params):
    # backend `eager`: dynamo captures the graphs (generator, teacher, fake score with its LoRA switched
    # on and off, the EMA target's swapped weights) and runs them as captured, in seconds on CPU;
    # inductor compiles the same graphs for minutes here (README, Performance)
    torch._dynamo.reset()
    compiled, compiled_fake, _, compiled_logs = jdm_phase(smoke_params, AccelerationParams(compile="eager"))
    eager, eager_fake, _, eager_logs = jdm_phase(smoke_params, AccelerationParams())
    assert compiled.unet._compiled_call_impl is not None  # compiled in place ...
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # ... so checkpoints and saving see the same keys
    for a, b in zip([*compiled.state_dict().values(), *compiled_fake.state_dict().values()],
                    [*eager.state_dict().values(), *eager_fake.state_dict().values()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert compiled_logs[-1]["loss_generator"] == pytest.approx(eager_logs[-1]["loss_generator"], rel=1e-4)



def test_merged_lora_trains_the_phase_peft_trains_up_to_float_rounding(smoke_params):
    merged, merged_fake, _, merged_logs = jdm_phase(smoke_params, AccelerationParams(merge_lora=True))
    peft, peft_fake, _, peft_logs = jdm_phase(smoke_params, AccelerationParams())
    assert merged_fake.state_dict().keys() == peft_fake.state_dict().keys()  # peft's own layers again after each pass
    diffs = [(a - b).abs().max().item() for a, b in zip([*merged.state_dict().values(), *merged_fake.state_dict().values()],
                                                        [*peft.state_dict().values(), *peft_fake.state_dict().values()])]
    print(f"largest weight difference after the phase: {max(diffs):.3g}")
    assert 0 < max(diffs) < 1e-4  # rounded another way (not the same path again), yet the same training
    assert merged_logs[-1]["loss_consistency"] == pytest.approx(peft_logs[-1]["loss_consistency"], rel=1e-3)

def test_teacher_loop_autocasts_too(smoke_params):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (64, 1, 16, 16), generator=g, dtype=torch.uint8),
                  torch.randint(0, 10, (64,), generator=g), torch.randint(1, 5, (64,), generator=g))
    embeddings = (torch.randn(5, 4, 32, generator=g), torch.ones(5, 4, dtype=torch.long))
    p = smoke_params.teacher.model_copy(update={"steps": 2})
    conv_dtypes = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _i, out: conv_dtypes.add(out.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        unet, _ = train_teacher(p, train, embeddings, Backbone(1), seed=0,
                                acceleration=AccelerationParams(mixed_precision="bf16"))
    finally:
        hook.remove()
    assert conv_dtypes == {torch.bfloat16}
    assert {q.dtype for q in unet.parameters()} == {torch.float32}
