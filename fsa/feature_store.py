"""The offline feature store written by phase II and read by phase III offline.

Layout of a store folder (``features/<config>/<note>/store/``), one ``.npy`` file per array (plain
NumPy format, so ``numpy.load(path, mmap_mode="r")`` opens any of them)::

    fmaps.npy        float16 [V, N, C, H, W]  CAM-layer feature maps F(x)
    cams.npy         float16 [V, N, H, W]     Grad-CAM of the true class, min-max normalised to [0, 1]
    pooled.npy       float32 [V, N, C]        global-average-pooled features (of the float32 maps)
    labels.npy       int64   [N]              true class of each row
    indices.npy      int64   [N]              position of each row in the long-tailed training set
    test_pooled.npy  float32 [Ntest, C]       pooled features of the (un-augmented) test set
    test_labels.npy  int64   [Ntest]
    meta.json        shapes, dtypes, views, bytes, "complete": true once every array is written

``V = 1 + store.views``: view 0 is the un-augmented image, views 1.. are seeded draws of the
dataset's training augmentation. Row ``i`` of every ``[V, N, ...]`` array is training sample
``indices[i]`` (phase II writes the rows in training-set order, so ``indices[i] == i``).

Writing is streamed: every array is created at its full size with
``numpy.lib.format.open_memmap`` (header + sparse file), then filled batch by batch with positioned
writes at the right byte offset. Nothing is accumulated in memory and no written page stays mapped
into the process, so peak memory does not grow with ``N``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from utils.errors import UserError

__all__ = ["FeatureStoreWriter", "FeatureStore", "STORE_ARRAYS", "read_meta", "store_nbytes", "format_bytes"]

META_FILE = "meta.json"
FORMAT = "fsa-lt-feature-store/1"
RERUN = "python phase_ii_extract_feature.py --config NAME --overwrite"  # the fix in messages, unless told the command

# name -> (dtype, shape builder from (V, N, C, H, W, Ntest))
STORE_ARRAYS = {
    "fmaps": (np.float16, lambda v, n, c, h, w, nt: (v, n, c, h, w)),
    "cams": (np.float16, lambda v, n, c, h, w, nt: (v, n, h, w)),
    "pooled": (np.float32, lambda v, n, c, h, w, nt: (v, n, c)),
    "labels": (np.int64, lambda v, n, c, h, w, nt: (n,)),
    "indices": (np.int64, lambda v, n, c, h, w, nt: (n,)),
    "test_pooled": (np.float32, lambda v, n, c, h, w, nt: (nt, c)),
    "test_labels": (np.int64, lambda v, n, c, h, w, nt: (nt,)),
}

_VIEW_ARRAYS = ("fmaps", "cams", "pooled")


def _shapes(views: int, num_samples: int, fmap_shape: Sequence[int], num_test: int) -> dict[str, tuple]:
    c, h, w = (int(s) for s in fmap_shape)
    return {name: spec[1](views, num_samples, c, h, w, num_test) for name, spec in STORE_ARRAYS.items()}


def store_nbytes(views: int, num_samples: int, fmap_shape: Sequence[int], num_test: int = 0) -> int:
    """Bytes of array data a store of these sizes holds (headers excluded)."""
    return sum(
        int(np.dtype(STORE_ARRAYS[name][0]).itemsize) * math.prod(shape)
        for name, shape in _shapes(views, num_samples, fmap_shape, num_test).items()
    )


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _to_numpy(value: Tensor | np.ndarray, dtype: np.dtype) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.cpu().numpy()
    return np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))


class _ArrayFile:
    """One ``.npy`` file created at full size; rows are written at byte offsets (no mapping kept)."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], lead_dims: int = 1):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(int(s) for s in shape)
        self.block_shape = self.shape[lead_dims:]  # shape of one row; rows are the flattened lead dims
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=self.shape)
        self.offset = int(mm.offset)  # header length: data starts here
        del mm  # nothing was touched: the file is sparse, no page is resident
        self.row_bytes = self.dtype.itemsize * math.prod(self.block_shape)
        self.fd = os.open(path, os.O_RDWR)

    def write_rows(self, start: int, data: np.ndarray) -> None:
        """Write ``data`` (rows along axis 0) starting at flat row ``start``."""
        if tuple(data.shape[1:]) != self.block_shape:
            raise ValueError(f"{self.path.name}: rows of shape {tuple(data.shape[1:])}, expected {self.block_shape}")
        buf = memoryview(data).cast("B")
        pos = self.offset + start * self.row_bytes
        while buf:
            written = os.pwrite(self.fd, buf, pos)
            buf, pos = buf[written:], pos + written

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class FeatureStoreWriter:
    """Streamed writer of a feature store folder.

    ``FeatureStoreWriter(folder, num_samples=N, fmap_shape=(C, H, W), views=V, num_test=Nt)``, then
    ``write(view, start, fmaps, cams, pooled)`` for consecutive batches of each view (any order of
    batches works: rows land at ``start``), ``write_labels(start, labels, indices)`` once per row
    range, ``write_test(start, pooled, labels)`` for the test features, and ``close(extra_meta)``
    which checks that every row was written and writes ``meta.json`` last (a store without a
    complete ``meta.json`` is refused by :class:`FeatureStore`). Also a context manager.
    """

    def __init__(self, folder: Path | str, *, num_samples: int, fmap_shape: Sequence[int], views: int = 1,
                 num_test: int = 0):
        if views < 1 or num_samples < 0 or num_test < 0 or len(fmap_shape) != 3:
            raise ValueError(f"bad store sizes: views={views}, N={num_samples}, fmap_shape={fmap_shape}, Ntest={num_test}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / META_FILE).unlink(missing_ok=True)
        self.views, self.num_samples, self.num_test = int(views), int(num_samples), int(num_test)
        self.fmap_shape = tuple(int(s) for s in fmap_shape)
        self.shapes = _shapes(self.views, self.num_samples, self.fmap_shape, self.num_test)
        self._files = {name: _ArrayFile(self.folder / f"{name}.npy", STORE_ARRAYS[name][0], shape,
                                        lead_dims=2 if name in _VIEW_ARRAYS else 1)
                       for name, shape in self.shapes.items()}
        self._rows_written = {name: 0 for name in self.shapes}
        self.closed = False

    # -- writing --------------------------------------------------------------------------------
    def _check_range(self, start: int, count: int, limit: int, what: str) -> None:
        if start < 0 or start + count > limit:
            raise ValueError(f"{what}: rows {start}..{start + count} outside [0, {limit})")

    def write(self, view: int, start: int, fmaps: Tensor | np.ndarray, cams: Tensor | np.ndarray,
              pooled: Tensor | np.ndarray | None = None) -> None:
        """Rows ``start .. start+B`` of view ``view``: ``fmaps [B,C,H,W]``, ``cams [B,H,W]``,
        ``pooled [B,C]`` (default: the spatial mean of ``fmaps`` in float32)."""
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} outside [0, {self.views})")
        f = _to_numpy(fmaps, np.float16)
        b = f.shape[0]
        self._check_range(start, b, self.num_samples, "fmaps")
        c = _to_numpy(cams, np.float16)
        if pooled is None:
            p = _to_numpy(torch.as_tensor(fmaps).float().mean(dim=(2, 3)), np.float32)
        else:
            p = _to_numpy(pooled, np.float32)
        if c.shape[0] != b or p.shape[0] != b:
            raise ValueError(f"batch sizes differ: fmaps {b}, cams {c.shape[0]}, pooled {p.shape[0]}")
        row = view * self.num_samples + start
        self._files["fmaps"].write_rows(row, f)
        self._files["cams"].write_rows(row, c)
        self._files["pooled"].write_rows(row, p)
        for name in _VIEW_ARRAYS:
            self._rows_written[name] += b

    def write_labels(self, start: int, labels: Tensor | np.ndarray, indices: Tensor | np.ndarray) -> None:
        lab, idx = _to_numpy(labels, np.int64).reshape(-1), _to_numpy(indices, np.int64).reshape(-1)
        if lab.shape != idx.shape:
            raise ValueError("labels and indices differ in length")
        self._check_range(start, lab.shape[0], self.num_samples, "labels")
        self._files["labels"].write_rows(start, lab)
        self._files["indices"].write_rows(start, idx)
        self._rows_written["labels"] += lab.shape[0]
        self._rows_written["indices"] += lab.shape[0]

    def write_test(self, start: int, pooled: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> None:
        p, lab = _to_numpy(pooled, np.float32), _to_numpy(labels, np.int64).reshape(-1)
        self._check_range(start, p.shape[0], self.num_test, "test_pooled")
        self._files["test_pooled"].write_rows(start, p)
        self._files["test_labels"].write_rows(start, lab)
        self._rows_written["test_pooled"] += p.shape[0]
        self._rows_written["test_labels"] += lab.shape[0]

    # -- finishing ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes on disk (array data plus the .npy headers)."""
        return sum((self.folder / f"{name}.npy").stat().st_size for name in self.shapes)

    def _release(self) -> None:
        for handle in self._files.values():
            handle.close()

    def close(self, extra_meta: dict | None = None) -> dict:
        """Check completeness, close the files, write ``meta.json``; returns the meta dict."""
        if self.closed:
            return json.loads((self.folder / META_FILE).read_text())
        self._release()
        expected = {name: (self.views * self.num_samples if name in _VIEW_ARRAYS else self.shapes[name][0])
                    for name in self.shapes}
        missing = {n: (self._rows_written[n], expected[n]) for n in self.shapes if self._rows_written[n] != expected[n]}
        if missing:
            raise ValueError(f"feature store {self.folder} incomplete (rows written, expected): {missing}")
        meta = {
            "format": FORMAT,
            "complete": True,
            "views": self.views,
            "num_samples": self.num_samples,
            "num_test": self.num_test,
            "fmap_shape": list(self.fmap_shape),
            "arrays": {
                name: {"file": f"{name}.npy", "dtype": np.dtype(STORE_ARRAYS[name][0]).name, "shape": list(shape)}
                for name, shape in self.shapes.items()
            },
            "bytes": self.nbytes,
            **(extra_meta or {}),
        }
        tmp = self.folder / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(self.folder / META_FILE)
        self.closed = True
        return meta

    def abort(self) -> None:
        """Close the files without writing ``meta.json`` (the folder stays marked incomplete)."""
        self._release()
        self.closed = True

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _is_size(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_meta(folder: Path | str, rerun: str = RERUN) -> dict:
    """The parsed ``meta.json`` of the store in ``folder``, checked against what
    :meth:`FeatureStoreWriter.close` writes (format, sizes, and every array's file, dtype and shape
    implied by them); missing, truncated or malformed: a UserError naming it and ``rerun``."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise UserError(f"No complete feature store in {folder} ({META_FILE} missing: phase II did not finish, or ran "
                        f"with store.enabled: false). Rerun phase II: {rerun}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8 (a truncated or damaged file)
        raise UserError(f"{path} is unreadable or not valid JSON ({type(exc).__name__}: {exc}): the file is truncated "
                        f"or damaged. Rerun phase II: {rerun}") from exc
    fmap_shape = meta.get("fmap_shape") if isinstance(meta, dict) else None
    sizes_ok = (isinstance(meta, dict) and _is_size(meta.get("views"), 1) and _is_size(meta.get("num_samples"))
                and _is_size(meta.get("num_test")) and _is_size(meta.get("bytes"))
                and isinstance(fmap_shape, list) and len(fmap_shape) == 3
                and all(_is_size(s, 1) for s in fmap_shape))
    if not sizes_ok or meta.get("format") != FORMAT or meta.get("complete") is not True:
        raise UserError(f"{path} does not describe a complete FSA-LT feature store ({FORMAT}: format, complete, views, "
                        f"num_samples, num_test, fmap_shape, bytes); it is damaged or phase II did not finish. "
                        f"Rerun phase II: {rerun}")
    expected = {name: {"file": f"{name}.npy", "dtype": np.dtype(STORE_ARRAYS[name][0]).name, "shape": list(shape)}
                for name, shape in _shapes(meta["views"], meta["num_samples"], fmap_shape, meta["num_test"]).items()}
    if meta.get("arrays") != expected:
        raise UserError(f"{path}: its 'arrays' do not match the store's sizes (views {meta['views']}, num_samples "
                        f"{meta['num_samples']}, fmap_shape {fmap_shape}, num_test {meta['num_test']}); it is damaged. "
                        f"Rerun phase II: {rerun}")
    return meta


def _as_index(value: Tensor | np.ndarray | Sequence[int] | int, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class FeatureStore:
    """Reader of a store folder. Arrays are memory-mapped read-only (``in_memory=True`` loads them);
    ``rerun``: the command that rewrites the store, named in the errors of a damaged one.

    - ``get(indices, view=0) -> (fmaps float32 [B,C,H,W], cams float32 [B,H,W], labels int64 [B])``:
      ``indices`` are rows (= positions in the long-tailed training set); ``view`` is one int for
      every row or a LongTensor with one view per row. One vectorised fancy-indexing read.
    - ``pooled(view=0) -> float32 [N, C]``, ``test_pooled() -> float32 [Ntest, C]``,
      ``test_labels() -> int64 [Ntest]``, ``labels -> int64 [N]``, ``indices -> int64 [N]``.
    - ``num_samples``, ``views`` (V, including view 0), ``fmap_shape`` ``(C, H, W)``, ``cam_shape``
      ``(H, W)``, ``num_test``, ``meta`` (the parsed meta.json), ``nbytes``.
    """

    def __init__(self, folder: Path | str, *, in_memory: bool = False, rerun: str = RERUN):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder, rerun)
        mode = None if in_memory else "r"
        self._arrays: dict[str, np.ndarray] = {}
        for name, spec in self.meta["arrays"].items():
            path = self.folder / spec["file"]
            try:
                arr = np.load(path, mmap_mode=mode, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read feature store array {path}: {exc}. Rerun phase II: {rerun}") from exc
            if list(arr.shape) != list(spec["shape"]) or arr.dtype.name != spec["dtype"]:
                raise UserError(
                    f"feature store array {path} has shape {list(arr.shape)} / {arr.dtype.name}, meta.json says "
                    f"{spec['shape']} / {spec['dtype']}. Rerun phase II: {rerun}"
                )
            self._arrays[name] = arr
        self.views = int(self.meta["views"])
        self.num_samples = int(self.meta["num_samples"])
        self.num_test = int(self.meta["num_test"])
        self.fmap_shape = tuple(int(s) for s in self.meta["fmap_shape"])
        self.cam_shape = self.fmap_shape[1:]
        self.nbytes = int(self.meta["bytes"])
        self.labels = torch.from_numpy(np.array(self._arrays["labels"]))
        self.indices = torch.from_numpy(np.array(self._arrays["indices"]))

    def __len__(self) -> int:
        return self.num_samples

    def array(self, name: str) -> np.ndarray:
        """The raw (memory-mapped) array ``name`` (see the module doc for names)."""
        return self._arrays[name]

    def get(self, indices: Tensor | np.ndarray | Sequence[int], view: int | Tensor | np.ndarray = 0) -> tuple[Tensor, Tensor, Tensor]:
        idx = _as_index(indices, "indices").reshape(-1)
        views = _as_index(view, "view").reshape(-1)
        if views.size == 1:
            views = np.broadcast_to(views, idx.shape)
        if views.shape != idx.shape:
            raise ValueError(f"view must be one int or one per index; got {views.size} views for {idx.size} indices")
        if idx.size:
            if idx.min() < 0 or idx.max() >= self.num_samples:
                raise IndexError(f"indices must lie in [0, {self.num_samples}); got {idx.min()}..{idx.max()}")
            if views.min() < 0 or views.max() >= self.views:
                raise IndexError(f"views must lie in [0, {self.views}); got {views.min()}..{views.max()}")
        # Read rows in ascending file order (sequential on disk), then put them back in request order.
        flat = views * self.num_samples + idx
        order = np.argsort(flat, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        v_sorted, i_sorted = views[order], idx[order]
        fmaps = self._arrays["fmaps"][v_sorted, i_sorted][inverse]
        cams = self._arrays["cams"][v_sorted, i_sorted][inverse]
        labels = self._arrays["labels"][idx]
        return (torch.from_numpy(fmaps.astype(np.float32)), torch.from_numpy(cams.astype(np.float32)),
                torch.from_numpy(np.asarray(labels, dtype=np.int64)))

    def pooled(self, view: int = 0) -> Tensor:
        if not 0 <= int(view) < self.views:
            raise IndexError(f"view {view} outside [0, {self.views})")
        return torch.from_numpy(np.array(self._arrays["pooled"][int(view)], dtype=np.float32))

    def test_pooled(self) -> Tensor:
        return torch.from_numpy(np.array(self._arrays["test_pooled"], dtype=np.float32))

    def test_labels(self) -> Tensor:
        return torch.from_numpy(np.array(self._arrays["test_labels"], dtype=np.int64))

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.folder)!r}, views={self.views}, num_samples={self.num_samples}, "
                f"fmap_shape={self.fmap_shape}, {format_bytes(self.nbytes)})")
