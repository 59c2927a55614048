"""The config schema of every phase: keys, types, defaults, allowed values.

A config file only states what differs from these defaults. Phase II and III configs hold only
their own settings: dataset and model come from the phase I run they build on (its saved
`config.yaml`), so the phases cannot disagree about them; a phase II / III config that would state
nothing may be left out (`utils.config.load_config`).

This module is the one source of the defaults (`defaults(section)`, e.g. `datasets` fills a partial
`dataset:` section with `defaults(DATASET)`) and of the allowed values. Where the code that
implements the values keeps a registry (losses, LR schedules, optimisers), the field's choices are
read from it when a value is checked (`registry_choices`), so adding a registry entry is all it takes.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from utils.errors import UserError

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
_PLURAL_NAMES = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


# the allowed values of a field: a tuple, or a zero-argument callable that returns one when a value is
# checked (a registry owned by a module that utils must not import at import time; see registry_choices)
Choices = tuple | Callable[[], tuple]


def registry_choices(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    """Choices that are the keys of the registry `module.name` (e.g. `engine.losses.LOSSES`), read when
    a value is checked: the registry is the one list, and utils does not import engine (torch) at
    import time. Use as `F("ce", choices=registry_choices("engine.losses", "LOSSES"))`."""
    def choices() -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(module), name))

    return choices


@dataclass(frozen=True)
class Field:
    """One config value: accepted type(s), default, optionally allowed choices (a tuple or a
    zero-argument callable returning one, resolved at every check: see `registry_choices`)."""

    types: tuple
    default: Any
    choices: Choices | None = None
    nullable: bool = False
    item_type: type | None = None  # for lists

    def allowed(self) -> tuple | None:
        """The allowed values now (None: any value of the right type)."""
        return self.choices() if callable(self.choices) else self.choices

    def coerce(self, value: Any, path: str) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise UserError(f"Config key '{path}' must not be empty (null); default is {self.default!r}.")
        if float in self.types and isinstance(value, str):
            value = _float_or_text(value)
        ok = any(_is_instance(value, t) for t in self.types)
        if not ok:
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in self.types)
            raise UserError(f"Config key '{path}' must be {wanted}, got {value!r} ({type(value).__name__}).")
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.item_type is not None:
            for item in value:
                if not _is_instance(item, self.item_type):
                    raise UserError(
                        f"Config key '{path}' must be a list of {_PLURAL_NAMES[self.item_type]}, got item {item!r}."
                    )
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise UserError(f"Config key '{path}' must be one of {', '.join(map(str, allowed))}; got {value!r}.")
        return copy.deepcopy(value)


def _float_or_text(text: str) -> float | str:
    """YAML 1.1 (PyYAML) reads `5e-4` as a string (it wants `5.0e-4`); a number key takes it as the number."""
    try:
        return float(text)
    except ValueError:
        return text


def _is_instance(value: Any, wanted: type) -> bool:
    if wanted is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if wanted is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, wanted)


def F(default: Any, *types: type, choices: Choices | None = None, nullable: bool = False,
      item: type | None = None) -> Field:
    """A `Field` whose type is the default's unless `types` are given (the schema tables stay one line a key)."""
    if not types:
        types = (type(default),)
    return Field(types=types, default=default, choices=choices, nullable=nullable, item_type=item)


# datasets.AVAILABLE_DATASETS and datasets.AUGMENT_POLICIES are these
DATASET_NAMES = ("synthetic-LT", "fashion-mnist-LT", "cifar10-LT", "cifar100-LT", "list", "image-folder")
# `dataset.augment`: auto picks per dataset (in memory: crop_flip; files: by image size), none switches
# phase I's augmentation off, crop_flip is a zero-padded random crop (CIFAR-style), resized_crop
# ImageNet's random-resized crop (file datasets only); the old booleans stay valid (true = auto, false = none)
AUGMENT_POLICIES = ("auto", "none", "crop_flip", "resized_crop")

