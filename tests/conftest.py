"""Fixtures shared across test modules."""
import os
from pathlib import Path

import pytest

from tests.helpers import run_script

# A fixed CPU thread count for runs made inside the test process too (script_env sets it for the scripts):
# tests compare runs bit for bit, and accel.threads: auto would follow the machine's load (utils/threads.py).
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smoke_phase_i(tmp_path_factory) -> Path:
    """A working directory holding one finished smoke phase I run (checkpoints/, run_summary/).

    Read it, or copy it with `tests.helpers.copy_phase_i` before changing anything: other modules share it.
    """
    cwd = tmp_path_factory.mktemp("smoke_phase_i")
    run_script("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", cwd=cwd)
    return cwd
