"""The arguments every phase script shares, and the user-error boundary."""
from __future__ import annotations

import argparse
import errno
import shlex
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from utils import distributed, layout, run_dir, run_lock
from utils.config import CONFIG_PHASES, CONFIG_ROOT, config_text, load_config
from utils.errors import UserError


@dataclass(frozen=True)
class RunSpec:
    """What a phase command asks for, typed: every runner takes one (the scripts build it from their
    flags, the pipeline directly). Defaults are the scripts' defaults."""

    config: str
    note: str = "default"
    device: str = "auto"
    opts: tuple[str, ...] = ()
    resume: bool = False
    overwrite: bool = False
    checkpoint: str | None = None  # phase: test (phase I / III), phase II's phase I checkpoint
    # phase III: the note whose phase I run and phase II outputs the run reads (None: its own note); sweep.py
    # trains each grid point's phase III runs on the phase I / II of one base note per seed
    upstream_note: str | None = None

    @property
    def opts_args(self) -> list[str]:
        """This run's --opts as command-line words (none: []), for the commands that messages suggest."""
        return ["--opts", *self.opts] if self.opts else []

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunSpec":
        """The spec of a parsed command line (flags a script lacks keep their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in known}
        values["opts"] = tuple(values.get("opts") or ())
        return cls(**values)


@dataclass(frozen=True)
class VisualizeSpec(RunSpec):
    """visualize.py's flags (see its --help)."""

    run_name: str = "phase_i"  # --phase: the run folder whose model is explained
    classes: tuple[int, ...] | None = None
    samples: int = 4
    layer: str | None = None
    split: str = "train"
    panel: int = 128

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "VisualizeSpec":
        spec = super().from_args(args)
        return replace(spec, classes=None if spec.classes is None else tuple(spec.classes))


class ScriptParser(argparse.ArgumentParser):
    """The parser of every top-level script. Every script takes --output-root, which becomes the process's
    output root as the arguments are parsed (`layout.set_output_root`), so every path after it follows.
    A script with a config also takes --print-config: print that resolved config (`print_config` of the
    parsed arguments, YAML) and exit 0 without touching a file, as --help does."""

    def __init__(self, description: str, print_config: Callable[[argparse.Namespace], str] | None = None):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--output-root", metavar="DIR",
                          help=f"folder of all outputs (checkpoints/, run_summary/, features*/, visualizations/, "
                               f"reports/); default ${layout.OUTPUT_ROOT_ENV}, else the working directory")
        self._print_config = print_config
        if print_config is not None:
            self.add_argument("--print-config", action="store_true",
                              help="print the resolved config (after --opts) as YAML and exit")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        layout.set_output_root(parsed.output_root)
        layout.output_root()  # a bad FSA_LT_OUTPUT_ROOT is named now, before any work
        if self._print_config is not None and parsed.print_config:
            text = self._print_config(parsed)
            if distributed.first_process():  # under torchrun: once
                print(text, end="", flush=True)
            sys.exit(0)
        return parsed


