"""Run the top-level scripts as a user would: a subprocess in a scratch working directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def script_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env["TQDM_DISABLE"] = "1"
    return env


def script_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


def copy_phase_i(src: Path, dst: Path) -> Path:
    """Copy the phase I runs of working directory `src` into `dst` (for tests that modify them)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "checkpoints/phase_i", dst / "checkpoints/phase_i")
    return dst


def run_script(script: str, *args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(script_command(script, *args), cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_main_in_process(script: str, *args: str, cwd: Path) -> tuple[int, str]:
    """Call a script's `main` through `run_cli` in this process (no interpreter start-up).

    Returns (exit code, stderr). For the many bad-input checks that fail before any real work.
    """
    import contextlib
    import importlib
    import io

    from utils.cli import run_cli

    module = importlib.import_module(Path(script).stem)
    old_argv, old_cwd = sys.argv, os.getcwd()
    err = io.StringIO()
    code = 0
    try:
        sys.argv = [script, *args]
        os.chdir(cwd)
        with contextlib.redirect_stderr(err):
            run_cli(module.main)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, err.getvalue()


def run_torchrun(script: str, *args: str, cwd: Path, nproc: int = 2, check: bool = True,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N script args` (gloo on the CPU: pass --device cpu)."""
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"  # N processes share this machine's cores
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / script), *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                             f"\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with RuntimeWarnings silenced (the generator's expected jitter warnings)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)
