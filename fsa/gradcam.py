"""Grad-CAM (docs/METHOD.md 2.3), batched: one forward and at most one backward per batch
(plus a no-grad forward for the CAM-layer maps when :class:`CamExtractor` explains another layer).

Definition: for the feature map ``F`` of a chosen layer and target class ``c``,
``M = ReLU(sum_k a_k F_k)`` with ``a_k`` = spatial mean of ``d logit_c / d F_k``, then min-max
normalised to [0, 1] per sample; a constant map (including all zeros after the ReLU) becomes all
zeros, never NaN.

Two ways to get ``a_k``:

* ``"closed_form"``: at the CAM layer of a GAP + linear head, ``logit_c = sum_k w_ck mean_ij F_k(i, j)
  + b_c``, so ``d logit_c / d F_k(i, j) = w_ck / (H*W)`` at every position and its spatial mean is
  ``a_k = w_ck / (H*W)``: the autograd ``a_k`` without a backward pass. The ``1/(H*W)`` is kept so
  that even the raw (unnormalised) maps are the autograd ones. Both paths agree up to float
  rounding, not bit for bit: autograd spreads ``w_ck / (H*W)`` over the positions and averages it
  back (and under autocast its gradient has the autocast dtype).
* ``"autograd"``: ``torch.autograd.grad`` of the summed target logits with respect to the layer's
  output; in eval mode samples are independent, so this gives every sample its own
  ``d logit_c / d F``. At the CAM layer the backbone runs without a graph and only ``head`` is
  differentiated (the feature map is made a leaf); at any other layer a forward hook captures the
  output during a full forward. Works for any differentiable head. ``autograd.grad`` (not
  ``.backward()``) keeps parameter ``.grad`` clean.

:class:`CamExtractor` resolves the layer and the method once (``"auto"``: closed form at the CAM
layer of a model whose ``fc`` is an ``nn.Linear``, autograd otherwise) and gives the CAM-layer
feature maps, CAMs and logits of a batch; a CAM of another layer is resized bilinearly to the
CAM-layer resolution and re-normalised. :meth:`CamExtractor.layer_cams` gives the CAMs at the chosen
layer's own resolution; :func:`features_and_cams` is the closed form alone.

CAMs are always computed in eval mode, because BatchNorm in train mode couples the samples of a
batch (a sample's CAM would depend on its batch-mates); every module's previous mode is restored
afterwards (:func:`models.base.eval_mode`), also on exceptions.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import eval_mode
from utils.errors import UserError

__all__ = [
    "CamExtractor",
    "features_and_cams",
    "cam_from_weights",
    "normalize_cams",
    "available_cam_layers",
]

_METHODS = ("auto", "closed_form", "autograd")


def available_cam_layers(model: nn.Module) -> list[str]:
    """Names worth offering for ``layer=``: the top-level children and their children.

    Any name of ``model.named_modules()`` is accepted; this is the short list shown in errors
    (a full ResNet has hundreds of modules).
    """
    names: list[str] = []
    for name, child in model.named_children():
        names.append(name)
        names.extend(f"{name}.{sub}" for sub, _ in child.named_children())
    return names


def normalize_cams(cam: Tensor) -> Tensor:
    """Per-sample min-max normalisation of ``cam [B, H, W]`` to [0, 1], in float32.

    A map whose range is zero, or below float32 resolution relative to its magnitude (pure
    rounding noise), becomes all zeros instead of NaN / amplified noise.
    """
    cam = cam.float()
    flat = cam.flatten(1)
    lo = flat.amin(dim=1)
    hi = flat.amax(dim=1)
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    degenerate = rng <= torch.finfo(torch.float32).eps * 4 * scale
    degenerate |= rng <= 0  # covers the all-zero map (scale == 0)
    safe_rng = torch.where(degenerate, torch.ones_like(rng), rng)
    out = (cam - lo[:, None, None]) / safe_rng[:, None, None]
    out = torch.where(degenerate[:, None, None], torch.zeros_like(out), out)
    return out.clamp_(0.0, 1.0)


def cam_from_weights(fmap: Tensor, weights: Tensor) -> Tensor:
    """``normalize(ReLU(sum_k a_k F_k))`` for ``fmap [B,C,H,W]`` and ``weights a [B,C]``."""
    raw = torch.einsum("bc,bchw->bhw", weights.float(), fmap.float())
    return normalize_cams(F.relu(raw))


def _resolve_targets(targets: Tensor | None, logits: Tensor) -> Tensor:
    """Per-sample target classes: the given labels, or the argmax prediction when None."""
    batch, num_classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if targets.numel() != batch:
        raise UserError(
            f"Grad-CAM got {targets.numel()} target labels for a batch of {batch} images; "
            "pass one label per image (or none to use the predicted class)."
        )
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise UserError(
            f"Grad-CAM target labels must lie in [0, {num_classes - 1}] (the model has "
            f"{num_classes} classes); got labels from {int(targets.min())} to "
            f"{int(targets.max())}. Check that the dataset and the checkpoint agree."
        )
    return targets


def _check_linear_head(model: nn.Module) -> nn.Linear:
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear) or not hasattr(model, "features") or not hasattr(model, "head"):
        raise UserError(
            f"the closed-form CAM needs a model with features(), head() and an nn.Linear `fc` "
            f"(GAP + linear head); {type(model).__name__} does not have them. "
            "Use method='autograd' instead."
        )
    return fc


def _check_fmap(fmap: Tensor) -> Tensor:
    if fmap.dim() != 4:
        raise UserError(
            f"model.features() must return a [B,C,H,W] feature map, got shape {tuple(fmap.shape)}."
        )
    return fmap


def _prepare_input(x: Tensor) -> Tensor:
    # Inference tensors (created under torch.inference_mode) cannot enter an autograd graph.
    return x.clone() if x.is_inference() else x


def features_and_cams(
    model: nn.Module,
    x: Tensor,
    targets: Tensor | None = None,
    *,
    use_eval_mode: bool = True,
    with_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass: CAM-layer feature maps, their closed-form CAMs and the logits.

    Returns ``(fmap [B,C,H,W], cam [B,H,W] float32 in [0,1], logits [B,K])``. ``targets``
    (one label per image) default to the argmax prediction. Phase II and phase III use this so
    that the feature maps they fuse are the very ones the CAMs were computed from.

    ``use_eval_mode`` (default True, as docs/METHOD.md 2.3 requires for CAMs) runs the forward in eval
    mode and restores every module's mode afterwards; pass False only if the caller wants the
    features in the model's current mode. ``with_grad`` keeps the autograd graph on ``fmap`` and
    ``logits`` (e.g. when phase III fine-tunes the last stage); the CAM is always detached.
    """
    fc = _check_linear_head(model)
    mode_ctx = eval_mode(model) if use_eval_mode else contextlib.nullcontext()
    grad_ctx = torch.enable_grad() if with_grad else torch.no_grad()
    with mode_ctx, grad_ctx:
        fmap = _check_fmap(model.features(x))
        logits = model.head(fmap)
        tgt = _resolve_targets(targets, logits)
        height, width = fmap.shape[-2:]
        # Closed form: a_k = w_ck / (H*W) (the 1/(H*W) is kept so raw maps equal Grad-CAM's).
        weights = fc.weight.detach()[tgt] / float(height * width)
        cam = cam_from_weights(fmap.detach(), weights)
    return fmap, cam, logits


