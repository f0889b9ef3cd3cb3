"""Shared fixtures: small synthetic cohorts made once per session, in temporary folders."""

from __future__ import annotations

import os

import torch

# Triton kernels run in Triton's interpreter where there is no GPU; the flag must be set before the
# kernels are imported (it is read when @triton.jit decorates them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Keep the 2-core CI machine responsive: DataLoader workers and torch share the cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Extraction settings the tests share: 64-px patches at 2 µm/px on slides written at 0.5 µm/px, so a
# patch is 256 level-0 pixels and a 2048-px slide gives an 8 × 8 grid.
SMALL = dict(size=(2048, 2048), mpp=0.5)
EXTRACT_ARGS = ["--encoder", "timm:test_resnet", "--random-init", "--target-mpp", "2.0", "--patch-size", "64",
                "--device", "cpu", "--batch-size", "16"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """Four 2048-px SVS slides (two tumor, two normal) with masks and labels."""
    from wsimamba.slide.synth import synth_cohort

    root = tmp_path_factory.mktemp("cohort")
    slides = synth_cohort(root, 4, seed=7, fmt="svs", size_jitter=0.0, **SMALL)
    return root, slides


# MIL training fixtures (bag cohorts, trained runs), shared by the test_mil_* / test_train* / test_eval* modules.
from tests.fixtures_train import bag_cohort, one_thread, slide_run, tiny_run  # noqa: E402, F401


@pytest.fixture
def seed():
    """A fresh random seed per test, printed so a failure can be replayed (WSIMAMBA_TEST_SEED=...)."""
    import secrets

    value = int(os.environ.get("WSIMAMBA_TEST_SEED") or secrets.randbits(31))
    print(f"seed={value} (replay with WSIMAMBA_TEST_SEED={value})")
    torch.manual_seed(value)
    return value
