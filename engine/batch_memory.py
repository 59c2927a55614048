"""The memory check of a phase III map run (engine.phase_iii_maps), made before its run folder is touched.

:func:`check_batch_memory` compares a conservative estimate of one batch's memory (:func:`batch_bytes`;
online with the backbone's forward working set, :func:`forward_footprint`) with what the device has
available (:func:`available_memory`), so that a batch too large for the machine is refused with the
settings to lower instead of growing until it is killed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from engine.phase_iii import PhaseIIIInputs
from fsa.batch_composition import batch_size
from fsa.feature_store import format_bytes
from models import LTModel
from models.base import eval_mode
from utils import distributed
from utils.errors import UserError


def batch_bytes(rows: int, fmap_shape: Sequence[int], *, image_shape: Sequence[int] | None = None,
                forward_bytes: int = 0, queued_batches: int = 0) -> int:
    """A conservative estimate of the bytes one phase III batch of ``rows`` rows (2*nt*(1+na), or one
    process's share of them) holds at its peak, for feature maps ``fmap_shape`` = (C, H, W).

    Per row, in float32: 4 feature maps (the fetched one; the generated one, counted for every row though
    only nt*na of 2*nt*(1+na) rows are generated; the concatenated batch the classifier reads; and one
    working copy: the store's float16 reads offline, the generator's gathered positions) and 2 CAMs (the
    fetched one, the generator's masks). Online (``image_shape`` = (channels, size, size)) also 2 images
    (decoded and augmented), the backbone's forward working set ``forward_bytes`` (see
    :func:`forward_footprint`), and the images of ``queued_batches`` batches that DataLoader workers
    load ahead."""
    c, h, w = (int(v) for v in fmap_shape)
    per_row = 4 * (4 * c * h * w + 2 * h * w)
    if image_shape is not None:
        image = 4 * math.prod(int(v) for v in image_shape)
        per_row += 2 * image + int(forward_bytes) + queued_batches * image
    return int(rows) * per_row


@torch.no_grad()
def forward_footprint(model: LTModel, image_shape: Sequence[int], device: torch.device,
                      with_grad: bool) -> tuple[tuple[int, ...], int]:
    """``(feature map shape (C, H, W), bytes the backbone's forward pass holds per image)`` from one blank
    image, the bytes from the outputs of its leaf modules: without gradients a residual block holds its
    input, up to two intermediates and its output at once (4x the largest output); with ``with_grad`` (the
    last stage unfrozen) the last stage's outputs are kept for the backward pass, which makes their
    gradients there (2x their sum on top)."""
    sizes: dict[str, int] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: object) -> None:
            sizes[name] = 4 * out.numel() if isinstance(out, torch.Tensor) else 0
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if not any(module.children())]
    try:
        with eval_mode(model):  # as phase III runs it (BatchNorm frozen)
            fmap = model.features(torch.zeros(1, *image_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    total = 4 * max(sizes.values(), default=0)
    if with_grad:
        total += 2 * sum(size for name, size in sizes.items() if name.startswith(f"{model.cam_layer}."))
    return tuple(fmap.shape[1:]), total


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: the free GPU memory, or the host's MemAvailable
    (/proc/meminfo), capped by a cgroup v2 memory limit (containers); None where unknown."""
    if device.type == "cuda":  # what the driver has free, plus what torch's cache holds unused
        free = torch.cuda.mem_get_info(device)[0]
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_batch_memory(inputs: PhaseIIIInputs, unfreeze: bool) -> None:
    """UserError naming finetune.nt / finetune.na when one batch (:func:`batch_bytes`) would need more
    memory than the device has available. Under torchrun each process holds its share of the rows; on the
    CPU the processes of one host share its memory."""
    f, bundle, device = inputs.cfg["finetune"], inputs.bundle, inputs.device
    available = available_memory(device)
    if available is None:
        return
    world = distributed.context().world_size
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    per_batch = batch_size(f["nt"], f["na"])
    rows = -(-per_batch // world)  # this process's share
    if inputs.method.mode == "online":
        image_shape = (bundle.in_channels, bundle.train.image_size, bundle.train.image_size)
        fmap_shape, forward = forward_footprint(inputs.model, image_shape, device, unfreeze)
        queued = 0 if hasattr(bundle.train, "get_batch") else 2 * f["num_workers"]  # DataLoader prefetch_factor 2
        sizes = dict(image_shape=image_shape, forward_bytes=forward, queued_batches=queued)
    else:
        fmap_shape, sizes = inputs.store.fmap_shape, {}
    per_row = sharing * batch_bytes(1, fmap_shape, **sizes)
    needed = rows * per_row
    if needed <= available:
        return
    fitting_nt = (available // per_row) * world // (2 * (1 + f["na"]))
    fix = (f"Lower finetune.nt (at most {fitting_nt} fits with finetune.na={f['na']}: --opts finetune.nt={fitting_nt}) "
           "or finetune.na." if fitting_nt >= 1 else "Even finetune.nt=1 does not fit: free memory, or use a device "
           "with more.")
    what = f"{'x'.join(map(str, fmap_shape))} feature maps" + (" and their images" if sizes else "")
    shared = f" (by the {sharing} processes of this host)" if sharing > 1 else ""
    raise UserError(
        f"phase III batches of finetune.nt={f['nt']}, finetune.na={f['na']} ({per_batch} rows of {what}) need about "
        f"{format_bytes(needed)} of memory at once{shared}, but {device} has {format_bytes(available)} available. {fix}"
    )
