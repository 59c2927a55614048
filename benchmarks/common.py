"""What every benchmark script shares: its data sets, the device's name, and clock synchronisation."""
import torch


def dataset_cfg(which: str, augment: bool) -> dict:
    """Fashion-MNIST-LT (imbalance 100, the Debian IDX files) or a small synthetic-LT set (imbalance 10)."""
    if which == "fashion-mnist":
        return {"name": "fashion-mnist-LT", "imbalance": 100, "download": False, "augment": augment}
    return {"name": "synthetic-LT", "imbalance": 10, "augment": augment,
            "synthetic": {"num_classes": 10, "image_size": 32, "train_per_class": 800, "test_per_class": 10, "seed": 0}}


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {threads} thread{'s' if threads != 1 else ''}"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