DATASET = {
    "name": F("synthetic-LT", str, choices=DATASET_NAMES),
    "root": F(None, str, nullable=True),
    "download": F(True),
    "imbalance": F(100.0, float),
    "profile": F("exp", choices=("exp", "step")),
    "step_fraction": F(0.5, float),
    "subset_seed": F(0),
    "augment": F("auto", bool, str),
    "flip": F(True),
    "train_list": F(None, str, nullable=True),
    "test_list": F(None, str, nullable=True),
    # file datasets: null = the images' own size when at most 64 pixels, else 224
    "image_size": F(None, int, nullable=True),
    # the split that selects checkpoints and hyper-parameters (datasets/validation.py); none: select nothing
    "val": {
        "source": F("none", choices=("none", "train", "test")),
        "fraction": F(0.1, float),
        "seed": F(0),
    },
    "synthetic": {
        "num_classes": F(6),
        "image_size": F(32),
        "train_per_class": F(200),
        "test_per_class": F(40),
        "seed": F(0),
    },
}

OPTIM = {
    "optimizer": F("sgd", choices=registry_choices("engine.optim", "OPTIMIZERS")),
    "lr": F(0.1, float),
    "momentum": F(0.9, float),
    "nesterov": F(False),
    "weight_decay": F(2e-4, float),
}

# speed settings (engine/accel.py); they may differ between a run and its --resume
ACCEL = {"amp": F("none", choices=("none", "bf16", "fp16")), "channels_last": F(False)}

PHASE_I = {
    "seed": F(0),
    "phase": F("train", choices=("train", "test")),
    "dataset": DATASET,
    "model": {
        "arch": F("resnet32"),
        # linear: nn.Linear; cosine: scale * cos(feature, class weight) + bias (CosineCE of TailCalibX / CBD)
        "classifier": F("linear", choices=registry_choices("models.base", "CLASSIFIERS")),
        "scale": F(10.0, float),       # cosine: the scale's initial value (softplus-parametrised, as the releases)
        "learn_scale": F(True),        # cosine: false keeps the scale fixed (LDAM-DRW: s = 30)
    },
    "train": {
        **OPTIM,
        "epochs": F(200),
        "batch_size": F(128),
        "schedule": F("multistep", choices=registry_choices("engine.optim", "SCHEDULES")),
        "milestones": F([160, 180], list, item=int),
        "step_size": F(150),
        "gamma": F(0.1, float),
        "warmup_epochs": F(0.0, float),
        "loss": F("ce", choices=registry_choices("engine.losses", "LOSSES")),
        "focal_gamma": F(1.0, float),
        "cb_beta": F(0.9999, float),
        "la_tau": F(1.0, float),  # la_loss: CE on logits + la_tau * log(prior) (1.0 = balanced_softmax)
        # ldam_drw: margins max_margin * (n_min / n_c)^(1/4) on a cosine classifier of fixed scale (LDAM: s = 30), and
        # class-balanced weights (cb_beta) from epoch drw_epoch on (null: 80% of the epochs, the release's 160 of 200)
        "ldam_max_margin": F(0.5, float),
        "drw_epoch": F(None, int, nullable=True),
        "num_workers": F(0),
        "save_every": F(0),
        "eval_every": F(1),
    },
    # cbd (Iscen et al. 2021): a cosine-classifier student distilled from `teachers` CosineCE runs of the same
    # config (checkpoints/phase_i-cosine_ce/<config>/<note>-teacher<k>, seed + 1000 k; the pipeline trains them):
    # loss (1 - alpha) CE + alpha * beta * (1 - cos(projected student feature, concatenated teacher features));
    # class_balanced_share of every batch drawn class-balanced, the rest instance-balanced
    "distill": {
        "enabled": F(False),
        "teachers": F(3),
        "alpha": F(0.4, float),
        "beta": F(100.0, float),
        "class_balanced_share": F(0.5, float),
    },
    # hr: head = the largest classes holding this share of the training samples, for every phase
    # (phase II's split and phase III's head / tail read it from the phase I run's saved config)
    "eval": {"batch_size": F(256), "hr": F(0.9, float)},
    "accel": {**ACCEL, "compile": F(False)},
}

# the defaults are the FSA paper's settings (Chu et al. 2020): top-3 confusing classes per tail class,
# class-specific M >= ts, class-generic M < tg (the paper gives no thresholds; 0.8 / 0.2 are our choice)
# phases II and III start from the phase I run of this phase I method (engine.methods; ce: checkpoints/phase_i)
BACKBONE = F("ce", str, choices=registry_choices("engine.methods", "BACKBONE_IDS"))

