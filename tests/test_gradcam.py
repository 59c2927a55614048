"""Grad-CAM: batching, closed form vs autograd, a hand-computed map, modes, side effects, extractor."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsa.gradcam import CamExtractor, features_and_cams, normalize_cams
from utils.errors import UserError


class TinyNet(nn.Module):
    """Conforms to the LTModel interface: features / head (GAP + fc) / cam_layer."""

    def __init__(self, in_ch: int = 3, width: int = 8, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(width),
            relu1=nn.ReLU(inplace=True),  # in-place right after a hookable layer, on purpose
            conv2=nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
            bn2=nn.BatchNorm2d(width),
            relu2=nn.ReLU(),
        ))
        self.fc = nn.Linear(width, num_classes)
        self.cam_layer = "body"
        self.num_classes = num_classes

    def features(self, x):
        return self.body(x)

    def head(self, fmap):
        return self.fc(fmap.mean(dim=(2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


class MLPHeadNet(TinyNet):
    """TinyNet whose head is GAP + a two-layer MLP: `fc` is not an nn.Linear, so no closed form."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, self.num_classes))


class IdentityNet(nn.Module):
    """features(x) = x, so the feature map is given directly; fc weights set by hand."""

    def __init__(self, weight, bias=None):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        self.ident = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.zero_() if bias is None else self.fc.bias.copy_(torch.as_tensor(bias))
        self.cam_layer = "ident"

    def features(self, x):
        return self.ident(x)

    def head(self, fmap):
        return self.fc(fmap.mean(dim=(2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


def _trained_bn_model(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    # Give BatchNorm non-trivial running statistics, then leave the model in train mode.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model


@pytest.mark.parametrize("method", ["closed_form", "autograd"])
def test_batched_equals_per_sample_and_mode_restored(method):
    model = _trained_bn_model()
    model.body.bn2.eval()  # a submodule deliberately in eval: must stay so
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    extractor = CamExtractor(model, method=method)
    batched = extractor.layer_cams(x, y)
    assert model.training and model.body.bn1.training and not model.body.bn2.training
    single = torch.cat([extractor.layer_cams(x[i:i + 1], y[i:i + 1]) for i in range(6)])
    assert batched.shape == (6, 4, 4)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    assert batched.min() >= 0 and batched.max() <= 1
    assert torch.allclose(batched.flatten(1).amax(1), torch.ones(6))  # every map varies here


def test_closed_form_equals_autograd():
    model = _trained_bn_model(1)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 5, (8,))
    a = CamExtractor(model, method="closed_form").layer_cams(x, y)
    b = CamExtractor(model, method="autograd").layer_cams(x, y)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(CamExtractor(model).layer_cams(x, y), a, atol=0, rtol=0)  # auto -> closed form
    # Explicit layer name of the CAM layer also picks the closed form under "auto".
    torch.testing.assert_close(CamExtractor(model, "body").layer_cams(x, y), a, atol=0, rtol=0)


def test_hand_computed_map():
    # F_0 = [[1,2],[3,4]], F_1 = [[2,0],[0,6]]; w_class0 = [1, -1], w_class1 = [0, 1].
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 6.0]]]])
    model = IdentityNet([[1.0, -1.0], [0.0, 1.0]])
    # class 0: 1*F0 - 1*F1 = [[-1,2],[3,-2]] -> ReLU [[0,2],[3,0]] -> /3
    expected0 = torch.tensor([[[0.0, 2.0 / 3.0], [1.0, 0.0]]])
    # class 1: F1 = [[2,0],[0,6]] -> /6
    expected1 = torch.tensor([[[1.0 / 3.0, 0.0], [0.0, 1.0]]])
    for method in ("closed_form", "autograd"):
        extractor = CamExtractor(model, method=method)
        torch.testing.assert_close(extractor.layer_cams(fmap, torch.tensor([0])), expected0)
        torch.testing.assert_close(extractor.layer_cams(fmap, torch.tensor([1])), expected1)
    # targets=None -> argmax: logits = [mean(F0)-mean(F1), mean(F1)] = [0.5, 2] -> class 1
    torch.testing.assert_close(CamExtractor(model).layer_cams(fmap), expected1)
    _, cam, logits = features_and_cams(model, fmap, torch.tensor([0]))
    torch.testing.assert_close(cam, expected0)
    torch.testing.assert_close(logits, torch.tensor([[0.5, 2.0]]))


