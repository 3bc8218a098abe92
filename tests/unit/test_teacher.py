import torch

from jdm.data import Split, read_fashion_mnist, resize_images
from jdm.models.backbone import Backbone
from jdm.models.unet import build_noise_scheduler
from jdm.training.teacher import denoising_loss, train_teacher


def held_out_loss(unet, noise_scheduler, x0, hidden, mask):
    with torch.no_grad():
        return denoising_loss(unet, noise_scheduler, x0, hidden, mask, torch.Generator().manual_seed(123), None).item()


def test_teacher_loss_falls_on_smoke(smoke_params):
    images, labels = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "train")
    images = resize_images(images[:1024], 16)
    g = torch.Generator().manual_seed(0)
    train = Split(images, labels[:1024], 1 + labels[:1024])
    table = (torch.randn(11, 16, 384, generator=g), torch.ones(11, 16, dtype=torch.long))
    p = smoke_params.teacher.model_copy(update={"steps": 60, "ema_decay": 0.0})
    unet, noise_scheduler = train_teacher(p, train, table, Backbone(1), seed=0)

    from jdm.models.unet import build_unet
    torch.manual_seed(0)
    untrained = build_unet(p.unet, 16, 1, 384).eval()
    x0 = Backbone(1).encode(images[-128:].float() / 255)
    hidden, mask = table[0][train.prompt_ids[-128:]], table[1][train.prompt_ids[-128:]]
    before = held_out_loss(untrained, build_noise_scheduler(p), x0, hidden, mask)
    after = held_out_loss(unet, noise_scheduler, x0, hidden, mask)
    assert after < 0.5 * before, (before, after)


class Crash(Exception):
    pass


def test_teacher_resumes_from_its_checkpoint_bit_identically(smoke_params, tmp_path):
    """Weights, AdamW, the warm-up + cosine LR schedule, the EMA and the data RNG all come back."""
    import pytest

    from jdm.training.checkpoint import CheckpointSpec

    images, labels = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "train")
    train = Split(resize_images(images[:256], 16), labels[:256], 1 + labels[:256])
    table = (torch.randn(11, 16, 384, generator=torch.Generator().manual_seed(0)), torch.ones(11, 16, dtype=torch.long))
    p = smoke_params.teacher.model_copy(update={"steps": 10, "batch_size": 8, "warmup_steps": 3})
    unbroken, _ = train_teacher(p, train, table, Backbone(1), seed=0)
    spec = CheckpointSpec(tmp_path, {"teacher": p.model_dump(mode="json")}, every=3)

    def crash_at_7(step, values):
        if step == 7:
            raise Crash()
    with pytest.raises(Crash):
        train_teacher(p, train, table, Backbone(1), seed=0, log=crash_at_7, checkpoint=spec)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["step-00000003.safetensors", "step-00000006.safetensors"]
    resumed, _ = train_teacher(p, train, table, Backbone(1), seed=0, checkpoint=spec)
    assert all(torch.equal(a, b) for a, b in zip(unbroken.state_dict().values(), resumed.state_dict().values()))
