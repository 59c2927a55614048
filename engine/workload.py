"""The work of each step, counted in images through the backbone (:class:`Work`), from its config
and the data's sizes: pure arithmetic, no torch, so that the method table's methods can say what they
cost (``PhaseIIIMethod.work``) and ``engine.cost`` can price it with a probe of the device."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Images per split of the chain's data (``val`` 0 without a validation split)."""

    train: int
    val: int
    test: int

    @classmethod
    def of(cls, bundle) -> "Sizes":
        return cls(len(bundle.train), 0 if bundle.val is None else len(bundle.val), len(bundle.test))

    @property
    def evaluated(self) -> int:
        """Images of one evaluation (validation split and test set)."""
        return self.val + self.test


@dataclass(frozen=True)
class Work:
    """Images through the backbone: ``trained`` forward + backward, ``forwarded`` forward only."""

    trained: int = 0
    forwarded: int = 0
    what: str = ""

    def seconds(self, rates: "Rates") -> float:
        return self.trained * rates.trained + self.forwarded * rates.forwarded


@dataclass(frozen=True)
class Rates:
    """Seconds per image through the backbone on this device (one process's share under torchrun)."""

    trained: float
    forwarded: float
    probe_s: float = 0.0


def _evaluations(units: int, every: int) -> int:
    """Evaluations of a loop of ``units`` evaluated every ``every`` units and at its end (engine.loops.fit)."""
    return units // every + (units % every != 0)


def phase_i_work(cfg: dict, sizes: Sizes) -> Work:
    t = cfg["train"]
    epochs = t["epochs"]
    teachers = cfg["distill"]["teachers"] if cfg["distill"]["enabled"] else 0
    forwarded = _evaluations(epochs, t["eval_every"]) * sizes.evaluated + teachers * epochs * sizes.train
    what = f"{epochs} epochs x {sizes.train:,} images" + (f", {teachers} teachers' forward passes" if teachers else "")
    return Work(trained=epochs * sizes.train, forwarded=forwarded, what=what)


def phase_ii_work(cfg: dict, sizes: Sizes) -> Work:
    views = 1 + cfg["store"]["views"] if cfg["store"]["enabled"] else 1
    trained = sizes.train if cfg["gradcam"]["method"] == "autograd" else 0  # Grad-CAM's backward pass
    forwarded = views * sizes.train + (sizes.test if cfg["store"]["enabled"] else 0)
    return Work(trained=trained, forwarded=forwarded, what=f"Grad-CAM over {sizes.train:,} images, {views} view(s)")


def maps_work(mode: str, f: dict, sizes: Sizes) -> Work:
    """A map method's work under ``finetune`` settings ``f``: offline its maps come from phase II's store."""
    from fsa.batch_composition import auto_iterations, batch_size  # torch: only when a cost is asked for

    iterations = f["iterations"] or auto_iterations(sizes.train, f["nt"], f["na"])
    what = f"{iterations:,} iterations of {batch_size(f['nt'], f['na'])} rows"
    if mode == "offline":  # maps from phase II's store; evaluations on cached pooled features
        return Work(forwarded=sizes.evaluated, what=what + " from the store")
    images = iterations * batch_size(f["nt"], f["na"])
    if f["unfreeze"]:  # the last stage trains: every evaluation runs the backbone again
        return Work(trained=images, forwarded=_evaluations(iterations, f["eval_every"]) * sizes.evaluated, what=what)
    return Work(forwarded=images + sizes.evaluated, what=what + " of online maps")


def tailcalib_work(mode: str, epochs: int, sizes: Sizes) -> Work:
    """TailCalib(X): offline on stored pooled features, online a pass over the training images per epoch."""
    if mode == "offline":
        return Work(forwarded=sizes.val, what=f"{epochs} epochs on stored features")
    return Work(forwarded=epochs * sizes.train + sizes.evaluated, what=f"{epochs} epochs of online features")


def chosen_work(sizes: Sizes) -> Work:
    """A post-hoc choice on phase II's stored pooled features: only the validation images are forwarded."""
    return Work(forwarded=sizes.val, what="chosen on stored features")


def epoch_rows(num_train: int, batch_size: int, sampler: str) -> int:
    """Rows of one epoch of a re-trained decoupled classifier. class_aware: the classifier-balancing release's
    ``epoch_steps = int(len(train) / batch_size)`` full batches (at least one: every training row when the set
    is smaller than a batch); independent: as many rows as the training set."""
    if sampler == "class_aware":
        return (num_train // batch_size) * batch_size or num_train
    return num_train


def retrain_work(epochs: int, d: dict, sizes: Sizes) -> Work:
    """A re-trained decoupled classifier (``decoupled`` settings ``d``): with ``features: augmented`` every
    epoch's rows are forwarded as fresh augmented images."""
    if d["features"] != "augmented":
        return Work(forwarded=sizes.val, what=f"{epochs} epochs on stored features")
    rows = epoch_rows(sizes.train, d["batch_size"], d["sampler"])
    return Work(forwarded=epochs * rows + sizes.val, what=f"{epochs} epochs of {rows:,} augmented rows")


