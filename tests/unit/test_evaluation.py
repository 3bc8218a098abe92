"""The comparison table's parts: FID and KID on features (clean-fid's), bootstrap intervals,
consistency, samplers and latency, the denoising baselines' training, and the report."""

import numpy as np
import pytest
import torch

from jdm.conditions import load_condition
from jdm.evaluation import FeatureSpace, generate, latency_ms, multi_step_sampler, one_step_sampler, score
from jdm.metrics import bootstrap, consistency, features, fid, fid_resampler, kid, kid_resampler
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


def test_fid_of_a_set_with_itself_is_zero_and_sees_a_shift():
    net = PixelFeatures()
    reference, same, brighter = (features(net, x) for x in (images(200, 0), images(200, 1), images(200, 2, 0.8)))
    assert reference.shape == (200, 16) and reference.dtype == np.float64
    assert fid(reference, reference) == pytest.approx(0.0, abs=1e-6)
    assert fid(same, reference) < 0.1 * fid(brighter, reference)


def test_kid_is_unbiased_for_one_distribution_positive_for_a_shift_and_deterministic():
    rng = np.random.default_rng(0)
    same = [kid(rng.normal(size=(100, 16)), rng.normal(size=(100, 16))) for _ in range(30)]
    # unbiased: the mean over independent pairs is 0 within its standard error, single values go negative
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) and min(same) < 0
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(100, 16))
    assert kid(a + 0.5, b) > 10 * np.std(same)
    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    assert kid(a, b) == kid(a, b)  # unequal sizes: clean-fid's subsets, drawn from a fixed seed
    assert np.array_equal(np.random.get_state()[1], state)  # ... and numpy's global RNG put back


def low_rank(n, d=256, rank=12, shift=0.0, seed=0):
    g = np.random.default_rng(seed)
    return np.maximum(g.normal(size=(n, rank)) @ np.random.default_rng(99).normal(size=(rank, d)) + shift, 0)


def test_bootstrap_statistics_match_clean_fid():
    """The resamples' FID (no d x d sqrtm: the nuclear norm of X Y^T for sets smaller than the dimension,
    else the eigenvalues of Sy^1/2 Sx Sy^1/2) and KID (kernel matrices computed once) against clean-fid's
    own functions, on the whole set and on a resample with repeats."""
    from cleanfid.fid import frechet_distance

    x, y = low_rank(40, shift=0.3), low_rank(50, seed=1)
    exact = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    index = np.random.default_rng(2).integers(0, 40, 40)
    for d in (256, 16):  # 40 and 50 samples: fewer than 256 dimensions, more than 16
        fast = fid_resampler(x[:, :d], y[:, :d])
        assert fast(np.arange(40)) == pytest.approx(exact if d == 256 else fid(x[:, :d], y[:, :d]), rel=1e-3)
        assert fast(index) == pytest.approx(fid(x[index, :d], y[:, :d]), rel=1e-3)
    square = low_rank(50, shift=0.3)
    assert kid_resampler(square, y)(np.arange(50)) == pytest.approx(kid(square, y), rel=1e-9)
    # unequal sizes: whole sets against the mean of clean-fid's 100 subsets of the larger one
    assert kid_resampler(x, y)(np.arange(40)) == pytest.approx(kid(x, y), rel=0.05)


def test_bootstrap_interval_holds_the_point_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 400):
        values = rng.normal(size=n)
        out = bootstrap(lambda i: {"mean": values[i].mean(), "twice": 2 * values[i].mean()}, n, 300, seed=1)
        mean = out["mean"]
        assert mean.low < mean.point < mean.high and mean.point == pytest.approx(values.mean())
        assert mean.high - mean.low == pytest.approx(2 * 1.96 / np.sqrt(n), rel=0.2)  # the normal interval
        assert out["twice"].low == pytest.approx(2 * mean.low)  # one draw of indices for every statistic
        widths.append(mean.high - mean.low)
    assert widths[1] < 0.7 * widths[0]
    # a FID, raised by the repeats every resample has: the interval still stands about the point
    x, y = low_rank(60, shift=0.3), low_rank(60, seed=1)
    f = fid_resampler(x, y)
    interval = bootstrap(lambda i: {"fid": f(i)}, 60, 100, seed=0)["fid"]
    assert interval.low < interval.point < interval.high and interval.std > 0
    none = bootstrap(lambda i: {"fid": f(i)}, 60, 0, seed=0)["fid"]
    assert none.low == none.point == none.high and none.std == 0
    with pytest.raises(ValueError, match="resamples must be >= 0.*-1"):
        bootstrap(lambda i: {}, 60, -1, seed=0)