def test_constant_map_gives_zeros_not_nan():
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 6.0]]]])
    zero_w = IdentityNet([[0.0, 0.0], [-1.0, -1.0]])  # class 0: all 0; class 1: all negative
    for method in ("closed_form", "autograd"):
        for cls in (0, 1):
            cam = CamExtractor(zero_w, method=method).layer_cams(fmap, torch.tensor([cls]))
            assert torch.equal(cam, torch.zeros(1, 2, 2))
    const = torch.full((2, 2, 3, 3), 0.7)
    cam = CamExtractor(IdentityNet([[1.0, 0.5]])).layer_cams(const, torch.tensor([0, 0]))
    assert torch.equal(cam, torch.zeros(2, 3, 3))
    assert not torch.isnan(normalize_cams(torch.zeros(3, 4, 4))).any()


def test_unknown_layer_lists_names():
    model = TinyNet()
    with pytest.raises(UserError) as err:
        CamExtractor(model, "layer9")
    msg = str(err.value)
    assert "layer9" in msg and "body" in msg and "body.conv1" in msg and "fc" in msg
    with pytest.raises(UserError, match="spatial layer"):
        CamExtractor(model, "fc", "autograd").layer_cams(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("layer", ["body.conv1", "body.bn1"])
def test_autograd_on_earlier_layer(layer):
    model = _trained_bn_model(2)
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([1, 2, 3])
    cam = CamExtractor(model, layer).layer_cams(x, y)
    assert cam.shape == (3, 8, 8)
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    # bn1 feeds an in-place ReLU: the captured activation must still be the pre-ReLU output.
    # Check against a hand-rolled Grad-CAM on the same layer.
    model.eval()
    acts = {}
    mod = dict(model.named_modules())[layer]

    def keep(_m, _i, o):
        acts["a"] = o.clone()  # returns None: the in-place ReLU must not reach our copy

    h = mod.register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    h.remove()
    a = acts["a"].requires_grad_(True)
    # rerun the rest of the network by hand from this layer
    rest = []
    found = False
    for name, m in model.body.named_children():
        if found:
            rest.append(m)
        if "body." + name == layer:
            found = True
    out = a.clone()
    for m in rest:
        out = m(out)
    logits = model.head(out)
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), a)
    raw = torch.relu((g.mean((2, 3))[:, :, None, None] * a.detach()).sum(1))
    torch.testing.assert_close(cam, normalize_cams(raw), atol=1e-5, rtol=0)


def test_no_side_effects_on_parameters_and_hooks():
    model = _trained_bn_model(3)
    x = torch.randn(4, 3, 8, 8)
    CamExtractor(model, method="autograd").layer_cams(x, torch.tensor([0, 1, 2, 3]))
    CamExtractor(model, "body.conv2", "autograd").layer_cams(x)
    features_and_cams(model, x)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    # Frozen parameters: autograd still works and nothing is left changed.
    for p in model.parameters():
        p.requires_grad_(False)
    targets = torch.tensor([0, 1, 2, 3])
    cam = CamExtractor(model, method="autograd").layer_cams(x, targets)
    torch.testing.assert_close(cam, CamExtractor(model, method="closed_form").layer_cams(x, targets), atol=1e-5, rtol=0)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_mode_restored_on_exception_and_inside_no_grad():
    model = _trained_bn_model(4)
    x = torch.randn(2, 3, 8, 8)
    for method in ("closed_form", "autograd"):
        with pytest.raises(UserError):
            CamExtractor(model, method=method).layer_cams(x, torch.tensor([0, 99]))  # label out of range
        assert model.training and model.body.bn1.training
    autograd = CamExtractor(model, method="autograd")
    with torch.no_grad():
        a = autograd.layer_cams(x, torch.tensor([0, 1]))
    with torch.inference_mode():
        b = autograd.layer_cams(x.clone(), torch.tensor([0, 1]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, CamExtractor(model).layer_cams(x, torch.tensor([0, 1])), atol=1e-5, rtol=0)


def test_features_and_cams_one_pass():
    model = _trained_bn_model(5)
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([4, 3, 2, 1, 0])
    fmap, cam, logits = features_and_cams(model, x, y)
    assert model.training
    assert fmap.shape == (5, 8, 4, 4) and cam.shape == (5, 4, 4) and logits.shape == (5, 5)
    assert not fmap.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fmap, model.features(x))
        torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(cam, CamExtractor(model, method="autograd").layer_cams(x, y), atol=1e-5, rtol=0)
    fmap_g, _, logits_g = features_and_cams(model, x, y, with_grad=True)
    assert fmap_g.requires_grad and logits_g.requires_grad


