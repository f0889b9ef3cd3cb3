"""Seconds per training epoch of MIL aggregators on the same bags: abmil (baseline) vs mambamil vs lbmambamil.

Each model trains through the real path (MILModule + MILDataModule + Lightning Trainer, one bag per step)
on the same synthetic bags (planted witnesses, `in_dim`-wide features like ResNet-50-trunc's 1024);
one warm-up epoch, then the median of `--epochs` timed epochs. Ratios are to abmil, measured in the
same process on the same device.

    python benchmarks/train.py                                  # CPU, small bags (about a minute on 2 cores)
    python benchmarks/train.py --device cuda --bags 64 --instances 8000 --d-model 512
    python benchmarks/train.py --gpu                            # issue 10's suite, below

``--gpu`` runs issue 10's suite on CUDA instead (`gpu_suite`): ms per bag training step (forward,
cross-entropy, backward, AdamW step; no data loading) of abmil, mambamil and lbmambamil at 10k and
50k patches, bf16 autocast and fp32, with the Mamba models' fast layers and their reference layers
in the same process; seconds per epoch of 400 bags x 10k patches through the real training path; peak
memory of a training step at 100k and 200k patches.

Prints one JSON object (and writes it to --json when given).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _device import device_name, report  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAMBA_MODELS = ("mambamil", "bimambamil", "lbmambamil")
# where the --gpu suite runs: "cuda", or "cpu" for a smoke run of the script itself (--gpu-smoke, tiny sizes)
DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _kind(layers: str | None) -> tuple[str | None, bool]:
    """A layer kind as the options spell it ("fast", "reference", "fast+graphs") → (impl, CUDA graphs)."""
    if layers is None:
        return None, False
    impl, _, extra = layers.partition("+")
    return impl, extra == "graphs"


def _step_model(name: str, in_dim: int, d_model: int, layers: str | None, device: str):
    from wsimamba.models.mil import create_model

    from wsimamba.nn import SRMamba

    layers = _kind(layers)[0]
    # "fast-copies": the fast layers with SRMamba reordering by copies (its baseline, benchmarks/srmamba.py)
    copies = layers == "fast-copies"
    layers = "fast" if copies else layers
    kw = {"d_model": d_model}
    if name in MAMBA_MODELS and layers not in (None, "default"):  # "default": the model as it stands (older code)
        kw["impl"] = layers
    torch.manual_seed(0)
    model = create_model(name, in_dim, 2, **kw).to(device)
    for module in model.modules() if copies else ():
        if isinstance(module, SRMamba):
            module.reorder_in_kernels = False
    return model


def _training_step(name: str, instances: int, bf16: bool, layers: str | None, in_dim: int = 1024,
                   d_model: int = 512):
    """A training step on one random bag (1, instances, in_dim), as MILModule trains without the data loader and
    Lightning around it: forward under bf16 autocast (or fp32), cross-entropy, backward, fused AdamW step; with
    layers "…+graphs" the forward and backward replay MILModule's CUDA graph of the bag's length bucket
    (`wsimamba.train.graphs.BagGraphs`, the bag padded to its bucket). Returns the step function, after three
    warm-up calls (compilation, allocator, the graph's capture)."""
    import torch.nn.functional as F

    from wsimamba.train.graphs import BagGraphs

    model = _step_model(name, in_dim, d_model, layers, DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")  # as MILModule
    x = torch.randn(1, instances, in_dim, device=DEV)
    y = torch.ones(1, dtype=torch.long, device=DEV)
    # graphed at every size here, also above BagGraphs.MAX_LENGTH, where MILModule runs eagerly (these figures set it)
    graphs = (BagGraphs(model, x.new_zeros(in_dim), x.new_ones(in_dim), normalize=False, max_length=2**31)
              if _kind(layers)[1] else None)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
            logits = graphs.logits(x) if graphs is not None else None
            if logits is None:
                logits = model(x).logits
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync()
    if graphs is not None and not graphs.replays:
        raise SystemExit(f"{name} {layers}: the CUDA graph did not replay")
    return step


def step_ms(name: str, instances: int, bf16: bool, layers: str | None, *, in_dim: int = 1024, d_model: int = 512,
            steps: int = 10, repeats: int = 5) -> dict:
    """Median over `repeats` of the mean ms of `steps` back-to-back training steps (`_training_step`), and the
    peak memory of a step (GiB)."""
    step = _training_step(name, instances, bf16, layers, in_dim, d_model)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    _sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync()
        means.append((time.perf_counter() - t0) * 1e3 / steps)
    del step
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"ms": round(statistics.median(means), 3), "ms_all": [round(m, 3) for m in means], "peak_gib": round(peak, 3)}


def profile_step(name: str, instances: int, layers: str | None, rows: int = 30) -> str:
    """torch.profiler's table of the CUDA kernels of one bf16 training step (for finding where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    step = _training_step(name, instances, True, layers)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        for _ in range(3):
            step()
        _sync()
    launches = sum(e.count for e in prof.key_averages() if e.key.startswith("cuda") and "Launch" in e.key) / 3
    head = f"# {name} {instances} patches, layers={layers}: ~{launches:.0f} kernel launches per step\n"
    return head + prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def host_profile(name: str, instances: int, layers: str | None, steps: int = 20, rows: int = 25) -> str:
    """cProfile of `steps` bf16 training steps: where the host's time goes (a step of a few ms of GPU work
    can be bound by the Python that launches it)."""
    import cProfile
    import io
    import pstats

    step = _training_step(name, instances, True, layers)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    _sync()
    prof.disable()
    wall = (time.perf_counter() - t0) / steps * 1e3
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return f"# host profile {name} {instances} layers={layers}: {wall:.2f} ms per step under cProfile\n" + text.getvalue()


def gpu_suite(args) -> dict:
    """Issue 10's benchmark (module docstring)."""
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    layer_kinds = args.layers.split(",")
    out = {"benchmark": "train --gpu", "device": device_name(DEV), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "in_dim": 1024, "d_model": 512, "layers": layer_kinds, "steps": {}}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    for name in (m for m in args.models.split(",") if m):
        for n in (int(v) for v in args.step_instances.split(",") if v):
            for precision in args.precisions.split(","):
                kinds = layer_kinds if name in MAMBA_MODELS else [None]
                for kind in kinds:
                    r = step_ms(name, n, precision == "bf16", kind)
                    key = f"{name}/{n}/{precision}" + (f"/{kind}" if kind else "")
                    out["steps"][key] = r
                    print(f"{key}: {r['ms']:.2f} ms  peak {r['peak_gib']:.2f} GiB", file=sys.stderr, flush=True)
    for name in args.profile.split(",") if args.profile else []:
        for kind in layer_kinds:
            print(profile_step(name, args.profile_instances, kind if name in MAMBA_MODELS else None), file=sys.stderr, flush=True)
            print(host_profile(name, args.profile_instances, kind if name in MAMBA_MODELS else None), file=sys.stderr, flush=True)
    memory = {}
    for n in (int(v) for v in args.memory_instances.split(",")) if args.memory_instances else []:
        for kind in (k for k in layer_kinds if not _kind(k)[1]):  # (a graph allocates at capture, outside the peak)
            r = step_ms("lbmambamil", n, True, kind, steps=1, repeats=1)
            memory[f"lbmambamil/{n}/bf16/{kind}"] = r
            print(f"memory lbmambamil/{n}/{kind}: {r['peak_gib']:.2f} GiB, {r['ms']:.1f} ms", file=sys.stderr, flush=True)
    out["memory"] = memory
    if args.epoch_bags:
        out["epochs"] = epoch_seconds(args, args.epoch_layers.split(","))
    return out


