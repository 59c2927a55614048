"""The pipeline's data step: installing a dataset's files from the system's packages before a chain
starts (the app layer: the datasets themselves only read files, or download through torchvision)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Callable

from datasets.fashion_mnist import find_fashion_mnist


def ensure_fashion_mnist(dataset_cfg: dict, say: Callable[[str], None] = print) -> None:
    """Data step: Fashion-MNIST from Debian's package when its IDX files are nowhere to be found.

    Uses the dataset's own search (``find_fashion_mnist``). Installs ``dataset-fashion-mnist`` with
    apt-get only where apt-get exists and we are root; otherwise (or if that fails) the dataset
    falls back to its torchvision download or its own clear error. `say` prints the progress lines."""
    if dataset_cfg.get("name") != "fashion-mnist-LT":
        return
    root = dataset_cfg.get("root")
    if find_fashion_mnist(root) is not None:
        return
    apt = shutil.which("apt-get")
    is_root = getattr(os, "geteuid", lambda: -1)() == 0
    if apt is None or not is_root:
        why = "apt-get is not available" if apt is None else "not running as root"
        say(f"data: Fashion-MNIST IDX files not found and {why}; the dataset will try its own download")
        return
    say("data: Fashion-MNIST IDX files not found; installing Debian's dataset-fashion-mnist (apt-get)")
    started = time.perf_counter()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update"], [apt, "install", "-y", "dataset-fashion-mnist"]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            say(f"data: '{' '.join(command[1:])}' failed ({tail[0]}); the dataset will try its own download")
            return
    found = find_fashion_mnist(root) is not None
    say(f"data: dataset-fashion-mnist installed in {time.perf_counter() - started:.1f} s"
        + ("" if found else "; IDX files still not found, the dataset will try its own download"))
