"""The camera adversary (`--camera-adversary`): gradient reversal, its ramp, camera labels from
file names, the pooled-feature hook, and training, resume and config with it on real images."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see train/cli.py

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marsvision.runtime.errors import MarsvisionError
from marsvision.train import data as msl
from marsvision.train.adversary import (
    CameraAdversary,
    camera_domains,
    camera_task,
    grad_reverse,
    pooled_features,
    reversal_coef,
)
from marsvision.train.checkpoint import load_checkpoint
from marsvision.train.config import command_line, config_from_flags
from marsvision.train.model import create_model


def test_grad_reverse_flips_and_scales_the_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    out = grad_reverse(x, 0.7)
    assert torch.equal(out, x)
    out.backward(g)
    assert x.grad is not None and torch.allclose(x.grad, -0.7 * g)


def test_adversary_head_learns_while_the_features_move_against_it() -> None:
    """One SGD step on the camera loss: the head gets better at it, the features worse."""
    torch.manual_seed(0)
    feats = nn.Parameter(torch.randn(32, 8))
    head = CameraAdversary(8, hidden=16)
    d = torch.randint(0, 2, (32,))

    def loss_of(f: torch.Tensor) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(head(f, 1.0), d))

    before = loss_of(feats)
    nn.functional.cross_entropy(head(feats, 1.0), d).backward()
    assert feats.grad is not None
    with torch.no_grad():
        moved_feats = feats - 0.5 * feats.grad  # the backbone's step, through the reversal
    assert loss_of(moved_feats) > before
    torch.optim.SGD(head.parameters(), lr=0.5).step()
    assert loss_of(feats) < before


def test_reversal_coef_ramps_from_zero_to_the_weight() -> None:
    coefs = [reversal_coef(p / 10, 2.0) for p in range(11)]
    assert coefs[0] == 0.0 and coefs[-1] == pytest.approx(2.0, abs=1e-3)
    assert all(a < b for a, b in zip(coefs, coefs[1:], strict=False))
    assert reversal_coef(0.5, 1.0) == pytest.approx(2 / (1 + torch.e**-5) - 1)


def test_camera_domains_from_file_names(msl_dir: Path) -> None:
    samples = msl.read_split(msl_dir, "train", "binary", None)
    domains = camera_domains(samples)
    names = [s.path.name for s in samples]
    assert domains.tolist() == [int(n[4:6] == "MH") for n in names]
    assert 0 < domains.sum() < len(domains)  # train has both cameras (320 MAHLI images)


def test_pooled_features_are_what_fc_sees() -> None:
    model = create_model(2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), pooled_features(model) as seen:
        logits = model(x)
        assert seen[-1].shape == (2, 2048)
        assert torch.allclose(model.get_submodule("fc")(seen[-1]), logits)
    assert not model.get_submodule("fc")._forward_pre_hooks  # the hook is gone afterwards


def test_training_with_the_adversary_resumes_exactly(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs straight, and one epoch stopped then resumed: the same history, camera
    accuracy included (so the head's weights travel in resume.pt); the checkpoint holds the
    plain ResNet-50; config, card command and --resume know the setting."""
    from marsvision.train import loop

    monkeypatch.setattr(loop, "RESUME_EVERY_S", 0.0)
    flags = dict(epochs=2, limit=16, image_size=64, device="cpu", batch_size=8, workers=2,
                 balance="group", camera_adversary=1.0)  # fmt: skip
    straight = loop.main(config_from_flags("default", data=msl_dir, out=tmp_path / "a", **flags))
    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "b", **flags)
    assert loop.main(cfg, deadline=time.monotonic())["stopped_early_after_epoch"] == 1
    resumed = loop.main(dataclasses.replace(cfg, resume=True))
    for ha, hb in zip(straight["history"], resumed["history"], strict=True):
        for key in ("train_loss", "train_camera_balanced_accuracy", "val_loss"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-3, abs=1e-4), key
    assert all(0 <= h["train_camera_balanced_accuracy"] <= 1 for h in straight["history"])
    state = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state_dict"]
    create_model(2).load_state_dict(state)  # strict: no adversary weights in the checkpoint
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["camera_adversary"] == 1.0 and "--camera-adversary 1.0" in command_line(saved)
    without = dataclasses.replace(cfg, camera_adversary=0.0, resume=True)
    with pytest.raises(MarsvisionError, match="--resume: camera_adversary was 1.0"):
        loop.main(without)


def test_adversary_with_mixed_batches(msl_dir: Path, tmp_path: Path) -> None:
    """MixUp/CutMix with the adversary through the whole run, on real images (the weighing of
    the two cameras: test_mixed_batch_camera_loss_weighs_both_cameras_by_their_shares)."""
    from marsvision.train.loop import main as train

    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "m", epochs=1, limit=16,
                            image_size=64, device="cpu", batch_size=8, workers=2, mixup=0.2,
                            cutmix=1.0, camera_adversary=0.5)  # fmt: skip
    h = train(cfg)["history"][0]
    assert 0 <= h["train_camera_balanced_accuracy"] <= 1
    assert torch.isfinite(torch.tensor(h["train_loss"]))