def test_inception_features_see_a_shift_and_quantise_as_the_saved_samples():
    """The TF-Inception features FID is defined with, fed as clean-fid feeds it (`smoke` turns Inception
    off to keep CI short; tiny and sd15 use it): 2048 finite features per image, FID and KID that see a
    shift, and the same features for a sample and its uint8 copy (the reference is saved as uint8).
    Few images (Inception costs ~0.2-0.5 s one on these CPUs), so the FID through its exact low-rank form."""
    from jdm.metrics import InceptionFeatures, quantise

    net = InceptionFeatures()
    reference, same, brighter = (features(net, x) for x in (images(12, 0), images(12, 1), images(12, 2, 0.8)))
    assert same.shape == (12, 2048) and np.isfinite(same).all()
    assert np.allclose(features(net, quantise(images(12, 1)[:4]).float() / 255), same[:4], rtol=1e-5, atol=1e-6)
    shift = [fid_resampler(x, reference)(np.arange(12)) for x in (same, brighter)]
    assert shift[0] < 0.6 * shift[1]
    assert kid(same, reference) < 0.1 * kid(brighter, reference)


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
    # a time, not a comparison of times (that is benchmarks/inference.py's, side by side in one run)
    assert all(0 < latency_ms(s, hidden, mask, None, repeats=2) < float("inf") for s in (one, multi))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CI has the CPU; a GPU worker both


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_and_features_on_a_device_match_the_cpu(teacher, device):
    """The evaluation stages sample and compute features on accelerate's device: noise is drawn on the
    CPU and images come back to it, so on any device the samples, their features and the classifier's
    predictions are the CPU's up to float rounding (on the CPU itself: bit for bit)."""
    import copy

    from jdm.annotators.classifier import predict

    unet, noise_scheduler = teacher
    hidden, mask = text(6)
    maps = images(6, 3)
    controlnet = controlnet_from_unet(unet, 1, 1)
    with torch.no_grad():  # zero convolutions would hide a control that reached the wrong device
        for name, q in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                q.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    schedule = VPSchedule.from_scheduler(noise_scheduler)

    def samplers(on):
        u, c = copy.deepcopy(unet), copy.deepcopy(controlnet)
        return (one_step_sampler(OneStepGenerator(u, {"canny": c}, schedule, 950), "canny", Backbone(1), 16, on),
                multi_step_sampler(u, noise_scheduler.config, Backbone(1), 16, text(1, 9), steps=3, guidance_scale=2.0,
                                   sampler="ddim", controlnet=c, device=on))
    net, classifier = PixelFeatures(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    for on_cpu, on_device in zip(samplers("cpu"), samplers(device)):
        assert on_device.device == torch.device(device) and next(net.parameters()).device.type == "cpu"
        a = generate(on_cpu, hidden, mask, maps, batch_size=4, seed=5)
        b = generate(on_device, hidden, mask, maps, batch_size=4, seed=5)
        # a GPU's convolutions run in TF32 by default (10-bit mantissas): measured 3.4e-3 at most on an H200
        assert b.device.type == "cpu" and torch.allclose(a, b, atol=1e-4 if device == "cpu" else 1e-2), (a - b).abs().max()
        blank = generate(on_cpu, hidden, mask, torch.zeros_like(maps), batch_size=4, seed=5)
        assert not torch.equal(a, blank)  # the control matters, so the test can fail
        feats_cpu = features(net, a)
        feats_device = features(copy.deepcopy(net).to(device), a)
        assert np.allclose(feats_cpu, feats_device, atol=1e-4 if device == "cpu" else 1e-2)
        assert torch.equal(predict(classifier, a), predict(copy.deepcopy(classifier).to(device), a))
        assert 0 < latency_ms(on_device, hidden, mask, maps, repeats=1) < float("inf")
        if device == "cpu":
            assert torch.equal(a, b)


def test_score_gives_every_number_its_interval(smoke_params, tmp_path, monkeypatch):
    canny = load_condition("canny", smoke_params, tmp_path)
    net = PixelFeatures()
    spaces = {"pixels": FeatureSpace(net, features(net, images(40, 0)))}
    # prompt accuracy is the classifier's, tested with it; here the score's own bookkeeping
    monkeypatch.setattr("jdm.evaluation.prompt_hits", lambda classifier, samples, classes: torch.arange(len(samples)) % 4 == 0)
    x = images(20, 1)
    out = score(x, canny.extract(x), torch.zeros(20), canny, None, spaces, resamples=50, seed=0)
    intervals = {f"{k}_{end}" for k in ("fid_pixels", "kid_pixels", "consistency", "prompt_accuracy") for end in ("low", "high")}
    assert set(out) == {"num_samples", "num_reference", "bootstrap_resamples", "fid_pixels", "kid_pixels",
                        "kid_pixels_std", "consistency", "prompt_accuracy"} | intervals
    assert (out["num_samples"], out["num_reference"], out["bootstrap_resamples"]) == (20, 40, 50)
    assert out["consistency"] == out["consistency_low"] == out["consistency_high"] == 0.0
    assert out["prompt_accuracy_low"] < out["prompt_accuracy"] == 0.25 < out["prompt_accuracy_high"]
    for key in ("fid_pixels", "kid_pixels"):
        assert out[f"{key}_low"] < out[key] < out[f"{key}_high"]
    assert out["fid_pixels"] > 0 and out["kid_pixels_std"] > 0
    bare = score(x, canny.extract(x), torch.zeros(20), canny, None, spaces, resamples=0, seed=0)
    assert not intervals & set(bare) and bare["fid_pixels"] == out["fid_pixels"]


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


def row(method, condition, fid, cons, nfe, width=None):
    """A metrics file's row; with `width`, the intervals of FID, KID and consistency (half that wide)."""
    out = {"method": method, "condition": condition, "fid_inception": fid, "fid_classifier": fid / 100,
           "consistency": cons, "nfe": nfe, "latency_ms": 2.0 * nfe, "prompt_accuracy": 0.5, "num_samples": 100,
           "num_reference": 100}
    if width is not None:
        out.update(kid_inception=fid / 1e4, kid_classifier=fid / 1e6, bootstrap_resamples=200)
        for key in ("fid_inception", "kid_inception", "fid_classifier", "kid_classifier", "consistency"):
            out[f"{key}_low"], out[f"{key}_high"] = out[key] * (1 - width / 2), out[key] * (1 + width / 2)
    return out


def write_pictures(rows, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    grid = (np.random.default_rng(0).random((17, 137, 3)) * 255).astype(np.uint8)
    from PIL import Image
    for r in rows:
        Image.fromarray(grid).save(samples / f"{r['method']}-{r['condition']}.png")
    out = tmp_path / "report"
    out.mkdir()
    return samples, out, {"teacher": grid, "maps-canny": grid, "maps-hed": grid}


def test_report_table_summary_and_page(tmp_path):
    """Older metrics files, without KID or intervals, still make the table."""
    rows = [row("jdm", "canny", 30.0, 0.10, 1), row("jdm", "hed", 40.0, 0.30, 1),
            row("controlnet-50", "canny", 20.0, 0.20, 50), row("controlnet-50", "hed", 30.0, 0.20, 50)]
    lines = summary(rows)
    assert len(lines) == 1 and "consistency better on 1/2" in lines[0] and "disjoint" not in lines[0]
    assert "ratio JDM/controlnet-50 = 1.40" in lines[0] and "NFE 1 vs 50" in lines[0]  # (30+40)/(20+30)
    samples, out, pictures = write_pictures(rows, tmp_path)
    write_report(rows, ["jdm", "controlnet-50"], ["canny", "hed"], pictures, samples, out, "tiny")
    md = (out / "table.md").read_text()
    assert md.count("| JDM (one step) |") == 2 and "14.35 / 0.122 (NCT T1)" in md
    assert "100 samples vs 100 reference" in md and "No intervals." in md
    assert "| 1 | 2.0 | 30.0 | - | 0.300 | - | 0.1000 | - | 0.50 |" in md
    page = (out / "index.html").read_text()
    assert page.count("<img ") == 2 * 4 and page.count("<tr><td>") == 4
    for name in ("maps-canny", "teacher"):  # drawn for the page
        assert (out / f"{name}.png").is_file()
    for name in ("jdm-hed", "controlnet-50-canny"):  # the evaluate stage's grids, linked, not copied
        assert f"src='../samples/{name}.png'" in page and not (out / f"{name}.png").exists()


def test_report_shows_intervals_and_says_which_comparisons_they_separate(tmp_path):
    # canny: JDM's FID 30 [28.5, 31.5] against 20 [19, 21], disjoint; hed: 40 [36, 44] against 42 [37.8, 46.2], not
    rows = [row("jdm", "canny", 30.0, 0.10, 1, width=0.1), row("jdm", "hed", 40.0, 0.30, 1, width=0.2),
            row("controlnet-50", "canny", 20.0, 0.20, 50, width=0.1), row("controlnet-50", "hed", 42.0, 0.29, 50, width=0.2)]
    line = summary(rows)[0]
    assert "consistency better on 1/2 conditions (intervals disjoint on 1/2: 1 better, 0 worse)" in line
    assert "FID (inception) better on 1/2 conditions (intervals disjoint on 1/2: 0 better, 1 worse)" in line
    assert "KID (classifier) better on 1/2" in line
    samples, out, pictures = write_pictures(rows, tmp_path)
    write_report(rows, ["jdm", "controlnet-50"], ["canny", "hed"], pictures, samples, out, "tiny")
    md = (out / "table.md").read_text()
    assert "95% bootstrap interval (200 resamples" in md and "KID x1e3" in md
    # FID Inception, KID Inception x1e3 (30 / 1e4 * 1e3 = 3.0), FID classifier, KID classifier x1e3, consistency
    assert "| 30.0 [28.5, 31.5] | 3.0 [2.9, 3.1] | 0.300 [0.285, 0.315] | 0.03 [0.03, 0.03] | 0.1000 [0.0950, 0.1050] |" in md
    assert "30.0 [28.5, 31.5]" in (out / "index.html").read_text()
