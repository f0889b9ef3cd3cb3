"""The device name every benchmark figure carries."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name, or the CPU model with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def time_calls(fn, repeats: int, cuda: bool) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one warm-up call (allocator, Triton compilation,
    oneDNN primitives); CUDA work is synchronised around every call."""
    fn()
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def forward_and_train_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int,
                              device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds per call of inference (eval, inference_mode) and of a training step (cross-entropy of
    model(x) against y, backward, AdamW step) of `model`; bf16 autocast on CUDA, fp32 elsewhere."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.inference_mode(), autocast:
            model(x)

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    fwd = time_calls(forward, repeats, cuda)
    model.train()
    train = time_calls(train_step, repeats, cuda)
    return fwd, train


def report(result: dict, path: Path | None = None, **dumps) -> dict:
    """Print a benchmark's result as indented JSON, also write it to `path` when given; returns the result.
    `dumps`: extra ``json.dumps`` arguments (e.g. ``default=float``)."""
    text = json.dumps(result, indent=2, **dumps)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
    return result