def test_extractor_resolves_layer_and_method_once():
    model = TinyNet()
    for layer in (None, "body"):
        ex = CamExtractor(model, layer)
        assert (ex.layer, ex.method) == ("body", "closed_form")
    assert CamExtractor(model, None, "autograd").method == "autograd"
    other = CamExtractor(model, "body.conv2", "auto")
    assert (other.layer, other.method) == ("body.conv2", "autograd")
    mlp = CamExtractor(MLPHeadNet())  # a head that is not nn.Linear: autograd even at the CAM layer
    assert (mlp.layer, mlp.method) == ("body", "autograd")
    with pytest.raises(UserError, match="closed-form CAM needs"):
        CamExtractor(MLPHeadNet(), method="closed_form")
    with pytest.raises(UserError, match="unknown Grad-CAM method 'fast'"):
        CamExtractor(model, method="fast")
    with pytest.raises(UserError, match="layer9"):
        CamExtractor(model, "layer9")
    with pytest.raises(UserError, match="has no `cam_layer`"):
        CamExtractor(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_extractor_closed_form_only_at_the_cam_layer():
    with pytest.raises(UserError) as err:
        CamExtractor(TinyNet(), "body.conv1", "closed_form")
    msg = str(err.value)
    assert "closed_form" in msg and "'body'" in msg and "'body.conv1'" in msg and "autograd" in msg


def test_extractor_closed_form_equals_autograd_at_the_cam_layer():
    model = _trained_bn_model(6)
    x = torch.randn(7, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    closed_form, autograd = CamExtractor(model, method="closed_form"), CamExtractor(model, method="autograd")
    f1, c1, l1 = closed_form(x, y)
    f2, c2, l2 = autograd(x, y)
    assert model.training and model.body.bn1.training
    assert f1.shape == (7, 8, 4, 4) and c1.shape == (7, 4, 4) and l1.shape == (7, 5)
    assert torch.equal(f1, f2) and not f2.requires_grad and not l2.requires_grad
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=0)
    # at the CAM layer, layer_cams gives the very maps of a call (the layer's own resolution)
    assert torch.equal(closed_form.layer_cams(x, y), c1)
    assert torch.equal(autograd.layer_cams(x, y), c2)
    # targets=None -> the predicted class
    assert torch.equal(autograd(x)[1], autograd(x, l1.argmax(1))[1])
    assert all(p.grad is None for p in model.parameters())


def test_extractor_autograd_through_a_non_linear_head():
    torch.manual_seed(7)
    model = MLPHeadNet().eval()
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([4, 0, 2, 1])
    fmap, cam, logits = CamExtractor(model)(x, y)
    with torch.no_grad():
        expected_fmap = model.features(x)
    leaf = expected_fmap.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.head(leaf).gather(1, y[:, None]).sum(), leaf)
    expected = normalize_cams(torch.relu((grad.mean((2, 3))[:, :, None, None] * expected_fmap).sum(1)))
    torch.testing.assert_close(fmap, expected_fmap, atol=0, rtol=0)
    torch.testing.assert_close(logits, model(x).detach())
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("layer", ["body.conv1", "body.relu1"])
def test_extractor_resizes_other_layers_to_the_cam_layer(layer):
    model = _trained_bn_model(8)
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([1, 2, 3, 4, 0])
    ex = CamExtractor(model, layer)
    fmap, cam, logits = ex(x, y)
    assert model.training
    own = ex.layer_cams(x, y)
    assert own.shape == (5, 8, 8)
    assert cam.shape == (5, 4, 4) and fmap.shape == (5, 8, 4, 4)
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    resized = F.interpolate(own[:, None], size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(cam, normalize_cams(resized[:, 0]))
    f0, _, l0 = CamExtractor(model)(x, y)
    assert torch.equal(fmap, f0) and torch.equal(logits, l0)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