def phase_parser(description: str, *, training: bool = True) -> argparse.ArgumentParser:
    """The arguments every phase script shares; --print-config prints the config of the phase whose
    folder the script reads (`config_phase`)."""
    parser = ScriptParser(description, print_config=_phase_config_text)
    parser.add_argument("--config", required=True, help="config name (configs/<phase>/NAME.yaml) or path to a YAML file")
    parser.add_argument("--device", default=RunSpec.device, help="auto (default), cpu, or a GPU index such as 0")
    parser.add_argument("--note", default=RunSpec.note, help="experiment name; outputs go to .../<config>/<note>/")
    # extend: a repeated --opts adds to the first (the commands the project prints may append one)
    parser.add_argument("--opts", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. train.lr=0.01 (may be repeated)")
    if training:
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
        parser.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run")
    return parser


def training_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the train-or-test scripts (phase I and III)."""
    parser = phase_parser(description)
    parser.add_argument("--checkpoint", help="phase: test only: checkpoint to evaluate (default: this run's best_model.pt)")
    return parser


def phase_iii_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the phase III scripts: those of `training_parser`, and --upstream-note."""
    parser = training_parser(description)
    parser.add_argument("--upstream-note", metavar="NOTE",
                        help="read the phase I run and phase II outputs of note NOTE instead of this run's own "
                             "--note (the run itself goes to --note); recorded in results.json as upstream_note")
    return parser


# the config folder each script reads (visualize.py reads phase II's split settings)
_SCRIPT_CONFIG_PHASE = {"phase_i_train_or_test.py": "phase_i", "phase_ii_extract_feature.py": "phase_ii",
                        "visualize.py": "phase_ii"}


def config_phase(script: str) -> str:
    """The config folder (phase) a phase script reads: phase_i, phase_ii, or phase_iii for the phase III ones."""
    return _SCRIPT_CONFIG_PHASE.get(Path(script).name, "phase_iii")


def _phase_config_text(args: argparse.Namespace) -> str:
    """--print-config of a phase script: its resolved config (the script is sys.argv[0], as for argparse's prog)."""
    return config_text(load_config(args.config, config_phase(sys.argv[0]), args.opts))


def output_root_args() -> list[str]:
    """`["--output-root", DIR]` when this command's --output-root set the root, for the commands messages
    suggest (a root from FSA_LT_OUTPUT_ROOT or the working directory holds for the next command too)."""
    given = layout.output_root_flag()
    return [] if given is None else ["--output-root", str(given)]


def script_command(script: str, config: str, note: str, *extra: str) -> str:
    """The command line a user types to run `script` for a config name and note (for error messages).

    Where the user gave this process a config file rather than a shipped name, the command names the
    matching file (the same file, or its sibling DIR/<phase>/NAME.yaml), so that it runs as written;
    an --output-root of this command is repeated."""
    parts = ["python", script, "--config", _config_argument(config_phase(script), config),
             *([] if note == "default" else ["--note", note]), *output_root_args(), *_one_opts_group(extra)]
    return shlex.join(parts)


def _one_opts_group(words: tuple[str, ...]) -> list[str]:
    """`words` with every ``--opts`` group merged into one where the first stood: argparse keeps only the last
    group, and a key given twice keeps its last value."""
    flags: list[str] = []
    opts: dict[str, str] = {}
    at, in_opts = None, False
    for word in words:
        if word == "--opts":
            at = len(flags) if at is None else at
            in_opts = True
        elif in_opts and not word.startswith("--"):
            opts[word.split("=", 1)[0]] = word
        else:
            in_opts = False
            flags.append(word)
    return flags if at is None else [*flags[:at], "--opts", *opts.values(), *flags[at:]]


def _config_argument(phase: str, name: str) -> str:
    if (CONFIG_ROOT / phase / f"{name}.yaml").is_file():
        return name
    given = _given_config()
    if given is None or not given.endswith((".yaml", ".yml")) or Path(given).stem != name:
        return name
    path = Path(given)
    return str(path.parent.parent / phase / path.name) if path.parent.name in CONFIG_PHASES else given


def _given_config() -> str | None:
    """The --config value of this process's command line, if any."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


_WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit code 2.

    A run that fails before it started puts back what its --overwrite moved aside; the process's run
    locks are released on the way out. Under torchrun every rank runs `main`; rank 0 alone prints the
    message, and a rank that finished waits for the others before leaving the process group."""
    first_rank = distributed.first_process()
    try:
        main()
        distributed.barrier()
    except (UserError, OSError) as exc:
        run_dir.restore_replaced()
        if isinstance(exc, OSError) and exc.errno not in _WRITE_ERRORS:
            raise
        if first_rank:
            print(f"error: {_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        run_dir.restore_replaced()
        print("interrupted. A training run keeps its last checkpoint (last.pt): continue it with the same command "
              "and --resume. Phase II has no resume: run it again with --overwrite; visualize.py: run it again as "
              "it was.", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        run_dir.restore_replaced()
        raise
    finally:
        run_lock.release_locks()
        layout.set_output_root(None)  # the flag is this command's: a caller in the same process starts clean
        distributed.shutdown()


def _message(exc: Exception) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    # a file system that refuses writes: name the path and what to check, not a traceback
    where = f" {exc.filename}" if exc.filename else ""
    return (f"cannot write{where}: {exc.strerror}. Check that the output folders (checkpoints/, run_summary/, "
            f"features/) are writable and the disk has free space, then run the command again "
            f"(with --resume where a training run was interrupted).")