PHASE_II = {
    "seed": F(0),
    "backbone": BACKBONE,
    "gradcam": {
        "layer": F(None, str, nullable=True),
        "method": F("auto", choices=("auto", "closed_form", "autograd")),
        "batch_size": F(256),
    },
    "split": {"ts": F(0.8, float), "tg": F(0.2, float)},
    "confusion": {"nf": F(3)},
    "store": {"enabled": F(True), "views": F(0), "num_workers": F(0)},
    "accel": ACCEL,
}

PHASE_III = {
    "seed": F(0),
    "backbone": BACKBONE,
    "phase": F("train", choices=("train", "test")),
    "finetune": {
        **OPTIM,
        "lr": F(1e-3, float),
        "weight_decay": F(5e-4, float),
        # a phase III method of the method table (engine.methods), with the script's mode
        "generator": F("fsa", str, choices=registry_choices("engine.methods", "GENERATOR_NAMES")),
        "iterations": F(6400),
        "nt": F(16),
        "na": F(3),
        "unfreeze": F(False),
        "eval_every": F(400),
        "num_workers": F(0),
    },
    "tailcalib": {
        "tukey": F(1.0, float),
        "alpha": F(0.0, float),
        "k": F(3),
        "epochs": F(10),
        "batch_size": F(256),
        # TailCalib's own SGD lr; null = finetune.lr (momentum / weight decay always come from finetune)
        "lr": F(None, float, nullable=True),
        # the linear classifier on the transformed features: a fresh nn.Linear (the default) or phase I's fc
        "init": F("fresh", str, choices=("fresh", "phase_i")),
        # k nearest class means among all classes (the release: a sample's own class usually is one) or others only
        "neighbours": F("all", str, choices=("all", "others")),
        # as the release's training code: ridge * I added to every calibrated covariance, and real + generated (and
        # test) rows L2-normalised again after Tukey's transform
        "ridge": F(1e-4, float),
        "renormalize": F(True),
    },
    # decoupled classifiers (engine/phase_iii_decoupled.py); momentum / weight decay come from finetune
    "decoupled": {
        "epochs": F(10),        # lws / crt
        "batch_size": F(512),
        "lr": F(0.1, float),    # constant
        # la_posthoc / tau_norm: tau is the grid value with the best validation mean class accuracy, or the
        # fixed tau without a validation split
        "tau": F(1.0, float),
        "tau_grid": F([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], list, item=float),
    },
    "eval": {"batch_size": F(256)},
    "accel": ACCEL,
}

SCHEMAS = {"phase_i": PHASE_I, "phase_ii": PHASE_II, "phase_iii": PHASE_III}

# keys that left a phase's schema: (phase, old dotted key) -> where the setting lives now. A config
# file or --opts that still sets one gets this message instead of "unknown key". One line per move.
MOVED_KEYS: dict[tuple[str, str], str] = {
    ("phase_ii", "split.hr"): "head/tail use one share for every phase, the phase I config's eval.hr "
                              "(set it there or with phase I's --opts eval.hr=...)",
}


