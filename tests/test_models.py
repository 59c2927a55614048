"""Tests for models/: the LTModel interface over every architecture."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import LTModel, available_models, build_model
from utils.errors import UserError

CIFAR_SMALL = ["resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]  # resnet8: the smoke model
CIFAR_WIDE = ["resnet18_cifar", "resnet34_cifar"]
IMAGENET = ["resnet10", "resnet18", "resnet34", "resnet50"]
ALL = CIFAR_SMALL + CIFAR_WIDE + IMAGENET

# (input side, expected CAM-map side, expected feature_dim, expected cam_layer)
EXPECTED = {
    **{a: (32, 8, 64, "layer3") for a in CIFAR_SMALL},
    **{a: (32, 4, 512, "layer4") for a in CIFAR_WIDE},
    **{a: (64, 2, 512, "layer4") for a in IMAGENET},
    "resnet50": (64, 2, 2048, "layer4"),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_available_models_lists_every_arch() -> None:
    assert sorted(available_models()) == sorted(ALL)


@pytest.mark.parametrize("arch", ALL)
def test_shapes_and_interface(arch: str) -> None:
    side, fside, dim, cam = EXPECTED[arch]
    model = build_model(arch, num_classes=7).eval()
    assert isinstance(model, LTModel)
    assert (model.arch, model.num_classes, model.in_channels) == (arch, 7, 3)
    assert model.feature_dim == dim and model.cam_layer == cam
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == dim
    assert model.last_stage is dict(model.named_modules())[cam]

    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        fmap = model.features(x)
        logits = model(x)
    assert fmap.shape == (2, dim, fside, fside)
    assert logits.shape == (2, 7)
    assert torch.allclose(model.head(fmap), logits, atol=1e-6)
    assert torch.allclose(model.pool(fmap), fmap.mean(dim=(2, 3)))


@pytest.mark.parametrize("arch", ["resnet32", "resnet18_cifar", "resnet10"])
def test_cam_layer_hook_captures_features(arch: str) -> None:
    model = build_model(arch, num_classes=5).eval()
    captured: list[torch.Tensor] = []
    handle = dict(model.named_modules())[model.cam_layer].register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().clone())
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        handle.remove()
        fmap = model.features(x)
    assert len(captured) == 1
    assert torch.equal(captured[0], fmap)


def test_imagenet_224_gives_7x7() -> None:
    model = build_model("resnet10", num_classes=3).eval()
    with torch.no_grad():
        fmap = model.features(torch.randn(1, 3, 224, 224))
    assert fmap.shape == (1, 512, 7, 7)


@pytest.mark.parametrize(
    "arch,num_classes,expected",
    [
        ("resnet20", 10, 0.27e6),
        ("resnet32", 10, 0.46e6),
        ("resnet18", 1000, 11.69e6),
        ("resnet50", 1000, 25.56e6),
    ],
)
def test_parameter_counts_match_published(arch: str, num_classes: int, expected: float) -> None:
    count = n_params(build_model(arch, num_classes))
    assert abs(count - expected) / expected < 0.02, count


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_imagenet_parameter_count_equals_torchvision(arch: str) -> None:
    tv = pytest.importorskip("torchvision.models")
    assert n_params(build_model(arch, 1000)) == n_params(getattr(tv, arch)(weights=None))


@pytest.mark.parametrize("arch,fside", [("resnet32", 7), ("resnet18_cifar", 4), ("resnet10", 1)])
def test_one_channel_28x28(arch: str, fside: int) -> None:
    model = build_model(arch, num_classes=10, in_channels=1).eval()
    assert model.in_channels == 1
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        fmap = model.features(x)
        logits = model(x)
    assert fmap.shape == (3, model.feature_dim, fside, fside)
    assert logits.shape == (3, 10)


def test_head_accepts_arbitrary_map() -> None:
    model = build_model("resnet32", num_classes=4).eval()
    fmap = torch.randn(5, model.feature_dim, 3, 5)
    with torch.no_grad():
        out = model.head(fmap)
    assert out.shape == (5, 4)
    assert torch.allclose(out, model.fc(fmap.mean(dim=(2, 3))))


def test_backward_reaches_stem() -> None:
    model = build_model("resnet20", num_classes=3)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert model.stem[0].weight.grad is not None
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_init_bn_and_kaiming() -> None:
    model = build_model("resnet20", num_classes=3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    conv = model.layer3[0].conv2  # 64 out, 3x3 -> fan_out = 576
    assert abs(conv.weight.std().item() - (2 / 576) ** 0.5) < 0.1 * (2 / 576) ** 0.5


def test_unknown_arch_raises_user_error() -> None:
    with pytest.raises(UserError) as exc:
        build_model("resnet33", num_classes=10)
    assert "resnet32" in str(exc.value) and "resnet33" in str(exc.value)


def test_bad_num_classes_raises_user_error() -> None:
    with pytest.raises(UserError):
        build_model("resnet20", num_classes=0)
