"""A bounds check for Triton kernels run in the interpreter (TRITON_INTERPRET=1).

Every load and store a kernel makes (its unmasked lanes) must fall inside the storage of one of the
tensors passed to that launch. A read past a buffer is not an error on a GPU or in the interpreter:
it returns whatever lies there, usually something finite, now and then a NaN left by an earlier
allocation, so the bug shows as a rare, unrepeatable wrong gradient. This makes it deterministic.

`BoundsCheck()` patches the interpreter's launch and memory operations while it is active (a
context manager); `violations` lists what went outside, one entry per kernel and source line.
It relies on interpreter internals (`GridExecutor._init_args_hst`, `InterpreterBuilder.create_masked_load`
/ `create_masked_store`); `available()` says whether this Triton has them.
"""

from __future__ import annotations

import threading
import traceback

import numpy as np


def _interp():
    import triton.runtime.interpreter as interp

    return interp


def available() -> bool:
    try:
        interp = _interp()
    except ImportError:
        return False
    return all(hasattr(obj, name) for obj, name in ((interp.GridExecutor, "_init_args_hst"),
                                                     (interp.InterpreterBuilder, "create_masked_load"),
                                                     (interp.InterpreterBuilder, "create_masked_store"),
                                                     (interp, "_get_np_dtype")))


class BoundsCheck:
    """Context manager: record loads and stores outside the launch's tensors in `violations`."""

    def __init__(self, source_hint: str = ""):
        self.source_hint = source_hint  # only frames of files whose path contains this are reported
        self.violations: list[str] = []
        self._seen: set = set()
        self._local = threading.local()
        self._saved: list = []

    def _ranges(self):
        return getattr(self._local, "ranges", [])

    def _check(self, ptrs, mask, what: str) -> None:
        interp = _interp()
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        p = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]
        if p.size == 0:
            return
        inside = np.zeros(p.shape, dtype=bool)
        for lo, hi in self._ranges():
            inside |= (p >= lo) & (p + np.uint64(size) <= hi)
        if inside.all():
            return
        frames = [f for f in traceback.extract_stack() if self.source_hint in f.filename and "triton_bounds" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        key = (getattr(self._local, "kernel", "?"), where, what)
        if key not in self._seen:
            self._seen.add(key)
            self.violations.append(f"{key[0]}: {what} of {int((~inside).sum())} of {p.size} lanes outside every "
                                   f"tensor of the launch, at {where}")

    def __enter__(self) -> "BoundsCheck":
        interp = _interp()
        check = self
        grid, builder = interp.GridExecutor, interp.InterpreterBuilder
        init0, load0, store0 = grid._init_args_hst, builder.create_masked_load, builder.create_masked_store

        def init_args(executor, args_dev, kwargs):
            args, kw = init0(executor, args_dev, kwargs)
            ranges = []
            for x in list(args) + list(kw.values()):
                if hasattr(x, "untyped_storage"):
                    s = x.untyped_storage()
                    ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
            check._local.ranges = ranges
            check._local.kernel = getattr(executor.fn, "__name__", str(executor.fn))
            return args, kw

        def load(b, ptrs, mask, other, *rest):
            check._check(ptrs, mask, "load")
            return load0(b, ptrs, mask, other, *rest)

        def store(b, ptrs, value, mask, *rest):
            check._check(ptrs, mask, "store")
            return store0(b, ptrs, value, mask, *rest)

        self._saved = [(grid, "_init_args_hst", init0), (builder, "create_masked_load", load0),
                       (builder, "create_masked_store", store0)]
        grid._init_args_hst = init_args
        builder.create_masked_load = load
        builder.create_masked_store = store
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)
        self._saved = []
