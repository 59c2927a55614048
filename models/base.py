"""The common model interface used by training, Grad-CAM and feature synthesis."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# model.classifier: linear = nn.Linear; cosine = the TailCalibX release's CosineDotProduct_Classifier (CosineCE,
# CBD); normed = the LDAM-DRW release's NormedLinear (ldam_drw)
CLASSIFIERS = ("linear", "cosine", "normed")
# the dim of the [classes, features] weight that F.normalize runs along, per form of CosineClassifier
WEIGHT_NORM_DIMS = {"feature": 0, "class": 1}


def inverse_softplus(value: float) -> float:
    """The x with softplus(x) = value (> 0)."""
    return value + math.log(-math.expm1(-value))


class CosineClassifier(nn.Module):
    """``logits = s * normalize(f) @ normalize(W).T (+ b)`` for a ``[classes, features]`` weight ``W``, one
    scale ``s = softplus(raw_scale)`` for all classes (learned, or fixed with ``learn_scale=False``).

    Two forms, each its release's (``build_classifier``):

    - ``weight_norm="feature"``, with bias (``model.classifier: cosine``): the TailCalibX release's
      ``CosineDotProduct_Classifier`` (libs/models/CosineDotProductClassifier.py): ``softplus(scale) *
      mm(x, F.normalize(fc.weight.T, dim=1)) + fc.bias`` with ``x`` L2-normalised per row before it
      (libs/core/core_base.py ``batch_forward``). ``fc.weight.T`` is ``[features, classes]`` and ``dim=1``
      runs over the classes: every *feature's column* of ``W`` has unit norm, not every class's row, so
      the class vectors keep unequal norms. Weight and bias start as ``nn.Linear``'s, the scale at 10.
    - ``weight_norm="class"``, no bias (``model.classifier: normed``): the LDAM-DRW release's
      ``NormedLinear`` (models/resnet_cifar.py): ``F.normalize(x, dim=1).mm(F.normalize(W', dim=0))`` for
      ``W'`` of shape ``[features, classes]`` = ``W.T``, i.e. every class's row of ``W`` has unit norm: a
      cosine. Its weight starts as ``uniform_(-1, 1)`` then each class vector rescaled to norm 1. The
      release multiplies by ``s = 30`` in its loss; here the logits carry the fixed ``s`` (the argmax is
      the same; softmax scores are those the loss was trained on).

    The form is saved (buffer ``weight_norm_dim``) and checked on loading, so a state of the other form,
    or one saved before the forms followed their releases (per-class rows with a bias for both), fails
    with a one-line reason instead of loading into numbers it was not trained for.

    Because the feature is normalised, the logit is not linear in the feature map: Grad-CAM takes the
    autograd path (``fsa.gradcam``'s ``auto`` does)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0, learn_scale: bool = True, *,
                 weight_norm: str = "feature", bias: bool = True):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine classifier scale must be > 0, got {scale}")
        if weight_norm not in WEIGHT_NORM_DIMS:
            raise ValueError(f"weight_norm must be one of {', '.join(WEIGHT_NORM_DIMS)}, got {weight_norm!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_norm, self.norm_dim = weight_norm, WEIGHT_NORM_DIMS[weight_norm]
        reference = nn.Linear(in_features, out_features, bias=bias)  # nn.Linear's initialisation
        if weight_norm == "class":  # NormedLinear: uniform(-1, 1), every class vector rescaled to unit norm
            with torch.no_grad():
                reference.weight.uniform_(-1, 1)
                reference.weight.copy_(F.normalize(reference.weight, dim=1))
        self.weight = nn.Parameter(reference.weight.detach().clone())
        if bias:
            self.bias = nn.Parameter(reference.bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        raw = torch.tensor(inverse_softplus(scale))
        if learn_scale:
            self.raw_scale = nn.Parameter(raw)
        else:
            self.register_buffer("raw_scale", raw)
        self.register_buffer("weight_norm_dim", torch.tensor(self.norm_dim, dtype=torch.long))

    @property
    def kind(self) -> str:
        """Its ``model.classifier`` value."""
        return "cosine" if self.weight_norm == "feature" else "normed"

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    def scale_value(self) -> float:
        return float(self.scale.detach())

    def normalized_weight(self) -> torch.Tensor:
        """``W`` normalised along ``weight_norm_dim``: [classes, features]."""
        return F.normalize(self.weight, dim=self.norm_dim)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """The unscaled, bias-free logits ``normalize(f) @ normalize(W).T``: [N, C] (for ``class``, cos(f, w_c))."""
        return F.normalize(features, dim=1) @ self.normalized_weight().t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.scale * self.cosine(features)
        return logits if self.bias is None else logits + self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # one-line reasons: utils.checkpoint.load_model_state shows the first line of a load error
        if strict:
            key, form = prefix + "weight_norm_dim", f"the {self.kind} classifier ({_FORMS[self.weight_norm]})"
            if self.bias is None and prefix + "bias" in state_dict:
                raise RuntimeError(
                    f"the saved classifier has a bias ({prefix}bias), {form} has none (a bias can absorb the class "
                    f"prior and undo LDAM's margins); the run predates the release's classifier: train it again "
                    f"(--overwrite)")
            if key not in state_dict:
                raise RuntimeError(
                    f"the saved cosine classifier predates the release forms (it normalised each class's weight row "
                    f"and had a bias); {form} differs: train the run again (--overwrite)")
            saved = int(state_dict[key])
            if saved != self.norm_dim:
                other = {0: "cosine", 1: "normed"}.get(saved, f"weight_norm_dim={saved}")
                raise RuntimeError(
                    f"the saved classifier is a {other} one, this model's is {form}: build the model with the run's "
                    f"own model.classifier")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale_value():.4g}, "
                f"weight_norm={self.weight_norm}, bias={self.bias is not None}")


_FORMS = {"feature": "the TailCalibX release's CosineDotProduct_Classifier: each feature's weight column normalised "
                     "over the classes, with a bias",
          "class": "the LDAM-DRW release's NormedLinear: each class's weight row normalised, no bias"}


def build_classifier(kind: str, in_features: int, out_features: int, *, scale: float = 10.0,
                     learn_scale: bool = True) -> nn.Module:
    """A fresh classifier of ``model.classifier`` kind ``kind`` (see :class:`CosineClassifier`)."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "cosine":
        return CosineClassifier(in_features, out_features, scale, learn_scale, weight_norm="feature", bias=True)
    if kind == "normed":
        return CosineClassifier(in_features, out_features, scale, learn_scale, weight_norm="class", bias=False)
    raise ValueError(f"unknown classifier {kind!r}; available: {', '.join(CLASSIFIERS)}")


def fresh_like(fc: nn.Module) -> nn.Module:
    """A newly initialised classifier of the same kind, form and shape as ``fc`` (cRT, TailCalib's fresh head)."""
    if isinstance(fc, CosineClassifier):
        return CosineClassifier(fc.in_features, fc.out_features, fc.scale_value(),
                                isinstance(fc.raw_scale, nn.Parameter), weight_norm=fc.weight_norm,
                                bias=fc.bias is not None).to(fc.weight.device)
    return nn.Linear(fc.in_features, fc.out_features).to(fc.weight.device)



@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore every submodule's own previous ``training`` flag.

    Per-module restoration (rather than ``model.train(prev)``) keeps deliberately frozen
    submodules (e.g. a BatchNorm kept in eval while the rest trains) as they were.
    """
    previous = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in previous:
            module.training = flag


class LTModel(nn.Module):
    """Stem -> residual stages ``layer1..layerN`` -> global average pooling -> ``fc``.

    The split into ``features`` (the CAM-layer map, output of the last stage) and ``head`` exists
    because FSA synthesises feature maps and pushes them through ``head`` alone, so ``head`` must
    accept a map of any spatial size.
    """

    def __init__(
        self,
        arch: str,
        stem: nn.Module,
        stages: list[nn.Module],
        feature_dim: int,
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_dim = feature_dim
        self.stem = stem
        self.stage_names = [f"layer{i + 1}" for i in range(len(stages))]
        for name, stage in zip(self.stage_names, stages):
            self.add_module(name, stage)
        self.cam_layer: str = self.stage_names[-1]
        self.fc = nn.Linear(feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def last_stage(self) -> nn.Module:
        return self.get_submodule(self.cam_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(fmap))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