def defaults(section: dict) -> dict:
    """The complete defaults of a schema (section), e.g. `defaults(DATASET)`: a fresh nested dict."""
    return {key: defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
            for key, spec in section.items()}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate_values(cfg: dict, phase: str) -> None:
    """Checks of values that types alone cannot express."""
    if phase == "phase_i":
        d, t = cfg["dataset"], cfg["train"]
        _require(d["imbalance"] >= 1, f"dataset.imbalance must be >= 1 (n_max / n_min), got {d['imbalance']}.")
        _require(0 < d["step_fraction"] < 1, f"dataset.step_fraction must be in (0, 1), got {d['step_fraction']}.")
        _require(d["synthetic"]["num_classes"] >= 2, "dataset.synthetic.num_classes must be at least 2.")
        _require(isinstance(d["augment"], bool) or d["augment"] in AUGMENT_POLICIES,
                 f"dataset.augment must be one of {', '.join(AUGMENT_POLICIES)} (true = auto, false = none); "
                 f"got {d['augment']!r}.")
        _require(d["image_size"] is None or d["image_size"] > 0,
                 "dataset.image_size must be positive (or null: the images' own size up to 64, else 224).")
        _require(t["lr"] > 0, f"train.lr must be > 0, got {t['lr']}.")
        _require(t["epochs"] >= 1, f"train.epochs must be >= 1, got {t['epochs']}.")
        _require(t["batch_size"] >= 1, f"train.batch_size must be >= 1, got {t['batch_size']}.")
        _require(cfg["eval"]["batch_size"] >= 1, f"eval.batch_size must be >= 1, got {cfg['eval']['batch_size']}.")
        _require(t["weight_decay"] >= 0, "train.weight_decay must be >= 0.")
        _require(t["warmup_epochs"] >= 0, "train.warmup_epochs must be >= 0.")
        _require(t["num_workers"] >= 0, "train.num_workers must be >= 0.")
        _require(t["ldam_max_margin"] > 0, f"train.ldam_max_margin must be > 0, got {t['ldam_max_margin']}.")
        _require(t["drw_epoch"] is None or t["drw_epoch"] >= 0, "train.drw_epoch must be >= 0 (or null).")
        if t["loss"] == "ldam_drw":
            _require(cfg["model"]["classifier"] == "cosine" and not cfg["model"]["learn_scale"],
                     "train.loss=ldam_drw puts its margins on cosine logits of a fixed scale, as the LDAM paper (s = 30): "
                     "set model.classifier=cosine model.scale=30 model.learn_scale=false (the ldam_drw method of the "
                     "pipeline's --suite full does).")
        dist = cfg["distill"]
        _require(dist["teachers"] >= 1 and dist["beta"] >= 0 and 0 <= dist["alpha"] <= 1
                 and 0 <= dist["class_balanced_share"] <= 1,
                 "distill needs teachers >= 1, beta >= 0, and alpha and class_balanced_share in [0, 1].")
        _require(not dist["enabled"] or cfg["model"]["classifier"] == "cosine",
                 "distill.enabled trains the CBD student, a cosine classifier: set model.classifier=cosine too.")
        _require(0 < t["cb_beta"] < 1, f"train.cb_beta must be in (0, 1), got {t['cb_beta']}.")
        _require(cfg["model"]["scale"] > 0, f"model.scale must be > 0, got {cfg['model']['scale']}.")
        _require(0 < cfg["eval"]["hr"] <= 1, f"eval.hr must be in (0, 1], got {cfg['eval']['hr']}.")
    elif phase == "phase_ii":
        s = cfg["split"]
        _require(0 <= s["tg"] < s["ts"] <= 1, f"split thresholds need 0 <= tg < ts <= 1, got ts={s['ts']}, tg={s['tg']}.")
        _require(cfg["confusion"]["nf"] >= 1, "confusion.nf must be >= 1.")
        _require(cfg["gradcam"]["batch_size"] >= 1, "gradcam.batch_size must be >= 1.")
        _require(cfg["store"]["views"] >= 0, "store.views must be >= 0.")
    elif phase == "phase_iii":
        f = cfg["finetune"]
        _require(f["lr"] > 0, f"finetune.lr must be > 0, got {f['lr']}.")
        _require(f["iterations"] >= 1, "finetune.iterations must be >= 1.")
        _require(f["nt"] >= 1 and f["na"] >= 0,
                 f"finetune.nt must be >= 1 and finetune.na >= 0 (batch = 2*nt*(1+na)), got nt={f['nt']}, na={f['na']}.")
        _require(f["eval_every"] >= 1, "finetune.eval_every must be >= 1.")
        _require(cfg["tailcalib"]["k"] >= 1, "tailcalib.k must be >= 1.")
        _require(cfg["tailcalib"]["ridge"] >= 0, "tailcalib.ridge must be >= 0.")
        dc = cfg["decoupled"]
        _require(dc["epochs"] >= 1 and dc["batch_size"] >= 1 and dc["lr"] > 0,
                 "decoupled.epochs and decoupled.batch_size must be >= 1 and decoupled.lr > 0.")
        _require(bool(dc["tau_grid"]) and all(t >= 0 for t in [dc["tau"], *dc["tau_grid"]]),
                 "decoupled.tau_grid must list at least one tau, and every tau (and decoupled.tau) must be >= 0.")


def schema_keys(phase: str) -> list[str]:
    """Every settable key of a phase's schema, dotted (``train.lr``), in schema order."""
    def walk(schema: dict, prefix: str) -> list[str]:
        keys: list[str] = []
        for key, spec in schema.items():
            keys += walk(spec, f"{prefix}{key}.") if isinstance(spec, dict) else [f"{prefix}{key}"]
        return keys

    return walk(SCHEMAS[phase], "")
