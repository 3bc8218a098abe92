"""The comparison table's parts: FID with cached reference statistics, consistency, samplers and
latency, the denoising baselines' training, and the report."""

import numpy as np
import pytest
import torch

from jdm.conditions import load_condition
from jdm.evaluation import generate, latency_ms, multi_step_sampler, one_step_sampler, score
from jdm.metrics import FID, consistency
from jdm.models.backbone import Backbone
from jdm.models.generator import OneStepGenerator, controlnet_from_unet
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule
from jdm.report import summary, write_report
from jdm.training.controlnet import generator_regression_loss, teacher_loss, train_controlnet
from jdm.training.errors import TrainingDiverged
from jdm.training.phases import ControlData


class PixelFeatures(torch.nn.Module):
    """A fixed random projection of 8x8-pooled pixels: FID's maths without Inception's cost."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 16)
        g = torch.Generator().manual_seed(0)  # every instance the same network, as Inception is
        torch.nn.init.normal_(self.proj.weight, generator=g)
        torch.nn.init.normal_(self.proj.bias, generator=g)

    @torch.no_grad()
    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 8).flatten(1))


def images(n, seed, brightness=0.5):
    g = torch.Generator().manual_seed(seed)
    return (brightness + 0.2 * torch.randn(n, 1, 16, 16, generator=g)).clamp(0, 1)


def test_fid_reference_state_is_reused_exactly():
    reference, same, brighter = images(200, 0), images(200, 1), images(200, 2, brightness=0.8)
    fid = FID(PixelFeatures())
    fid.set_reference(reference)
    direct = (fid(same), fid(brighter))
    cached = FID(PixelFeatures())
    cached.load_reference_state(fid.reference_state())
    assert cached.num_reference == 200
    assert (cached(same), cached(brighter)) == pytest.approx(direct, rel=1e-6)
    assert direct[0] < 0.1 * direct[1]  # same distribution vs a shifted one
    assert fid(reference) == pytest.approx(0.0, abs=1e-3)


def test_inception_fid_tells_a_shifted_set_from_the_same_distribution():
    """The TF-Inception features FID is defined with (`smoke` turns Inception off to keep CI short;
    tiny and sd15 use it): 2048 finite features per image, and a FID that sees a shift."""
    from jdm.metrics import InceptionFeatures

    features = InceptionFeatures()
    feats = features(images(4, 0))
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all()
    fid = FID(features)
    fid.set_reference(images(24, 0))
    assert fid(images(24, 1)) < 0.5 * fid(images(24, 2, brightness=0.8))


def test_consistency_is_zero_for_the_exact_extractor(smoke_params, tmp_path):
    canny = load_condition("canny", smoke_params, tmp_path)
    x = images(8, 3)
    maps = canny.extract(x)
    assert consistency(canny, x, maps) == 0.0
    assert consistency(canny, x, 1 - maps) > 0.5


@pytest.fixture
def teacher(smoke_params):
    torch.manual_seed(0)
    unet = build_unet(smoke_params.teacher.unet, 16, 1, 32).eval().requires_grad_(False)
    return unet, build_noise_scheduler(smoke_params.teacher)


def text(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 32, generator=g), torch.ones(n, 4, dtype=torch.long)


def test_samplers_are_seeded_and_count_their_evaluations(teacher):
    unet, noise_scheduler = teacher
    backbone = Backbone(1)
    hidden, mask = text(6)
    generator = OneStepGenerator(unet, {}, VPSchedule.from_scheduler(noise_scheduler), 950)
    one = one_step_sampler(generator, None, backbone, 16)
    multi = multi_step_sampler(unet, noise_scheduler.config, backbone, 16, text(1, 9), steps=3, guidance_scale=2.0,
                               sampler="ddim")
    assert (one.nfe, multi.nfe) == (1, 3)
    for sampler in (one, multi):
        a = generate(sampler, hidden, mask, None, batch_size=4, seed=5)
        assert a.shape == (6, 1, 16, 16) and 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, generate(sampler, hidden, mask, None, batch_size=4, seed=5))
        assert not torch.equal(a, generate(sampler, hidden, mask, None, batch_size=4, seed=6))
    assert latency_ms(multi, hidden, mask, None, repeats=2) > latency_ms(one, hidden, mask, None, repeats=2)


def test_score_reports_sample_counts_beside_fid(smoke_params, tmp_path, monkeypatch):
    canny = load_condition("canny", smoke_params, tmp_path)
    fid = FID(PixelFeatures())
    fid.set_reference(images(40, 0))
    # prompt accuracy is the classifier's, tested with it; here the score's own bookkeeping
    monkeypatch.setattr("jdm.evaluation.prompt_accuracy", lambda classifier, samples, classes: 0.25)
    x = images(20, 1)
    out = score(x, canny.extract(x), torch.zeros(20), canny, None, {"pixels": fid})
    assert out["num_samples"] == 20 and out["num_reference"] == 40
    assert out["consistency"] == 0.0 and out["prompt_accuracy"] == 0.25 and out["fid_pixels"] > 0


def identity_data(n=64, size=16, seed=0):
    """Control maps that *are* the images: a ControlNet trained by denoising can learn to copy them."""
    x = images(n, seed)
    hidden, mask = text(3)
    return ControlData(maps=x, prompt_ids=torch.arange(n) % 3, hidden=hidden, mask=mask, images=x)


def test_eq11_denoising_controlnet_learns_to_transfer_the_control(teacher):
    unet, noise_scheduler = teacher
    generator = OneStepGenerator(unet, {}, VPSchedule.from_scheduler(noise_scheduler), 950)
    backbone, data = Backbone(1), identity_data()
    loss_fn = generator_regression_loss(generator)
    controlnet = controlnet_from_unet(unet, 1, 1)
    g = torch.Generator().manual_seed(1)
    x0 = backbone.encode(data.images[:32])
    hidden, mask = data.hidden[data.prompt_ids[:32]], data.mask[data.prompt_ids[:32]]
    before = loss_fn(controlnet, x0, data.maps[:32], hidden, mask, g).item()
    logs = []
    controlnet = train_controlnet(controlnet, loss_fn, data, backbone, steps=40, batch_size=16, lr=3e-3,
                                  prompt_dropout=0.0, seed=0, log=lambda step, values: logs.append(values["loss"]))
    g = torch.Generator().manual_seed(1)
    after = loss_fn(controlnet, x0, data.maps[:32], hidden, mask, g).item()
    assert after < 0.5 * before, (before, after, logs)
    assert all(not q.requires_grad for q in unet.parameters())  # the generator stays frozen


def test_teacher_controlnet_trains_resumes_and_stops_on_nan(teacher, tmp_path):
    unet, noise_scheduler = teacher
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}

    def fresh():  # the conditioning embedding is randomly initialised
        torch.manual_seed(1)
        return controlnet_from_unet(unet, 1, 1)
    controlnet = fresh()
    loss_fn = teacher_loss(unet, noise_scheduler, snr_gamma=5.0)
    trained = train_controlnet(controlnet, loss_fn, identity_data(), Backbone(1), steps=3, batch_size=8, lr=1e-3,
                               prompt_dropout=0.5, seed=0)
    zero_convs = [q for n, q in trained.named_parameters() if n.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero_convs and any(q.abs().sum() > 0 for q in zero_convs)  # the zero convolutions have moved
    assert all(torch.equal(frozen[k], v) for k, v in unet.state_dict().items())
    # interrupted after its checkpoint of step 2 and rerun: the same weights as the unbroken run above
    from jdm.training.checkpoint import CheckpointSpec

    class Crash(Exception):
        pass

    def crash_at_3(step, values):
        if step == 3:
            raise Crash()
    spec = CheckpointSpec(tmp_path, {"test": 1}, every=2)
    with pytest.raises(Crash):
        train_controlnet(fresh(), loss_fn, identity_data(), Backbone(1), steps=3, batch_size=8,
                         lr=1e-3, prompt_dropout=0.5, seed=0, log=crash_at_3, checkpoint=spec)
    resumed = train_controlnet(fresh(), loss_fn, identity_data(), Backbone(1), steps=3,
                               batch_size=8, lr=1e-3, prompt_dropout=0.5, seed=0, checkpoint=spec)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), resumed.state_dict().values()))

    nan_data = identity_data()
    nan_data.images[:] = float("nan")
    with pytest.raises(TrainingDiverged, match="diverged at step 1: ControlNet denoising loss is nan"):
        train_controlnet(controlnet_from_unet(unet, 1, 1), loss_fn, nan_data, Backbone(1), steps=3, batch_size=8,
                         lr=1e-3, prompt_dropout=0.0, seed=0)


def row(method, condition, fid, cons, nfe):
    return {"method": method, "condition": condition, "fid_inception": fid, "fid_classifier": fid / 100,
            "consistency": cons, "nfe": nfe, "latency_ms": 2.0 * nfe, "prompt_accuracy": 0.5, "num_samples": 100,
            "num_reference": 100}


def test_report_table_summary_and_page(tmp_path):
    rows = [row("jdm", "canny", 30.0, 0.10, 1), row("jdm", "hed", 40.0, 0.30, 1),
            row("controlnet-50", "canny", 20.0, 0.20, 50), row("controlnet-50", "hed", 30.0, 0.20, 50)]
    lines = summary(rows)
    assert len(lines) == 1 and "consistency better on 1/2" in lines[0]
    assert "ratio JDM/controlnet-50 = 1.40" in lines[0] and "NFE 1 vs 50" in lines[0]  # (30+40)/(20+30)
    samples = tmp_path / "samples"
    samples.mkdir()
    grid = (np.random.default_rng(0).random((17, 137, 3)) * 255).astype(np.uint8)
    from PIL import Image
    for r in rows:
        Image.fromarray(grid).save(samples / f"{r['method']}-{r['condition']}.png")
    out = tmp_path / "report"
    out.mkdir()
    write_report(rows, ["jdm", "controlnet-50"], ["canny", "hed"],
                 {"teacher": grid, "maps-canny": grid, "maps-hed": grid}, samples, out, "tiny")
    md = (out / "table.md").read_text()
    assert md.count("| JDM (one step) |") == 2 and "14.35 / 0.122 (NCT T1)" in md
    assert "100 samples vs 100 reference" in md
    page = (out / "index.html").read_text()
    assert page.count("<img ") == 2 * 4 and page.count("<tr><td>") == 4
    for name in ("maps-canny", "teacher", "jdm-hed", "controlnet-50-canny"):
        assert (out / f"{name}.png").is_file()