def _epoch_timer(cuda: bool, profile_last: bool = False):
    """A Lightning callback keeping each training epoch's seconds (`.seconds`, CUDA synchronised around
    them), the bytes the datamodule's GPU cache held at an epoch's end (`.cached`), and with `profile_last`
    a cProfile of the last epoch (`.profile`)."""
    import cProfile

    from lightning.pytorch.callbacks import Callback

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []
            self.cached = None
            self.profile = cProfile.Profile() if profile_last else None

        def _last(self, trainer) -> bool:
            return self.profile is not None and trainer.current_epoch == trainer.max_epochs - 1

        def on_train_epoch_start(self, trainer, module):
            sync()
            if self._last(trainer):
                self.profile.enable()
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            sync()
            self.seconds.append(time.perf_counter() - self.t0)
            if self._last(trainer):
                self.profile.disable()
            cache = getattr(trainer.datamodule, "cache", None)  # freed when fit ends
            self.cached = cache.nbytes if cache is not None else None

    return EpochTimer()


def epoch_seconds(args, layer_kinds: list[str]) -> dict:
    """Seconds per epoch of `--epoch-bags` bags of `--epoch-instances` patches (1024-d fp32 h5 files written
    here) through the real training path: MILModule + MILDataModule (its default gpu_cache="auto" keeps the
    bags on the GPU after the first epoch's read) + Lightning Trainer, bf16-mixed, no validation. One warm-up
    epoch (reads the files, compiles), then the median of `--epochs` timed ones."""
    import io
    import pstats
    import types

    import lightning as L

    from wsimamba.data.bags import BagDataset, FeatureSource
    from wsimamba.data.labels import read_labels
    from wsimamba.data.synthetic import write_cohort
    from wsimamba.train.datamodule import MILDataModule
    from wsimamba.train.module import MILModule

    n, count = args.epoch_instances, args.epoch_bags
    gen = torch.Generator(device=DEV).manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # every bag n patches, or with --epoch-vary v lengths uniform in n·(1 ± v) (several graph buckets)
        sizes = [n] * count if not args.epoch_vary else [
            int(n * (1 + args.epoch_vary * (2 * v - 1))) for v in torch.rand(count, generator=torch.Generator().manual_seed(0))]
        bags = (torch.randn(k, 1024, device=DEV, generator=gen).cpu().numpy() for k in sizes)
        feats, labels = write_cohort(tmp, types.SimpleNamespace(bags=bags, labels=[i % 2 for i in range(count)]))
        write_s = time.perf_counter() - t0
        table = read_labels(labels)
        dataset = BagDataset(FeatureSource(feats), table.slide_ids, table.labels)
        runs = [("abmil", None, "")] + [(m, k, "") for m in args.epoch_models.split(",") for k in layer_kinds]
        # more runs of the last model: MILModule's per-step logging and non-finite-loss watch made no-ops, or
        # the last epoch under cProfile (its time is then the profiler's too)
        runs += [(*runs[-1][:2], f"+{a}") for a in args.epoch_ablate.split(",") if a]
        for name, kind, ablate in runs:
            impl, graphs = _kind(kind)
            kw = {"d_model": 512} | ({"impl": impl} if impl else {})
            L.seed_everything(0, verbose=False)
            module = MILModule(name, 1024, 2, kw, lr=1e-4, max_epochs=args.epochs + 1, cuda_graphs=graphs)
            if "nolog" in ablate:
                module.log = lambda *a, **k: None
            if "nowatch" in ablate:
                module._watch_loss = lambda loss: None
            dm = MILDataModule(dataset, list(range(count)), [], [], seed=0)
            timer = _epoch_timer(DEV == "cuda", profile_last="profile" in ablate)
            trainer = L.Trainer(max_epochs=args.epochs + 1, accelerator="gpu" if DEV == "cuda" else "cpu", devices=1,
                                precision="bf16-mixed" if DEV == "cuda" else "32-true",
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
            trainer.fit(module, datamodule=dm)
            key = name + (f"/{kind}" if kind else "") + ablate
            if timer.profile is not None:
                text = io.StringIO()
                pstats.Stats(timer.profile, stream=text).sort_stats("tottime").print_stats(30)
                print(f"# host profile of the last epoch, {key}\n{text.getvalue()}", file=sys.stderr, flush=True)
            results[key] = {"seconds_per_epoch": round(statistics.median(timer.seconds[1:]), 3),
                            "first_epoch_s": round(timer.seconds[0], 2),
                            "epochs_s": [round(t, 3) for t in timer.seconds[1:]],
                            "gpu_cache_gib": round(timer.cached / 2**30, 2) if timer.cached is not None else None}
            print(f"epoch {key}: {results[key]}", file=sys.stderr, flush=True)
            del module, dm, trainer
            if DEV == "cuda":
                torch.cuda.empty_cache()
    return {"bags": count, "instances": n, "vary": args.epoch_vary, "files_written_s": round(write_s, 1),
            "results": results}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="abmil,mambamil,lbmambamil")
    ap.add_argument("--bags", type=int, default=16)
    ap.add_argument("--instances", type=int, default=1000, help="patches per bag")
    ap.add_argument("--in-dim", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=128, help="512 is the papers' width")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--scan-backend", default="auto", help="selective-scan backend of the Mamba models")
    ap.add_argument("--triton-backward", default="auto",
                    help="with the Triton scan: which backward kernels, comma-separated, each Mamba model trained "
                         "once per kind in this process: auto (sequential where it fits) and/or scan "
                         "(results of the scan kind are named MODEL+scan-bwd)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    ap.add_argument("--gpu", action="store_true", help="run issue 10's suite on CUDA (module docstring)")
    ap.add_argument("--layers", default="fast+graphs,fast,reference",
                    help="--gpu: Mamba layer implementations to compare (+graphs: with MILModule's CUDA graphs)")
    ap.add_argument("--step-instances", default="10000,50000", help="--gpu: bag sizes of the step timings")
    ap.add_argument("--precisions", default="bf16,fp32", help="--gpu: bf16 (autocast) and/or fp32")
    ap.add_argument("--memory-instances", default="100000,200000", help="--gpu: bag sizes of the peak-memory runs")
    ap.add_argument("--profile", default="", help="--gpu: models whose 10k bf16 step is profiled (kernel table)")
    ap.add_argument("--epoch-bags", type=int, default=400, help="--gpu: bags of the epoch timing (0: skip it)")
    ap.add_argument("--epoch-instances", type=int, default=10_000, help="--gpu: patches per bag of the epoch timing")
    ap.add_argument("--epoch-vary", type=float, default=0.0, help="--gpu: epoch bags' lengths uniform in n·(1 ± vary)")
    ap.add_argument("--epoch-models", default="lbmambamil", help="--gpu: Mamba models of the epoch timing (abmil too)")
    ap.add_argument("--epoch-layers", default="fast+graphs,fast",
                    help="--gpu: Mamba layer implementations of the epoch timing (+graphs: train.cuda_graphs on)")
    ap.add_argument("--epoch-ablate", default="", help="--gpu: extra epoch runs of the last model: nolog, nowatch, "
                                                       "profile (comma-separated; + joins them, e.g. nolog+nowatch)")
    ap.add_argument("--profile-instances", type=int, default=10_000, help="--gpu: bag size of the profiles")
    ap.add_argument("--gpu-smoke", action="store_true", help="run the --gpu suite on the CPU at the sizes given (checks the script)")
    args = ap.parse_args(argv)
    if args.gpu or args.gpu_smoke:
        global DEV
        DEV = "cpu" if args.gpu_smoke else "cuda"
        if args.gpu_smoke:  # CUDA graphs need CUDA: the smoke run times the other layer kinds
            args.layers, args.epoch_layers = (",".join(k for k in v.split(",") if not _kind(k)[1])
                                              for v in (args.layers, args.epoch_layers))
        out = gpu_suite(args)
        return report(out, args.json)

    import lightning as L

    from wsimamba.data.bags import BagDataset, FeatureSource
    from wsimamba.data.labels import read_labels
    from wsimamba.data.synthetic import witness_bags, write_cohort
    from wsimamba.train.datamodule import MILDataModule
    from wsimamba.train.module import MILModule

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    precision = "bf16-mixed" if cuda else "32-true"

    with tempfile.TemporaryDirectory() as tmp:
        n = args.instances
        data = witness_bags(args.bags, dim=args.in_dim, instances=(n, n), seed=0)
        feats, labels = write_cohort(tmp, data)
        table = read_labels(labels)
        dataset = BagDataset(FeatureSource(feats), table.slide_ids, table.labels, preload=True)
        results = {}
        runs = []
        for name in args.models.split(","):
            kinds = ["auto"] if name == "abmil" else args.triton_backward.split(",")
            runs += [(name, kind) for kind in kinds]
        for name, kind in runs:
            kw = {"d_model": args.d_model}
            if name != "abmil":
                kw.update(d_state=args.d_state, backend=args.scan_backend)
            if args.triton_backward != "auto":
                from wsimamba.kernels import selective_scan as ks

                ks.BACKWARD = kind
            L.seed_everything(0, verbose=False)
            module = MILModule(name, args.in_dim, 2, kw, lr=1e-4, max_epochs=args.epochs + 1)
            dm = MILDataModule(dataset, list(range(len(dataset))), [], [], seed=0)
            timer = _epoch_timer(cuda)
            trainer = L.Trainer(max_epochs=args.epochs + 1, accelerator="gpu" if cuda else "cpu", devices=1,
                                precision=precision, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                callbacks=[timer])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer.fit(module, datamodule=dm)
            timed = timer.seconds[1:]
            label = name if kind == "auto" else f"{name}+{kind}-bwd"
            results[label] = {"seconds_per_epoch": statistics.median(timed), "epochs": timed,
                              "parameters": sum(p.numel() for p in module.model.parameters())}
            if cuda:
                results[label]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    base = results.get("abmil", {}).get("seconds_per_epoch")
    for r in results.values():
        r["ratio_to_abmil"] = r["seconds_per_epoch"] / base if base else None
    from wsimamba.ops import list_backends

    backends = list_backends()
    scan = args.scan_backend
    if scan == "auto":  # what backend="auto" picks
        scan = "triton" if cuda and "triton" in backends else "reference"
    out = {
        "benchmark": "train", "device": device_name(args.device), "scan_backend": scan, "threads": args.threads if not cuda else None,
        "precision": precision, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "bags": args.bags, "instances": n, "in_dim": args.in_dim, "d_model": args.d_model, "d_state": args.d_state,
        "results": results,
    }
    return report(out, args.json)


if __name__ == "__main__":
    main()
