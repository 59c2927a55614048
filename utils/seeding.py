"""Seeding: every random draw of a run is a pure function of its seed and where it happens, which
makes a resumed run replay exactly what a straight one does and makes results independent of the
number of processes and DataLoader workers.

One helper, :func:`stream_seed`: a seed for a named stream and a position, e.g.
``stream_seed(seed, "tailcalib.shuffle", epoch)`` or ``stream_seed(seed, epoch, 1 + rank)``. Names are
looked up in :data:`STREAMS` (one table, so two streams never share a number by accident within one
run kind); integers are positions (epoch, iteration, batch, rank, view).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

# stream name -> its number. Streams of different runs (phase III maps vs TailCalib) may share a number.
STREAMS = {
    "phase_iii.images": 1,      # file-dataset augmentation of a phase III map method's iteration (per rank)
    "tailcalib.generate": 1,    # TailCalib's calibrated samples (per epoch online, once offline)
    "tailcalib.augment": 2,     # TailCalibX's augmented training images (per epoch)
    "tailcalib.shuffle": 3,     # the linear classifier's minibatch order (per epoch)
    "decoupled.sample": 1,      # LWS / cRT class-balanced batches (per epoch)
    # phase I derives (seed, epoch) and (seed, epoch, 1 + rank): its streams take numbers no epoch reaches
    "phase_i.balanced": 1_000_001,  # CBD's class-balanced rows of every batch (per epoch)
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# the cuBLAS workspace settings under which its GEMMs are deterministic (torch accepts these two)
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def set_determinism(enabled: bool) -> None:
    """Turn torch's deterministic mode on or off for this process (the ``determinism`` config key).

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises,
    naming itself, rather than silently varying), cuDNN deterministic, no cuDNN autotuning. Off: torch's
    defaults, so one process running several phases (the pipeline) gives each its own setting."""
    if enabled and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        # Before any CUDA work: PyTorch reads the cuBLAS workspace size once, when the process's first
        # cuBLAS handle is created, so a value set after the first GEMM would not take effect (torch's
        # check would pass, the workspace would be the default one). Hence the phases apply this at
        # their setup, before building models or moving data to the GPU.
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm from run to run


def _derived_seed(seed: int, step: int) -> int:
    """A seed for step `step` below `seed` (distinct, stable across resumes)."""
    return (seed * 1_000_003 + step * 7_919 + 17) % 2**31


def stream_seed(seed: int, *path: int | str) -> int:
    """The seed of `path` below `seed`: each part (a stream name of STREAMS, or an integer position)
    derives the next seed."""
    for part in path:
        seed = _derived_seed(seed, STREAMS[part] if isinstance(part, str) else part)
    return seed
