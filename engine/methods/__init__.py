"""The method table: every method the pipeline trains and the report shows, each a class instance
registered by the module that defines it.

From the table come the pipeline's steps (table order), the run folders (``Method.folder``), the
report's rows, ids and paired comparisons, the choices of ``finetune.generator`` and ``backbone``, the
phase III config sections (each method's ``section``) and the scripts' ``--help``. The families below
register in table order; a new method is one file that defines and registers it, plus its import here
(docs/ARCHITECTURE.md, "Adding a phase III method"). Nothing here imports torch: a method imports its
runner when it runs, so that ``--help`` and config checks stay fast.
"""
from engine.method_table import (BACKBONE_IDS, BASELINE, DEFAULT_GENERATOR, GENERATOR_NAMES, METHODS, MODES,
                                  SELECTING_KEYS, SUITES, TEACHER_SEED_STEP, Arm, Method, MethodTable, PhaseIIIMethod,
                                  PhaseIMethod, load_object)
from engine.methods import backbones, decoupled, maps, features  # noqa: F401  (registration, in table order)

__all__ = ["BACKBONE_IDS", "BASELINE", "DEFAULT_GENERATOR", "GENERATOR_NAMES", "METHODS", "MODES", "SELECTING_KEYS",
           "SUITES", "TEACHER_SEED_STEP", "Arm", "Method", "MethodTable", "PhaseIMethod", "PhaseIIIMethod", "load_object",
           "phase_i_help", "phase_iii_help"]


def phase_i_help() -> str:
    """The phase I script's list of methods and the --opts that select each, for its ``--help``."""
    lines = ["phase I methods (run folder checkpoints/phase_i-ID/, CE: phase_i/) and the --opts that select them:"]
    lines += [f"  {m.id:<16} {' '.join(m.selecting_opts()) or '(defaults)'}" for m in METHODS.backbones()]
    return "\n".join(lines)


def phase_iii_help(mode: str) -> str:
    """The phase III ``mode`` script's list of methods, with each method's own config section, for its
    ``--help``."""
    methods = [m for m in METHODS.phase_iii_methods() if m.mode == mode]
    lines = [f"finetune.generator values of phase III {mode} (default {DEFAULT_GENERATOR}):"]
    lines += [f"  {m.generator:<11} {m.label}: {m.summary}" for m in methods]
    sections = [s for s in METHODS.sections() if any(m.section is s for m in methods)]
    if sections:
        lines += ["", "their own settings (--opts SECTION.KEY=VALUE; docs/CONFIG.md):"]
        lines += [f"  {s.name}: {s.doc}; " + ", ".join(f"{k}={v!r}" for k, v in s.defaults().items()) for s in sections]
    lines += ["", f"--opts backbone=ID starts from phase I method ID's run (default {BASELINE}; the run goes to "
                  f"<folder>-on-ID): {', '.join(m.id for m in METHODS.backbones())}."]
    return "\n".join(lines)
