"""The dispatch the kernel-backed ops share (``causal_conv1d``, ``restore_add_gate``): ``reference``,
``triton`` or ``auto`` (triton on CUDA tensors when its module loads and takes the inputs, else reference)."""

from __future__ import annotations

import importlib
import os
from typing import Callable


def run_backend(backend: str, device, module: str, refused: str, error: type, what: str,
                call: Callable, reference: Callable):
    """``call(kernels)`` or ``reference()`` as ``backend`` says. `module`: the Triton module's import name;
    `refused`: the name of its exception for inputs it does not take (``auto`` then runs the reference);
    `error`: the op's backend error, raised where an explicit ``triton`` cannot run (`what` names the kernel)."""
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return reference()
    try:
        kernels = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name not in (module, "triton"):
            raise
        if backend == "auto":
            return reference()
        raise error(f"backend='triton': the Triton {what} kernel is not available ({err.name} is not installed); "
                    f"use backend='reference'") from None
    if backend == "auto":
        try:
            return call(kernels)
        except getattr(kernels, refused):
            return reference()
    # Triton's interpreter runs kernels on CPU tensors: for tests, never chosen by auto
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        raise error(f"backend='triton' needs a cuda device (or TRITON_INTERPRET=1 on the CPU), got tensors on {device}")
    try:
        return call(kernels)
    except getattr(kernels, refused) as err:
        raise error(f"backend='triton': {err}") from err