def _target_score(logits: Tensor, targets: Tensor | None) -> Tensor:
    """Sum over the batch of each sample's target logit (the quantity Grad-CAM differentiates)."""
    tgt = _resolve_targets(targets, logits.detach())
    if tgt.is_inference():  # gather saves its index for backward
        tgt = tgt.clone()
    return logits.gather(1, tgt[:, None]).sum()


def _cam_from_gradient(act: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM of ``act`` given ``d score / d act``: ``a_k`` = the gradient's spatial mean."""
    return cam_from_weights(act.detach(), grad.mean(dim=(2, 3)).detach())


def _resize_cams(cam: Tensor, size: torch.Size) -> Tensor:
    """``cam [B,h,w]`` resized bilinearly to ``size`` and re-normalised (as is if it fits)."""
    if cam.shape[-2:] == size:
        return cam
    resized = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)
    return normalize_cams(resized[:, 0])


class CamExtractor:
    """Grad-CAM of one layer by one method, both resolved (and checked) once, applied to batches.

    ``layer``: a name from ``model.named_modules()`` (None -> ``model.cam_layer``). ``method``:
    ``"closed_form"`` (CAM layer of a GAP + linear head, no backward), ``"autograd"`` (any layer /
    differentiable head) or ``"auto"`` (closed form when ``layer`` is the CAM layer and the model's
    ``fc`` is an ``nn.Linear``, else autograd). ``.layer`` and ``.method`` hold the resolved values.
    Every call runs in eval mode and restores each module's training flag; parameter ``.grad`` is
    never written.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, method: str = "auto") -> None:
        if method not in _METHODS:
            raise UserError(
                f"unknown Grad-CAM method '{method}'; choose one of: {', '.join(_METHODS)}."
            )
        cam_layer = getattr(model, "cam_layer", None)
        if layer is None:
            if cam_layer is None:
                raise UserError(
                    f"{type(model).__name__} has no `cam_layer`; pass layer= one of: "
                    f"{', '.join(available_cam_layers(model))}."
                )
            layer = cam_layer
        modules = dict(model.named_modules())
        if layer not in modules:
            raise UserError(
                f"unknown Grad-CAM layer '{layer}'. Valid layers include: "
                f"{', '.join(available_cam_layers(model))} "
                "(any name from model.named_modules() works)."
            )
        at_cam_layer = layer == cam_layer
        if method == "auto":
            has_linear_head = isinstance(getattr(model, "fc", None), nn.Linear)
            method = "closed_form" if (at_cam_layer and has_linear_head) else "autograd"
        if method == "closed_form":
            if not at_cam_layer:
                raise UserError(
                    f"the closed_form Grad-CAM method only applies to the CAM layer ('{cam_layer}'), "
                    f"not '{layer}'; use method 'autograd' or 'auto' (gradcam.method in a config) "
                    "for other layers."
                )
            _check_linear_head(model)
        self.model, self.layer, self.method = model, layer, method
        self._module = modules[layer]
        # At the CAM layer, autograd needs only the head (given the model's features/head split).
        self._head_only = at_cam_layer and hasattr(model, "features") and hasattr(model, "head")

    def __call__(self, x: Tensor, targets: Tensor | None = None, *,
                 with_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(fmap [B,C,H,W] at the CAM layer, cam [B,H,W] float32 in [0,1], logits [B,K])``.

        The CAM always has the CAM-layer resolution (one of another layer is resized bilinearly and
        re-normalised); ``targets`` (one label per image) default to the argmax prediction. Needs the
        model's ``features()`` / ``head()`` (the LTModel interface). ``with_grad`` keeps the autograd
        graph on ``fmap`` (phase III online with the last stage unfrozen); the CAM is always detached.
        """
        if self.method == "closed_form":
            return features_and_cams(self.model, x, targets, with_grad=with_grad)
        with eval_mode(self.model):
            if self._head_only:
                return self._head_autograd(x, targets, with_grad)
            cam = self._hooked_autograd(x, targets)
            with torch.enable_grad() if with_grad else torch.no_grad():
                fmap = self.model.features(x)
            with torch.no_grad():
                logits = self.model.head(fmap)
        return fmap, _resize_cams(cam, fmap.shape[-2:]), logits

    def layer_cams(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """CAMs ``[B, h, w]`` (float32 in [0,1]) at ``self.layer``'s own resolution ``h, w``."""
        if self.method == "closed_form" or self._head_only:
            return self(x, targets)[1]
        with eval_mode(self.model):
            return self._hooked_autograd(x, targets)

    def _head_autograd(self, x: Tensor, targets: Tensor | None, with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        """At the CAM layer: one backbone forward (with its graph only if ``with_grad``), autograd through
        the head only, from a detached copy of the maps."""
        with torch.enable_grad() if with_grad else torch.no_grad():
            fmap = _check_fmap(self.model.features(x))
        with torch.inference_mode(False), torch.enable_grad():
            leaf = _prepare_input(fmap.detach()).requires_grad_(True)
            logits = self.model.head(leaf)
            (grad,) = torch.autograd.grad(_target_score(logits, targets), leaf)
        return fmap, _cam_from_gradient(fmap, grad), logits.detach()

    def _hooked_autograd(self, x: Tensor, targets: Tensor | None) -> Tensor:
        """Any layer: a forward hook captures its output in a full forward, then one backward."""
        layer = self.layer
        captured: list[Tensor] = []

        def hook(_mod: nn.Module, _inp: tuple, out: object) -> Tensor:
            if not isinstance(out, Tensor):
                raise UserError(
                    f"Grad-CAM layer '{layer}' returns {type(out).__name__}, not a tensor; "
                    "choose a convolutional layer or stage."
                )
            # Frozen parameters + plain input -> the activation has no graph; make it a leaf we can
            # differentiate against (only this local tensor is touched, no module state changes).
            act = out if out.requires_grad else out.detach().requires_grad_(True)
            captured.append(act)
            # Hand a copy downstream so an in-place op after this layer (ReLU(inplace=True))
            # cannot overwrite the captured activation or its graph.
            return act.clone()

        handle = self._module.register_forward_hook(hook)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                logits = self.model(_prepare_input(x))
        finally:
            handle.remove()
        if not captured:
            raise UserError(
                f"Grad-CAM layer '{layer}' was not used in the model's forward pass; "
                f"choose one of: {', '.join(available_cam_layers(self.model))}."
            )
        act = captured[-1]
        if act.dim() != 4:
            raise UserError(
                f"Grad-CAM needs a spatial layer with output [B,C,H,W]; '{layer}' outputs shape "
                f"{tuple(act.shape)}. Choose one of: {', '.join(available_cam_layers(self.model))}."
            )
        with torch.inference_mode(False), torch.enable_grad():
            (grad,) = torch.autograd.grad(_target_score(logits, targets), act)
        return _cam_from_gradient(act, grad)

