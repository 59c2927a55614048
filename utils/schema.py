"""The config schema of every phase: keys, types, defaults, allowed values.

A config file only states what differs from these defaults. Phase II and III configs hold only
their own settings: dataset and model come from the phase I run they build on (its saved
`config.yaml`), so the phases cannot disagree about them; a phase II / III config that would state
nothing may be left out (`utils.config.load_config`).

These tables are the one source of the defaults (`utils.fields.defaults(section)`, e.g. `datasets` fills
a partial `dataset:` section with `defaults(DATASET)`) and of the allowed values; the fields they are
made of, and how a value is checked, are `utils.fields`'. Checks that involve more than one key are
:func:`validate_values`'.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from typing import Callable

from utils.errors import UserError
from utils.fields import F, Field, count, fraction, registry_choices, seed
from utils.threads import parse_setting


# datasets.AUGMENT_POLICIES is this
# `dataset.augment`: auto picks per dataset (in memory: crop_flip; files: by image size), none switches
# phase I's augmentation off, crop_flip is a zero-padded random crop (CIFAR-style), resized_crop
# ImageNet's random-resized crop (file datasets only); the old booleans stay valid (true = auto, false = none)
AUGMENT_POLICIES = ("auto", "none", "crop_flip", "resized_crop")

DATASET = {
    "name": F("synthetic-LT", str, choices=registry_choices("datasets", "DATASETS")),
    "root": F(None, str, nullable=True),
    "download": F(True),
    "imbalance": F(100.0, float, ge=1.0),
    "profile": F("exp", choices=("exp", "step")),
    "step_fraction": fraction(0.5),
    "subset_seed": seed(),
    "augment": F("auto", bool, str),
    "flip": F(True),
    "train_list": F(None, str, nullable=True),
    "test_list": F(None, str, nullable=True),
    # file datasets: null = the images' own size when at most 64 pixels, else 224
    "image_size": F(None, int, nullable=True, ge=8, le=4096),
    # the split that selects checkpoints and hyper-parameters (datasets/validation.py); none: select nothing
    "val": {
        "source": F("none", choices=("none", "train", "test")),
        "fraction": fraction(0.1),
        "seed": seed(),
    },
    "synthetic": {
        "num_classes": count(6, minimum=2),
        "image_size": F(32, int, ge=8, le=512),
        "train_per_class": count(200),
        "test_per_class": count(40),
        "seed": seed(),
    },
}

OPTIM = {
    "optimizer": F("sgd", choices=registry_choices("engine.optim", "OPTIMIZERS")),
    "lr": F(0.1, float, gt=0),
    "momentum": F(0.9, float, ge=0, lt=1),
    "nesterov": F(False),
    "weight_decay": F(2e-4, float, ge=0),
}

# train.loss values that left its choices -> how to say them now (one line per rename)
RENAMED_LOSSES = {
    "ldam_drw": "LDAM-DRW is train.loss=ldam train.reweight=drw (its deferred re-weighting is now a schedule of "
                "its own, beside the loss)",
}

# speed settings (engine/accel.py); they may differ between a run and its --resume
# auto: bf16 + channels-last where bf16 is fast (utils.device.resolve_accel); threads: utils/threads.py
ACCEL = {"amp": F("auto", choices=("auto", "none", "bf16", "fp16")),
         "channels_last": F("auto", bool, str, choices=("auto", True, False)),
         "threads": F("auto", str, int, ge=1, le=4096, hint="CPU threads; auto follows the idle cores")}

PHASE_I = {
    "seed": seed(),
    "determinism": F(False),
    "phase": F("train", choices=("train", "test")),
    "dataset": DATASET,
    "model": {
        "arch": F("resnet32", choices=registry_choices("models", "MODELS")),
        # linear: nn.Linear; cosine: the TailCalibX release's CosineDotProduct_Classifier (CosineCE, CBD):
        # scale * normalize(feature) @ W normalised per feature over the classes + bias; normed: the LDAM-DRW
        # release's NormedLinear (ldam_drw): scale * cos(feature, class weight), no bias (models.base.CosineClassifier)
        "classifier": F("linear", choices=registry_choices("models.base", "CLASSIFIERS")),
        "scale": F(10.0, float, gt=0),  # cosine / normed: the scale's initial value (TailCalibX: 10; LDAM: s = 30)
        "learn_scale": F(True),        # cosine / normed: false keeps the scale fixed (LDAM-DRW: s = 30)
    },
    "train": {
        **OPTIM,
        "epochs": count(200),
        "batch_size": count(128),
        "schedule": F("multistep", choices=registry_choices("engine.optim", "SCHEDULES")),
        # strictly increasing (validate_values); milestones and step_size are for the default epochs: a run of
        # another length that does not state the one its schedule uses gets it scaled (fit_schedule)
        "milestones": F([160, 180], list, item=int, ge=1),
        "step_size": count(150),
        "gamma": F(0.1, float, gt=0, le=1),
        "warmup_epochs": F(0.0, float, ge=0),  # at most train.epochs (validate_values)
        "loss": F("ce", choices=registry_choices("engine.losses", "LOSSES"), renamed=RENAMED_LOSSES),
        # per-class loss weights by epoch, for any loss (engine.reweighting): none; drw = unweighted, then the
        # class-balanced weights (cb_beta) from epoch drw_epoch on (null: 80% of the epochs, LDAM-DRW's 160 of 200)
        "reweight": F("none", choices=registry_choices("engine.reweighting", "REWEIGHTINGS")),
        # focal: -(1 - p_y)^focal_gamma log p_y (softmax), batch mean; 1 = the LDAM-DRW release's focal baseline (and
        # Cui et al.'s GAMMA=1.0); Lin et al.'s detection setting is 2
        "focal_gamma": F(1.0, float, ge=0),
        "cb_beta": fraction(0.9999),  # the effective number's beta of class_balanced and of reweight drw
        # class_balanced: mean = mean of w_y * CE over the batch (Cui et al.'s release); weighted_mean = sum(w_y CE) /
        # sum(w_y), PyTorch's weighted CE (the LDAM-DRW release's Reweight; every re-weighting schedule averages so)
        "cb_reduction": F("mean", str, choices=registry_choices("engine.losses", "CB_REDUCTIONS")),
        "la_tau": F(1.0, float, ge=0),  # la_loss: CE on logits + la_tau * log(prior) (1.0 = balanced_softmax)
        # ldam: margins max_margin * (n_min / n_c)^(1/4) on the normed classifier of fixed scale (LDAM: s = 30)
        "ldam_max_margin": F(0.5, float, gt=0),
        "drw_epoch": F(None, int, nullable=True, ge=0),
        "num_workers": count(0, minimum=0),
        "save_every": count(0, minimum=0),  # 0: no periodic checkpoints
        "eval_every": count(1),
    },
    # cbd (Iscen et al. 2021) at the TailCalibX release's settings (libs/utils/experiments_maker.py experiment 0.4,
    # run_all_CIFAR100-LT.sh): a cosine-classifier student distilled from `teachers` CosineCE runs of the same
    # config (checkpoints/phase_i-cosine_ce/<config>/<note>-teacher<k>, seed + 1000 k; the pipeline trains them);
    # the release: 1 teacher (CIFAR-100-LT and mini-ImageNet-LT). Loss (1 - alpha) CE + alpha * beta * (1 - cos(student
    # feature, concatenated teacher features)), the student's feature linearly projected only with > 1 teacher (as the
    # release). alpha 0.8 / beta 100: the release's CIFAR-100-LT values at imbalance 100 (and 10; beta 200 at 50;
    # mini-ImageNet-LT: alpha 0.4, beta 100)
    "distill": {
        "enabled": F(False),
        "teachers": count(1),
        "alpha": fraction(0.8, open_low=False, open_high=False),
        "beta": F(100.0, float, ge=0),
        # class_aware: every batch from the release's ClassAwareSampler, runs of samples_per_class rows of one class
        # (datasets.loader.fresh_class_aware_indices); mixed: this project's earlier variant, class_balanced_share of
        # every batch drawn i.i.d. class-balanced, the rest instance-balanced (neither the paper's nor the release's)
        "sampler": F("class_aware", str, choices=("class_aware", "mixed")),
        "samples_per_class": count(4),
        "class_balanced_share": fraction(0.5, open_low=False, open_high=False),
        # the teachers' batch norm while the student trains: batch (the release: its loop puts the frozen teachers in
        # train mode with the student) or running (eval mode, their stored statistics; this project's earlier choice)
        "teacher_bn": F("batch", str, choices=("batch", "running")),
    },
    # hr: head = the largest classes holding this share of the training samples, for every phase
    # (phase II's split and phase III's head / tail read it from the phase I run's saved config)
    "eval": {"batch_size": count(256), "hr": fraction(0.9, open_high=False)},
    "accel": {**ACCEL, "compile": F(False)},
}

# the defaults are the FSA paper's settings (Chu et al. 2020): top-3 confusing classes per tail class,
# class-specific M >= ts, class-generic M < tg (the paper gives no thresholds; 0.8 / 0.2 are our choice)
# phases II and III start from the phase I run of this phase I method (engine.methods; ce: checkpoints/phase_i)
BACKBONE = F("ce", str, choices=registry_choices("engine.methods", "BACKBONE_IDS"))

PHASE_II = {
    "seed": seed(),
    "determinism": F(False),
    "backbone": BACKBONE,
    "gradcam": {
        "layer": F(None, str, nullable=True),
        "method": F("auto", choices=("auto", "closed_form", "autograd")),
        "batch_size": count(256),
    },
    # tg < ts (validate_values)
    "split": {"ts": fraction(0.8, open_low=False, open_high=False), "tg": fraction(0.2, open_low=False, open_high=False)},
    "confusion": {"nf": count(3)},
    "store": {"enabled": F(True), "views": count(0, minimum=0), "num_workers": count(0, minimum=0)},
    "accel": ACCEL,
}

PHASE_III = {
    "seed": seed(),
    "determinism": F(False),
    "backbone": BACKBONE,
    "phase": F("train", choices=("train", "test")),
    "finetune": {
        **OPTIM,
        "lr": F(1e-3, float, gt=0),
        "weight_decay": F(5e-4, float, ge=0),
        # a phase III method of the method table (engine.methods), with the script's mode
        "generator": F("fsa", str, choices=registry_choices("engine.methods", "GENERATOR_NAMES")),
        # null: the paper's budget relative to the training set (fsa.batch_composition.auto_iterations:
        # 6,400 on CIFAR-10-LT at batch 128, about 66 rows per training image)
        "iterations": F(None, int, nullable=True, ge=1),
        "nt": count(16, hint="real tail images per batch; batch = 2*nt*(1+na)"),
        "na": count(3, minimum=0, hint="fused maps per tail image; batch = 2*nt*(1+na)"),
        "unfreeze": F(False),
        "eval_every": count(400),
        "num_workers": count(0, minimum=0),
        # map methods (fsa and its control none, online and offline; engine/phase_iii_maps.py): the classifier
        # they train starts from phase I's fc (phase_i, the paper) or a fresh one of the backbone's kind
        # (reinit, cRT's recipe; drawn from `seed`, the same for fsa and none)
        "init": F("phase_i", str, choices=("phase_i", "reinit")),
        # map methods: finetune.lr throughout (constant, the paper) or cosine from lr to 0 over finetune.iterations
        "schedule": F("constant", str, choices=("constant", "cosine")),
    },
    # then the phase III methods' own sections (engine.methods: each method's `section`), see phase_schema
    "eval": {"batch_size": count(256)},
    "accel": ACCEL,
}



def phase_schema(phase: str) -> dict:
    """The schema of ``phase``; phase III's is :data:`PHASE_III` with the phase III methods' own sections
    (each :class:`utils.fields.Section` once, in method-table order) after ``finetune``. The table is read when asked
    (as `registry_choices`): utils does not import engine at import time."""
    if phase != "phase_iii":
        return _FIXED_SCHEMAS[phase]
    sections = importlib.import_module("engine.methods").METHODS.sections()
    schema: dict = {}
    for key, spec in PHASE_III.items():
        schema[key] = spec
        if key == "finetune":
            schema.update((section.name, section.fields) for section in sections)
    return schema


class _Schemas(Mapping):
    """phase -> its schema (:func:`phase_schema`), read when looked up."""

    def __getitem__(self, phase: str) -> dict:
        if phase not in _FIXED_SCHEMAS and phase != "phase_iii":
            raise KeyError(phase)
        return phase_schema(phase)

    def __iter__(self) -> Iterator[str]:
        return iter(("phase_i", "phase_ii", "phase_iii"))

    def __len__(self) -> int:
        return 3


_FIXED_SCHEMAS = {"phase_i": PHASE_I, "phase_ii": PHASE_II}
SCHEMAS = _Schemas()

# keys that left a phase's schema: (phase, old dotted key) -> where the setting lives now. A config
# file or --opts that still sets one gets this message instead of "unknown key". One line per move.
MOVED_KEYS: dict[tuple[str, str], str] = {
    ("phase_ii", "split.hr"): "head/tail use one share for every phase, the phase I config's eval.hr "
                              "(set it there or with phase I's --opts eval.hr=...)",
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate_values(cfg: dict, phase: str) -> None:
    """Checks that involve more than one key, or more than a number's range (the ranges are the schema's)."""
    if phase == "phase_i":
        d, t = cfg["dataset"], cfg["train"]
        _require(isinstance(d["augment"], bool) or d["augment"] in AUGMENT_POLICIES,
                 f"dataset.augment must be one of {', '.join(AUGMENT_POLICIES)} (true = auto, false = none); "
                 f"got {d['augment']!r}.")
        milestones = t["milestones"]
        _require(all(a < b for a, b in zip(milestones, milestones[1:])),
                 f"train.milestones must be strictly increasing epochs (e.g. [160, 180]), got {milestones}.")
        _require(t["warmup_epochs"] <= t["epochs"],
                 f"train.warmup_epochs ({t['warmup_epochs']:g}) must be at most train.epochs ({t['epochs']}): a run "
                 f"still warming up at its end never reaches its learning rate.")
        if t["loss"] == "ldam":
            _require(cfg["model"]["classifier"] == "normed" and not cfg["model"]["learn_scale"],
                     "train.loss=ldam puts its margins on the bias-free cosine logits of a fixed scale of the release's "
                     "NormedLinear (s = 30): set model.classifier=normed model.scale=30 model.learn_scale=false (the "
                     "ldam_drw method of the pipeline's --suite full does).")
        _require(not cfg["distill"]["enabled"] or cfg["model"]["classifier"] == "cosine",
                 "distill.enabled trains the CBD student, a cosine classifier: set model.classifier=cosine too.")
    if "accel" in cfg:
        parse_setting(cfg["accel"]["threads"])
    if phase == "phase_ii":
        s = cfg["split"]
        _require(s["tg"] < s["ts"], f"split thresholds need tg < ts, got ts={s['ts']}, tg={s['tg']}.")
    elif phase == "phase_iii":
        for section in importlib.import_module("engine.methods").METHODS.sections():
            if section.check is not None:
                section.check(cfg[section.name])


def fit_schedule(cfg: dict, stated: Callable[[str], bool]) -> str | None:
    """Fit phase I's learning-rate decay to train.epochs, for a run being asked for (not a saved config).

    The defaults of train.milestones (schedule multistep) and train.step_size (schedule step) are set
    for the default train.epochs (200). Where the config (files and --opts: `stated(dotted key)`) does
    not state the one its schedule uses, it is scaled by epochs / 200 into `cfg`, rounded into
    1 .. epochs - 1 (30 epochs: milestones [24, 27], step_size 23; milestones kept strictly increasing,
    those that no longer fit dropped), and the returned note says so (None: nothing changed). A stated
    value the run never reaches (>= train.epochs) is a UserError: the learning rate would never decay."""
    t, train = cfg["train"], PHASE_I["train"]
    epochs, base = t["epochs"], train["epochs"].default
    scaled: list[int] | int
    if t["schedule"] == "multistep":
        name = "milestones"
        scaled = []
        for m in train[name].default:
            at = max(min(math.floor(m * epochs / base + 0.5), epochs - 1), scaled[-1] + 1 if scaled else 1)
            if at >= epochs:
                break
            scaled.append(at)
        late = [m for m in t[name] if m >= epochs]
    elif t["schedule"] == "step":
        name = "step_size"
        scaled = max(1, min(math.floor(train[name].default * epochs / base + 0.5), epochs - 1))
        late = [t[name]] if t[name] >= epochs > 1 else []  # a one-epoch run has no decay to place
    else:
        return None
    key, default = f"train.{name}", train[name].default
    if stated(key):
        if late:
            raise UserError(f"{key} = {t[name]} reaches past the run: train.epochs is {epochs} (epochs 0 .. {epochs - 1}), "
                            f"so schedule {t['schedule']} never decays at epoch {late[0]}. Set {key} below {epochs} "
                            f"(e.g. --opts '{key}={scaled}', the default {default} scaled to {epochs} epochs), leave it "
                            f"out to get that scaling, or raise train.epochs.")
        return None
    if scaled == default:
        return None
    t[name] = scaled
    return (f"{key} not set: its default {default} (for {base} epochs) scaled to train.epochs = {epochs}: {scaled}. "
            f"Set {key} to choose others.")


def schema_fields(phase: str) -> dict[str, Field]:
    """Every settable key of a phase's schema, dotted (``train.lr``), with its field, in schema order."""
    def walk(schema: dict, prefix: str) -> dict[str, Field]:
        out: dict[str, Field] = {}
        for key, spec in schema.items():
            out.update(walk(spec, f"{prefix}{key}.") if isinstance(spec, dict) else {f"{prefix}{key}": spec})
        return out

    return walk(SCHEMAS[phase], "")


def schema_keys(phase: str) -> list[str]:
    """Every settable key of a phase's schema, dotted (``train.lr``), in schema order."""
    return list(schema_fields(phase))
