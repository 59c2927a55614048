"""Tests for models/: the LTModel interface over every architecture."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models import LTModel, available_models, build_classifier, build_model, fresh_like
from utils.checkpoint import load_model_state
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


# ------------------------------------------------------------------------------------------------
# Cosine classifiers at their releases' forms (models.base.CosineClassifier)
# ------------------------------------------------------------------------------------------------
def _softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x))


def tailcalibx_release_logits(x: np.ndarray, fc_weight: np.ndarray, fc_bias: np.ndarray, scale_raw: float) -> np.ndarray:
    """rahulvigneswaran/TailCalibX, transcribed in numpy: libs/core/core_base.py batch_forward
    (features = F.normalize(features, p=2, dim=1)), then libs/models/CosineDotProductClassifier.py
    (softplus(self.scale) * mm(x, F.normalize(self.fc.weight.T, dim=1)) + self.fc.bias), fc.weight [C, D]."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    wt = fc_weight.T  # [D, C]
    wt = wt / np.linalg.norm(wt, axis=1, keepdims=True)  # dim=1 of [D, C]: each feature's row over the classes
    return _softplus(scale_raw) * (x @ wt) + fc_bias


def ldam_release_normed_linear(x: np.ndarray, weight_in_out: np.ndarray) -> np.ndarray:
    """kaidic/LDAM-DRW models/resnet_cifar.py NormedLinear, transcribed in numpy: weight [in, out],
    F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0)) -- cos only, s = 30 is applied in the loss."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = weight_in_out / np.linalg.norm(weight_in_out, axis=0, keepdims=True)  # dim=0: each class's column
    return x @ w


def test_cosine_classifier_is_the_tailcalibx_release_form_by_hand() -> None:
    fc = build_classifier("cosine", 2, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 2.0]]))  # [classes, features]
        fc.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    f = torch.tensor([[1.0, 0.0], [6.0, 8.0]])
    # each feature's column over the 3 classes has unit norm: (3, 4, 0) / 5 and (0, 0, 2) / 2, so the normalised
    # weight is [[0.6, 0], [0.8, 0], [0, 1]]; f / |f| = (1, 0) and (0.6, 0.8)
    cos_like = torch.tensor([[0.6, 0.8, 0.0], [0.36, 0.48, 0.8]])
    expected = 10.0 * cos_like + torch.tensor([0.5, -1.0, 0.0])
    torch.testing.assert_close(fc(f), expected)
    # (a row-wise cosine would give cos(f1, w_0) = cos(f1, w_1) = 1 instead)
    release = tailcalibx_release_logits(f.numpy().astype(np.float64), fc.weight.detach().numpy().astype(np.float64),
                                        fc.bias.detach().numpy().astype(np.float64), float(fc.raw_scale.detach()))
    np.testing.assert_allclose(fc(f).detach().numpy(), release, rtol=1e-5, atol=1e-5)


def test_cosine_classifier_matches_the_tailcalibx_release_on_random_data() -> None:
    fc = build_classifier("cosine", 5, 4)
    with torch.no_grad():
        fc.raw_scale.fill_(2.5)  # any learned value: the logits use softplus of it, as the release
    x = torch.randn(6, 5).abs()  # pooled post-ReLU features
    release = tailcalibx_release_logits(x.double().numpy(), fc.weight.detach().double().numpy(),
                                        fc.bias.detach().double().numpy(), 2.5)
    np.testing.assert_allclose(fc(x).detach().double().numpy(), release, rtol=1e-5, atol=1e-5)


def test_cosine_classifier_parameters_and_init_follow_the_release() -> None:
    fc = build_classifier("cosine", 16, 3)
    assert set(dict(fc.named_parameters())) == {"weight", "bias", "raw_scale"}  # scale learned, bias learned
    # the release: scale = nn.Parameter(10.0) used through softplus, i.e. softplus(10) = 10.0000454 at the start;
    # model.scale is the softplus'd value, 10 (a relative difference of 4.5e-6)
    assert math.isclose(fc.scale_value(), 10.0, rel_tol=1e-6)
    assert math.isclose(fc.scale_value(), float(_softplus(np.float64(10.0))), rel_tol=1e-5)
    bound = 1 / math.sqrt(16)  # nn.Linear(feat_dim, num_classes)'s initialisation of weight and bias
    assert fc.weight.abs().max() <= bound and fc.bias.abs().max() <= bound and fc.bias.abs().max() > 0


def test_normed_classifier_is_ldam_normed_linear_without_bias() -> None:
    fc = build_classifier("normed", 2, 3, scale=30.0, learn_scale=False)
    assert fc.bias is None and set(dict(fc.named_parameters())) == {"weight"}  # no bias, no learned scale
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]))  # [classes, features]
    f = torch.tensor([[1.0, 0.0], [6.0, 8.0]])
    # cos with the class rows (0.6, 0.8), (0, 1), (1, 0)
    expected = 30.0 * torch.tensor([[0.6, 0.0, 1.0], [1.0, 0.8, 0.6]])
    torch.testing.assert_close(fc(f), expected)
    # the release's NormedLinear keeps its weight as [in, out] and normalises along dim 0: our weight transposed
    release = 30.0 * ldam_release_normed_linear(f.double().numpy(), fc.weight.detach().double().numpy().T)
    np.testing.assert_allclose(fc(f).detach().numpy(), release, rtol=1e-6, atol=1e-5)
    x = torch.randn(5, 2)
    release = 30.0 * ldam_release_normed_linear(x.double().numpy(), fc.weight.detach().double().numpy().T)
    np.testing.assert_allclose(fc(x).detach().numpy(), release, rtol=1e-5, atol=1e-5)


def test_normed_classifier_init_is_the_releases_unit_columns() -> None:
    # the release: weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5) on [in, out]: every class vector has norm 1
    fc = build_classifier("normed", 64, 10, scale=30.0, learn_scale=False)
    torch.testing.assert_close(fc.weight.norm(dim=1), torch.ones(10))
    assert math.isclose(fc.scale_value(), 30.0, rel_tol=1e-6)
    model = build_model("resnet8", 10, classifier="normed", scale=30.0, learn_scale=False)
    assert model.fc.bias is None and "fc.bias" not in model.state_dict()
    again = fresh_like(model.fc)  # cRT / TailCalib's fresh head keeps the form
    assert again.bias is None and again.weight_norm == "class" and math.isclose(again.scale_value(), 30.0, rel_tol=1e-6)


def test_a_classifier_state_of_another_form_fails_to_load_with_a_reason(tmp_path) -> None:
    ldam = build_model("resnet8", 3, classifier="normed", scale=30.0, learn_scale=False)
    state = ldam.state_dict()
    build_model("resnet8", 3, classifier="normed", scale=30.0, learn_scale=False).load_state_dict(state)  # same form
    # an old LDAM-DRW run: a cosine classifier with a bias, before the form was saved
    old = {k: v for k, v in state.items() if k != "fc.weight_norm_dim"}
    old["fc.bias"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"^Weights in .* has a bias \(fc\.bias\).*NormedLinear.*--overwrite\)$"):
        load_model_state(ldam, old, tmp_path / "best_model.pt")
    # an old CosineCE run (row-wise cosine): same keys, but no saved form
    cosine = build_model("resnet8", 3, classifier="cosine")
    old = {k: v for k, v in cosine.state_dict().items() if k != "fc.weight_norm_dim"}
    with pytest.raises(UserError, match="predates the release forms.*CosineDotProduct_Classifier"):
        load_model_state(cosine, old, tmp_path / "best_model.pt")
    with pytest.raises(UserError, match="the saved classifier is a normed one"):  # (its bias is missing too)
        load_model_state(cosine, state, tmp_path / "best_model.pt")
