"""--device: auto / cpu / an existing GPU index; a GPU this machine lacks is a user error, never the CPU."""
import pytest
import torch

from tests.helpers import run_main_in_process
from utils import distributed
from utils.device import resolve_device
from utils.errors import UserError


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_gpu_index_without_cuda_is_a_user_error(monkeypatch):
    gpus(monkeypatch, 0)
    for spec in ("7", "0", "cuda:0"):
        with pytest.raises(UserError, match=r"no CUDA GPU.*--device cpu"):
            resolve_device(spec)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_gpu_index_beyond_the_visible_gpus_lists_them(monkeypatch):
    gpus(monkeypatch, 2)
    with pytest.raises(UserError, match=r"--device 2: only 2 GPUs visible: 0, 1\."):
        resolve_device("2")
    assert resolve_device("1") == resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="'auto', 'cpu' or a GPU index"):
        resolve_device("gpu")
    gpus(monkeypatch, 1)
    with pytest.raises(UserError, match=r"only 1 GPU visible: 0\."):
        resolve_device("cuda:1")


def test_torchrun_applies_the_same_rule_and_keeps_gloo_on_the_cpu(monkeypatch):
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: backends.append(backend))
    gpus(monkeypatch, 0)
    with pytest.raises(UserError, match="no CUDA GPU"):
        distributed.setup_device("7")
    assert backends == []  # refused before joining a process group
    assert distributed.setup_device("cpu") == torch.device("cpu") and backends == ["gloo"]
    assert distributed.setup_device("auto") == torch.device("cpu") and backends == ["gloo", "gloo"]


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a GPU 7")
def test_phase_i_with_a_missing_gpu_exits_2_before_any_output(tmp_path):
    code, err = run_main_in_process("phase_i_train_or_test.py", "--config", "smoke", "--device", "7", cwd=tmp_path)
    assert code == 2 and err.startswith("error: --device 7: ") and "Traceback" not in err
    assert not (tmp_path / "checkpoints/phase_i/smoke/default").exists()  # no run started