def test_mixed_batch_camera_loss_weighs_both_cameras_by_their_shares() -> None:
    """In a mixed batch the camera head's loss is lam * CE(own camera) + (1 - lam) * CE(partner's
    camera), as the class loss is: checked on the head's gradient, which the epoch leaves in place
    (lr 0, one batch), against the same step by hand. The cameras are such that the partner's
    (the reversed batch's) differ from the image's own."""
    import torch.nn.functional as F

    from marsvision.runtime.spec import PreprocessSpec
    from marsvision.train.adversary import CameraTask
    from marsvision.train.augment import AugmentSpec, augment_batch
    from marsvision.train.loop import train_one_epoch
    from marsvision.train.mix import mix_batch

    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))  # fmt: skip
    labels, cameras = torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 1, 1])
    spec, aug = PreprocessSpec.for_input_size(32), AugmentSpec(rotate_deg=0.0, jitter=0.0)

    def model_and_head() -> tuple[nn.Module, CameraAdversary]:
        torch.manual_seed(0)
        return create_model(2), CameraAdversary(2048)

    model, head = model_and_head()
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.0)
    camera = CameraTask(head=head, domains=cameras, weight=1.0, loss_fn=nn.CrossEntropyLoss())
    train_one_epoch(
        model, images=images, labels=labels, order=torch.arange(4), optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        loss_fn=nn.CrossEntropyLoss(), batch_size=4, image_size=32, spec=spec, aug=aug,
        generator=torch.Generator().manual_seed(1), ema=None, desc="t", mixup=0.4, camera=camera,
    )  # fmt: skip
    got = head.net[0].weight.grad
    assert got is not None

    model, head = model_and_head()
    model.train()
    g = torch.Generator().manual_seed(1)
    x = augment_batch(images, out_size=32, spec=spec, aug=aug, generator=g)
    m = mix_batch(x, mixup=0.4, cutmix=0.0, generator=g)
    assert m is not None and 0 < m.lam < 1
    assert not torch.equal(cameras, cameras[m.partner])
    with pooled_features(model) as pooled:
        model(m.x)
    cam = head(pooled[-1].detach(), 1.0)
    own, other = F.cross_entropy(cam, cameras), F.cross_entropy(cam, cameras[m.partner])
    (m.lam * own + (1 - m.lam) * other).backward()
    want = head.net[0].weight.grad
    assert want is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_camera_adversary_flag_round_trip() -> None:
    plain = config_from_flags("default", data=Path("d"), out=Path("o")).to_dict()
    assert plain["camera_adversary"] == 0.0 and "--camera-adversary" not in command_line(plain)
    with pytest.raises(MarsvisionError, match="--camera-adversary -1.0: must be a number >= 0"):
        config_from_flags("default", data=Path("d"), out=Path("o"), camera_adversary=-1.0)


def _backbone_grad(head_input: str, coef: float) -> torch.Tensor:
    """conv1's gradient from the camera loss alone, the head fed the hooked pooled features
    through the reversal (`reversed`) or directly (`plain`)."""
    torch.manual_seed(0)
    model, head = create_model(2).train(), CameraAdversary(2048, hidden=8)
    x, cams = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    with pooled_features(model) as seen:
        model(x)
        feats = seen[-1]
        cam = head(feats, coef) if head_input == "reversed" else head.net(feats)
    F.cross_entropy(cam, cams).backward()
    conv1 = model.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d)
    grad = conv1.weight.grad
    assert grad is not None, "no gradient reached the backbone"
    return grad


def test_the_backbone_gets_the_camera_gradient_reversed_and_scaled() -> None:
    """The features the hook hands the head are the graph's own (not a detached copy): the
    backbone receives the camera loss's gradient times -coef, so it learns to hide the camera."""
    plain = _backbone_grad("plain", 1.0)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(_backbone_grad("reversed", 0.5), -0.5 * plain)


def test_the_task_trains_its_head_and_ramps_its_coefficient() -> None:
    """camera_task's head takes fc's input and learns (its weights take gradients, for the
    optimizer the loop gives them); its coefficient is 0 at the start of the run and rises to
    the weight, as reversal_coef's ramp, not the weight from the first step."""
    task = camera_task(create_model(2), [], weight=2.0, weighted=False,
                       device=torch.device("cpu"))  # fmt: skip
    params = list(task.head.parameters())
    assert params[0].shape == (256, 2048) and all(p.requires_grad for p in params)
    assert task.coef(0.0) == 0.0 and task.coef(1.0) == pytest.approx(2.0, abs=1e-3)
    assert task.coef(0.3) == reversal_coef(0.3, 2.0) < 2.0


@pytest.mark.parametrize("weighted", [False, True])
def test_the_camera_loss_is_per_image_when_images_carry_weights(
    weighted: bool, msl_dir: Path
) -> None:
    """With --balance group (weighted) the camera loss is one value per image, for the loop to
    weigh as it weighs the class loss; otherwise the batch mean. Camera labels are the files'."""
    samples = msl.read_split(msl_dir, "train", "binary", limit=64)
    task = camera_task(create_model(2), samples, weight=1.0, weighted=weighted,
                       device=torch.device("cpu"))  # fmt: skip
    assert task.domains.tolist() == camera_domains(samples).tolist()
    logits = torch.randn(len(samples), 2)
    loss = task.loss_fn(logits, task.domains)
    want = F.cross_entropy(logits, task.domains, reduction="none")
    torch.testing.assert_close(loss, want if weighted else want.mean())
