"""The `wsimamba` command. Thin: parses, validates, calls the library, reports.

Errors are one line on stderr (`error: ...`) with a non-zero exit code; `--debug` shows tracebacks.
Exit codes: 0 success, 1 an error (or, for extract, at least one slide failed), 2 bad usage.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wsimamba.errors import WsimambaError

app = typer.Typer(
    name="wsimamba",
    help="Whole-slide images to slide-level predictions with Mamba MIL aggregators.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
# typer vendors its own click; its UsageError (bad flags, missing arguments) is BadParameter's base
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
stdout = Console()
# Set by a command that has released everything it opened when it returns (extract: files finished,
# threads joined, worker processes stopped); `entry` then skips the interpreter's teardown.
_exit_fast = False
_argv: list[str] = []  # the arguments `main` was given (`extract --gpus` passes them on to its ranks)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
):
    """Whole-slide images to slide-level predictions with Mamba MIL aggregators."""


# ---------------------------------------------------------------------------------------------
# synth


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write slides/, masks/, labels.csv and cohort.json into."),
    slides: int = typer.Option(8, "--slides", min=1, help="Number of slides."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same cohort)."),
    size: tuple[int, int] = typer.Option((8192, 8192), "--size", help="Approximate slide width and height (level-0 pixels)."),
    tumor_fraction: tuple[float, float] = typer.Option(
        (0.02, 0.10), "--tumor-fraction", help="Range of the tumor share of tissue on positive slides."
    ),
    fmt: str = typer.Option("svs", "--format", help="svs (Aperio-style) or tiff (generic pyramidal TIFF)."),
    mpp: float = typer.Option(0.25, "--mpp", help="Level-0 microns per pixel written into the slides."),
    mask_downsample: int = typer.Option(32, "--mask-downsample", min=1, help="Level-0 pixels per tumor-mask pixel."),
):
    """Write a synthetic H&E cohort: pyramidal slides, tumor masks and labels.csv."""
    from wsimamba.slide.synth import synth_cohort

    if fmt not in ("svs", "tiff"):
        raise WsimambaError(f"--format must be svs or tiff, got {fmt!r}")
    with _bar("slides") as (progress, task):
        progress.update(task, total=slides)
        made = synth_cohort(
            out_dir, slides, seed=seed, size=size, tumor_fraction=tumor_fraction, fmt=fmt, mpp=mpp,
            mask_downsample=mask_downsample, progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    pos = sum(1 for s in made if s.label == 1)
    stdout.print(f"wrote {len(made)} slides ({pos} tumor, {len(made) - pos} normal) to {Path(out_dir) / 'slides'}")
    stdout.print(f"labels: {Path(out_dir) / 'labels.csv'}   masks: {Path(out_dir) / 'masks'}")


@app.command(name="synth-images")
def synth_images_(
    out_dir: Path = typer.Argument(..., help="Folder to write the images (and, for cnfood241, the list files) into."),
    classes: int = typer.Option(4, "--classes", help="Number of classes (2-10), one procedural pattern each."),
    per_class: int = typer.Option(40, "--per-class", help="Images per class (all splits together)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same images)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of each class in val/."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of each class in test/."),
    layout: str = typer.Option("imagefolder", "--layout", help="imagefolder (train/ val/ test/ class folders) or "
                               "cnfood241 (images/NNN/*.png + train.txt, val.txt, test.txt)."),
):
    """Write a synthetic image-classification dataset: stripes, checkerboards, discs, rings, … in random colours."""
    from wsimamba.data.images import synth_images

    with _bar("images") as (progress, task):
        made = synth_images(out_dir, classes=classes, per_class=per_class, size=size, seed=seed,
                            val_fraction=val_fraction, test_fraction=test_fraction, layout=layout,
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
    counts = ", ".join(f"{n} {part}" for part, n in made.counts.items() if n)
    stdout.print(f"wrote {sum(made.counts.values())} images ({counts}) of {len(made.classes)} classes "
                 f"({', '.join(made.classes)}) to {made.root}", highlight=False, soft_wrap=True)
    if made.lists:
        stdout.print(f"image root: {made.image_root}   lists: {'  '.join(str(p) for p in made.lists.values())}",
                     highlight=False, soft_wrap=True)


class _Bar:
    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=False,
        )
        self.progress.start()
        task = self.progress.add_task(self.label, total=None)
        return self.progress, task

    def __exit__(self, *exc):
        self.progress.stop()


def _bar(label: str) -> _Bar:
    return _Bar(label)


# ---------------------------------------------------------------------------------------------
# extract


def _extract_bars() -> Progress:
    """Extraction progress on stderr: description, bar, done/total, an info field, elapsed time."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err,
    )


class _RichExtractProgress:
    """Slides done/total and patches/s, drawn with rich on stderr."""

    def __init__(self):
        from wsimamba.features.extract import ExtractProgress  # noqa: F401  (the protocol we follow)

        self.progress = _extract_bars()
        self.slides = self.progress.add_task("slides", total=None, info="")
        self.patches = self.progress.add_task("patches", total=None, info="")
        self.t0 = time.perf_counter()
        self.n_patches = 0
        self.failed = 0

    def start(self, n_slides: int) -> None:
        self.progress.update(self.slides, total=n_slides)
        self.progress.start()

    def slide_start(self, slide_id: str, n_patches: int) -> None:
        self.slide_t0 = time.perf_counter()
        self.slide_n = 0
        self.progress.update(self.patches, total=n_patches, completed=0, description=f"{slide_id}")

    def patches_done(self, n: int) -> None:
        self.n_patches += n
        self.slide_n += n
        rate = self.slide_n / max(1e-9, time.perf_counter() - self.slide_t0)
        self.progress.update(self.patches, advance=n, info=f"{rate:,.0f} patches/s")

    def slide_end(self, result) -> None:
        self.failed += result.status == "failed"
        info = f"{self.failed} failed" if self.failed else ""
        self.progress.update(self.slides, advance=1, info=info)

    def stop(self) -> None:
        self.progress.stop()


@app.command()
def extract(
    slides_dir: Optional[Path] = typer.Argument(None, help="Folder of slides (svs, tif/tiff, ndpi, mrxs, scn, ...)."),
    out: Path = typer.Option(Path("features"), "--out", "-o", help="Output folder for feature files, manifest.csv and qc/."),
    encoder: str = typer.Option("resnet50-trunc", "--encoder", help="Encoder name (see --list-encoders)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local state-dict file for the encoder."),
    random_init: bool = typer.Option(False, "--random-init", help="Use random encoder weights on purpose."),
    list_encoders_: bool = typer.Option(False, "--list-encoders", help="List encoders and exit."),
    target_mpp: float = typer.Option(0.5, "--target-mpp", help="Resolution to tile at (µm per pixel)."),
    patch_size: int = typer.Option(256, "--patch-size", help="Patch side at the target resolution (pixels)."),
    overlap: int = typer.Option(0, "--overlap", help="Overlap of neighbouring patches (pixels at the target resolution)."),
    min_tissue: float = typer.Option(0.25, "--min-tissue", help="Minimum fraction of a patch on tissue."),
    mpp_override: Optional[float] = typer.Option(None, "--mpp-override", help="Level-0 µm/px for slides that lack or misstate it."),
    tissue_masks: Optional[Path] = typer.Option(None, "--tissue-masks", help="Folder of <slide_id>.png tissue masks to use instead of detection."),
    otsu: bool = typer.Option(False, "--otsu", help="Otsu threshold on saturation instead of the fixed one."),
    sthresh: int = typer.Option(8, "--sthresh", help="Fixed saturation threshold (0-255)."),
    min_tissue_mm2: float = typer.Option(0.05, "--min-tissue-area", help="Drop tissue regions smaller than this (mm²)."),
    slide_list: Optional[Path] = typer.Option(None, "--slide-list", help="File of slide ids / file names (or CSV with slide_id) to restrict to."),
    fmt: str = typer.Option("h5", "--format", help="h5 (one file per slide) or zarr (one group per slide in features.zarr)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", help="Patches per encoder batch."),
    workers: int = typer.Option(2, "--workers", help="Readers: DataLoader worker processes (OpenSlide), or threads (native tiles) plus as many tile-decoding processes on a GPU; 0 reads in the main process."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides that are already complete."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: take the I-th of N deterministic parts of the slide list (SLURM arrays)."),
    no_qc: bool = typer.Option(False, "--no-qc", help="Do not write qc/<slide_id>.png."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random-init weights."),
    reader: str = typer.Option("auto", "--reader", help="auto (native JPEG tiles when the grid allows and the encoder runs on CUDA, else OpenSlide), tiles or openslide."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="N or all: one process per GPU, each with its share of the slides and its own --workers (as torchrun --nproc-per-node N, without its launcher)."),
):
    """Tile slides on tissue, embed every patch, write one feature file per slide."""
    if gpus is not None and not list_encoders_:
        if slides_dir is None:
            raise _UsageError("missing argument SLIDES_DIR")
        return _extract_on_ranks(gpus, device, out)
    if workers > 0 and not list_encoders_ and slides_dir is not None:
        from wsimamba.features.prepare import start_fork_server

        start_fork_server()  # its imports overlap torch's, below
    from wsimamba.config import ExtractConfig, build_config
    from wsimamba.features.encoders import list_encoders
    from wsimamba.features.extract import extract_folder, parse_shard

    if list_encoders_:
        table = Table("encoder", "description")
        for name, desc in list_encoders().items():
            table.add_row(name, desc)
        stdout.print(table)
        return 0
    if slides_dir is None:
        raise _UsageError("missing argument SLIDES_DIR")
    cfg = build_config(
        ExtractConfig,
        dict(
            target_mpp=target_mpp, patch_size=patch_size, overlap=overlap, min_tissue=min_tissue,
            mpp_override=mpp_override, tissue_masks=tissue_masks,
            tissue=dict(use_otsu=otsu, sthresh=sthresh, min_tissue_mm2=min_tissue_mm2),
            encoder=encoder, weights=weights, random_init=random_init, seed=seed, device=device,
            batch_size=batch_size, workers=workers, format=fmt, overwrite=overwrite, qc=not no_qc, reader=reader,
        ),
    )
    shard_t = parse_shard(shard)
    from wsimamba.features.ranks import interrupt_once, pipe_progress

    rank_pipe = pipe_progress()  # a rank of `--gpus`: the launcher shows progress and reports
    if rank_pipe is not None:
        interrupt_once()
    bar = rank_pipe or _RichExtractProgress()
    t0 = time.perf_counter()
    try:
        results = extract_folder(slides_dir, out, cfg, slide_list=slide_list, shard=shard_t, progress=bar)
    finally:
        if rank_pipe is None:
            bar.stop()
    global _exit_fast
    _exit_fast = True
    if rank_pipe is not None:
        rank_pipe.close()
        return 1 if any(r.status == "failed" for r in results) else 0
    return _report_extract(results, out, time.perf_counter() - t0)


class _RichRanksProgress:
    """The `--gpus` launcher's bar: slides done/total over all ranks, patches and patches/s."""

    def __init__(self, n: int):
        self.progress = _extract_bars()
        self.slides = self.progress.add_task(f"slides ({n} GPUs)", total=None, info="")
        self.t0 = time.perf_counter()
        self.n_total = 0
        self.n_patches = 0
        self.failed = 0
        self.progress.start()

    def total(self, n: int) -> None:
        self.n_total += n
        self.progress.update(self.slides, total=self.n_total)

    def patches(self, n: int) -> None:
        self.n_patches += n
        self._info()

    def slide_end(self, slide: dict) -> None:
        self.failed += slide.get("status") == "failed"
        self.progress.update(self.slides, advance=1)
        self._info()

    def _info(self) -> None:
        rate = self.n_patches / max(1e-9, time.perf_counter() - self.t0)
        info = f"{self.n_patches:,} patches, {rate:,.0f}/s" + (f", {self.failed} failed" if self.failed else "")
        self.progress.update(self.slides, info=info)

    def stop(self) -> None:
        self.progress.stop()


def _extract_on_ranks(gpus: str, device: str, out: Path) -> int:
    """`extract --gpus N`: the same command in N rank processes (`wsimamba.features.ranks`), one report."""
    from wsimamba.features.ranks import parse_gpus, run_ranks, strip_option

    n = parse_gpus(gpus, device)
    t0 = time.perf_counter()
    bar = _RichRanksProgress(n)
    try:
        report = run_ranks(strip_option(_argv, "--gpus"), n, bar)
    finally:
        bar.stop()
    seconds = time.perf_counter() - t0
    by_status = {k: [s for s in report.slides if s.get("status") == k] for k in ("ok", "skipped", "failed")}
    patches = sum(int(s.get("patches") or 0) for s in by_status["ok"])
    stdout.print(
        f"{len(by_status['ok'])} extracted ({patches:,} patches, {patches / max(seconds, 1e-9):,.1f} patches/s), "
        f"{len(by_status['skipped'])} already done, {len(by_status['failed'])} failed → {out}"
    )
    for s in by_status["failed"]:
        err.print(f"failed: {s.get('slide_id')}: {s.get('error')}", highlight=False, markup=False)
    if by_status["failed"]:
        err.print(f"details in {Path(out) / 'manifest.csv'}", highlight=False)
    if report.interrupted:
        raise KeyboardInterrupt
    stopped = report.stopped()
    for r in stopped:
        c = report.codes[r]
        how = f"was killed by signal {-c}" if c < 0 else f"exited with code {c}"
        err.print(f"error: rank {r} {how}; its remaining slides are not done (rerun the same command to finish them)",
                  highlight=False, markup=False)
    return 1 if stopped or by_status["failed"] else 0


def _report_extract(results, out_dir: Path, seconds: float) -> int:
    ok = [r for r in results if r.status == "ok"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    patches = sum(r.patches for r in ok)
    rate = patches / max(seconds, 1e-9)
    stdout.print(
        f"{len(ok)} extracted ({patches:,} patches, {rate:,.1f} patches/s), {len(skipped)} already done, "
        f"{len(failed)} failed → {out_dir}"
    )
    for r in failed:
        err.print(f"failed: {r.slide_id}: {r.error}", highlight=False, markup=False)
    if failed:
        err.print(f"details in {Path(out_dir) / 'manifest.csv'}", highlight=False)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# train


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def _pm(m: dict) -> str:
    return "n/a" if m.get("mean") is None else f"{m['mean']:.3f} ± {m['std']:.3f}"


def _train_events(kind: str, info: dict) -> None:
    if kind == "start":
        stdout.print(
            f"run {info['run_dir']}: {info['slides']} slides, {info['cases']} cases, classes {info['classes']}; "
            f"{info['in_dim']}-d features from {info['features']} ({info['layout']}); {info['folds']} fold(s)",
            highlight=False, soft_wrap=True,
        )
        if info["missing"]:
            shown = ", ".join(info["missing"][:10]) + (" …" if len(info["missing"]) > 10 else "")
            err.print(f"skipped {len(info['missing'])} labelled slide(s) without features: {shown}", highlight=False, soft_wrap=True)
    elif kind == "fold_start":
        stdout.print(f"fold {info['fold']}: training on {info['n_train']} slides, validating on {info['n_val']}, "
                     f"testing on {info['n_test']}", highlight=False, soft_wrap=True)
    elif kind in ("fold_done", "fold_skip"):
        m = info["metrics"]
        t = m["test"]
        how = "done earlier" if kind == "fold_skip" else f"{m['epochs']} epochs (best {m['best_epoch']}), {m['seconds']:.0f} s"
        stdout.print(f"fold {info['fold']}: test AUC {_fmt(t['auc'])}, accuracy {_fmt(t['accuracy'])}, "
                     f"balanced accuracy {_fmt(t['balanced_accuracy'])}, F1 {_fmt(t['f1'])} — {how}", highlight=False, soft_wrap=True)
    elif kind == "fold_failed":
        err.print(info["message"], highlight=False, markup=False, soft_wrap=True)


def _summary_lines(summary: dict, run_dir: Path) -> None:
    m = summary["metrics"]
    done = len(summary["folds_done"])
    stdout.print(
        f"summary over {done}/{summary['folds']} fold(s): AUC {_pm(m['auc'])}, accuracy {_pm(m['accuracy'])}, "
        f"balanced accuracy {_pm(m['balanced_accuracy'])}, F1 {_pm(m['f1'])}", highlight=False, soft_wrap=True)
    stdout.print(f"→ {run_dir / 'summary.json'}", highlight=False, soft_wrap=True)


def _classify_events(kind: str, info: dict) -> None:
    if kind == "classify_start":
        c = info["counts"]
        how = f"resuming from {info['resume']}" if info["resume"] else "training"
        stdout.print(
            f"run {info['run_dir']}: {info['model']} ({info['params'] / 1e6:.2f}M parameters), {info['classes']} classes; "
            f"{c['train']} train, {c['val']} val, {c['test']} test images from {info['root']} ({info['source']}); "
            f"{how}, {info['precision']}; evaluating on {info['eval_part']}", highlight=False, soft_wrap=True)
    elif kind in ("classify_done", "classify_skip"):
        m = info["metrics"]
        e = m["eval"]
        topk = next(k for k in e if k.startswith("top") and k != "top1")
        how = "done earlier" if kind == "classify_skip" else f"{m['epochs']} epochs (best {m['best_epoch']}), {m['seconds']:.0f} s"
        stdout.print(f"{m['evaluated_on']} ({m['n_' + m['evaluated_on']]} images): top-1 {_fmt(e['top1'])}, "
                     f"{topk[:3]}-{topk[3:]} {_fmt(e[topk])}, balanced accuracy {_fmt(e['balanced_accuracy'])}, "
                     f"macro F1 {_fmt(e['macro_f1'])} — {how}", highlight=False, soft_wrap=True)
        stdout.print(f"→ {info['run_dir'] / 'metrics.json'}  {info['run_dir'] / 'confusion.png'}", highlight=False,
                     soft_wrap=True)
    elif kind == "classify_failed":
        err.print(info["message"], highlight=False, markup=False, soft_wrap=True)


def _segment_events(kind: str, info: dict) -> None:
    if kind == "segment_start":
        c = info["counts"]
        how = f"resuming from {info['resume']}" if info["resume"] else "training"
        stdout.print(
            f"run {info['run_dir']}: {info['model']} ({info['params'] / 1e6:.2f}M parameters), classes "
            f"{', '.join(info['classes'])}; {c['train']} train, {c['val']} val, {c['test']} test pairs from "
            f"{info['root']} ({info['source']}); {how}, {info['precision']}; evaluating on {info['eval_part']}",
            highlight=False, soft_wrap=True)
    elif kind in ("segment_done", "segment_skip"):
        m = info["metrics"]
        e = m["eval"]
        fg = [(name, v) for name, v in e["per_class"].items()][1:]
        per = ", ".join(f"{name}: Dice {_fmt(v['dice'])}, IoU {_fmt(v['iou'])}, HD95 {_fmt(v['hd95'], 1)} "
                        f"(constant Dice {_fmt(v['constant_dice'])})" for name, v in fg)
        how = "done earlier" if kind == "segment_skip" else f"{m['epochs']} epochs (best {m['best_epoch']}), {m['seconds']:.0f} s"
        stdout.print(f"{m['evaluated_on']} ({m['n_' + m['evaluated_on']]} images): {per} — {how}", highlight=False,
                     soft_wrap=True)
        stdout.print(f"→ {info['run_dir'] / 'metrics.json'}  {info['run_dir'] / 'overlays'}", highlight=False,
                     soft_wrap=True)
    elif kind == "segment_failed":
        err.print(info["message"], highlight=False, markup=False, soft_wrap=True)


@app.command(context_settings={"allow_extra_args": False})
def train(
    overrides: Optional[list[str]] = typer.Argument(None, help="More key=value overrides (after --set)."),
    cfg: Optional[Path] = typer.Option(None, "--cfg", "-c", help="Training config (YAML), e.g. configs/camelyon.yaml."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set model.name=abmil train.folds=3"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run folder and train every fold again."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out labelled slides that have no feature file."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar per fold (default: when a terminal)."),
):
    """Train a MIL aggregator with case-grouped cross-validation, (task: classify) an image classifier, or (task: segment) a segmentation network; writes a run folder (see README)."""
    from wsimamba.config import load_train_config
    from wsimamba.train.run import train_run

    extra = list(set_ or []) + list(overrides or [])
    for item in overrides or []:
        if "=" not in item:
            raise _UsageError(f"unexpected argument {item!r}; overrides look like key=value")
    if skip_missing:
        extra.append("data.skip_missing=true")
    config = load_train_config(cfg, extra)
    show = sys.stdout.isatty() if progress is None else progress
    if config.task == "classify":
        result = train_run(config, overwrite=overwrite, progress_bar=show, on_event=_classify_events)
        return 1 if result.status == "failed" else 0
    if config.task == "segment":
        result = train_run(config, overwrite=overwrite, progress_bar=show, on_event=_segment_events)
        return 1 if result.status == "failed" else 0
    result = train_run(config, overwrite=overwrite, progress_bar=show, on_event=_train_events)
    if result.summary is not None:
        _summary_lines(result.summary, result.run_dir)
    failed = [f for f in result.folds if f.status == "failed"]
    if failed:
        err.print(f"{len(failed)} fold(s) failed; rerun the same command to retry them", highlight=False, soft_wrap=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# eval and heatmap


def _print_run_table(run) -> dict:
    summ = run.summary()
    table = Table("fold", "test slides", "AUC", "accuracy", "bal. accuracy", "F1", "best epoch", title=str(run.path))
    for f, m in zip(run.folds, summ["per_fold"]):
        table.add_row(str(f.fold), str(len(f.y)), _fmt(m["auc"]), _fmt(m["accuracy"]), _fmt(m["balanced_accuracy"]),
                      _fmt(m["f1"]), str(f.metrics.get("best_epoch", "")))
    s = summ["metrics"]
    table.add_row("mean ± std", "", _pm(s["auc"]), _pm(s["accuracy"]), _pm(s["balanced_accuracy"]), _pm(s["f1"]), "",
                  style="bold")
    p = summ["pooled"]
    table.add_row("pooled", str(len(run.y)), _fmt(p["auc"]), _fmt(p["accuracy"]), _fmt(p["balanced_accuracy"]),
                  _fmt(p["f1"]), "")
    # piped output has no terminal width; keep the table's rows whole for logs and greps
    (stdout if stdout.is_terminal else Console(width=140, file=sys.stdout)).print(table)
    if len(run.folds) < run.n_folds:
        err.print(f"{run.n_folds - len(run.folds)} of {run.n_folds} fold(s) not complete; shown: the completed ones",
                  highlight=False, soft_wrap=True)
    return summ


@app.command(name="eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A run folder written by `wsimamba train`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs (default RUN_DIR/eval)."),
):
    """Print the per-fold and summary metrics of a run; write ROC, confusion and calibration PNGs."""
    from wsimamba.eval.plots import write_plots
    from wsimamba.eval.report import load_run

    run = load_run(run_dir)
    _print_run_table(run)
    paths = write_plots(run, out)
    stdout.print("plots: " + "  ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)
    return 0


def _print_heatmap(r) -> None:
    pos = list(r.probs)[-1]
    line = f"{r.slide_id}: P({pos}) = {r.probs[pos]:.3f}"
    if r.label is not None:
        line += f", label {r.label}"
    line += f", fold {r.fold}{'' if r.held_out else ' (slide was in its training data)'}"
    loc = r.localisation
    if loc is not None:
        if loc["tumor_patches"]:
            line += (f"; tumor localisation: patch AUC {_fmt(loc['patch_auc'], 2)}, top-{loc['tumor_patches']} precision "
                     f"{_fmt(loc['precision_at_k'], 2)} (chance {loc['chance_precision']:.2f})")
            if loc["attention_in_tumor"] is not None:
                line += f", attention on tumor {loc['attention_in_tumor']:.0%}"
        else:
            line += "; no tumor in the mask"
    stdout.print(line + f" → {r.png}", highlight=False, soft_wrap=True)


@app.command()
def heatmap(
    run_dir: Path = typer.Argument(..., help="A run folder written by `wsimamba train`."),
    slide: list[Path] = typer.Option(..., "--slide", "-s", help="Slide file (repeat for several)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Model of this fold (default: the fold that held the slide out)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Tumor mask PNG (default: masks/<slide_id>.png beside the slides folder, if any)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/heatmaps)."),
    thumb_size: int = typer.Option(1024, "--thumb-size", min=64, help="Longer side of the thumbnail, pixels."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
):
    """Draw attention over slide thumbnails; with a tumor mask, report how well attention finds the tumor."""
    from wsimamba.eval.heatmap import attention_heatmap
    from wsimamba.eval.report import load_run

    if mask is not None and len(slide) > 1:
        raise _UsageError("--mask goes with a single --slide")
    run = load_run(run_dir)
    for s in slide:
        _print_heatmap(attention_heatmap(run, s, fold=fold, mask=mask, out_dir=out, thumb_size=thumb_size, device=device))
    return 0


# ---------------------------------------------------------------------------------------------
# segmentation: tiles and stitched slide masks


@app.command()
def tiles(
    slides_dir: Path = typer.Argument(..., help="Folder of slides (e.g. the slides/ of `wsimamba synth`)."),
    masks_dir: Path = typer.Argument(..., help="Folder of tumour masks <slide_id>.png (any downsample)."),
    out_dir: Path = typer.Argument(..., help="Folder to write images/, masks/, index.csv and tiles.json into."),
    mpp: float = typer.Option(1.0, "--mpp", help="Resolution tiles are cut at (µm/px)."),
    size: int = typer.Option(256, "--size", min=8, help="Tile side at --mpp (pixels)."),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Fraction of a tile that must lie on tissue."),
    max_per_slide: Optional[int] = typer.Option(None, "--max-per-slide", help="At most this many tiles per slide (seeded draw)."),
    tumor_share: float = typer.Option(0.5, "--tumor-share", help="With --max-per-slide: share drawn from tiles with tumour."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of cases (slides) whose tiles go to val."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of cases (slides) whose tiles go to test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tile draw and the split."),
    mask_downsample: Optional[float] = typer.Option(None, "--mask-downsample", help="Level-0 pixels per mask pixel "
                                                    "(default: the mask PNG / cohort.json, else mask vs slide size)."),
    mpp_override: Optional[float] = typer.Option(None, "--mpp-override", help="Level-0 µm/px for slides that lack it."),
):
    """Cut image/mask tile pairs for segmentation from slides and their tumour masks, split by slide."""
    from wsimamba.slide.segtiles import cut_tiles

    with _bar("slides") as (progress, task):
        made = cut_tiles(slides_dir, masks_dir, out_dir, mpp=mpp, size=size, min_tissue=min_tissue,
                         max_per_slide=max_per_slide, tumor_share=tumor_share, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, mask_downsample=mask_downsample,
                         mpp_override=mpp_override,
                         progress=lambda done, total: progress.update(task, completed=done, total=total))
    c = made.counts()
    tumor = sum(1 for r in made.rows if r["tumor_fraction"] > 0)
    stdout.print(f"wrote {len(made.rows)} tile pairs ({tumor} with tumour) from {len(made.per_slide)} slides to "
                 f"{out_dir}: {c['train']} train, {c['val']} val, {c['test']} test (split by slide)",
                 highlight=False, soft_wrap=True)
    stdout.print(f"index: {Path(out_dir) / 'index.csv'}", highlight=False, soft_wrap=True)
    return 0


@app.command()
def segment(
    run_dir: Path = typer.Argument(..., help="A segmentation run folder (task: segment)."),
    slide: list[Path] = typer.Option(..., "--slide", "-s", help="Slide file (repeat for several)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/segmentations)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Ground-truth mask PNG (default: masks/<slide_id>.png beside the slides folder, if any)."),
    thumb_size: int = typer.Option(1024, "--thumb-size", min=64, help="Longer side of the thumbnail, pixels."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Tile µm/px (default: the run's tiles.json)."),
    size: Optional[int] = typer.Option(None, "--size", help="Tile side in pixels (default: the run's tiles.json)."),
    min_tissue: float = typer.Option(0.1, "--min-tissue", help="Fraction of a tile that must lie on tissue."),
    device: str = typer.Option("auto", "--device", help="auto (the GPU when there is one), cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Tiles per forward pass."),
):
    """Segment slides tile by tile with a trained segmenter; stitch the predicted mask over the thumbnail."""
    from wsimamba.eval.stitch import segment_slide

    if mask is not None and len(slide) > 1:
        raise _UsageError("--mask goes with a single --slide")
    with _bar("slides") as (progress, task):
        progress.update(task, total=len(slide))
        results = []
        for s in slide:
            results.append(segment_slide(run_dir, s, out, mask=mask, thumb_size=thumb_size, device=device,
                                         batch_size=batch_size, mpp=mpp, size=size, min_tissue=min_tissue))
            progress.update(task, advance=1)
    for r in results:
        share = r.info["predicted_share"]
        line = f"{r.slide_id}: {r.info['tiles']} tiles, predicted tumour {1 - share.get('0', 0):.1%} of the thumbnail"
        if r.info.get("dice"):
            line += "; against the mask: Dice " + ", ".join(_fmt(v) for v in r.info["dice"].values())
        stdout.print(line + f" → {r.overlay_png}  {r.mask_png}", highlight=False, soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------
# demo


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for the demo cohort and its outputs."),
    slides: int = typer.Option(32, "--slides", min=8, help="Number of synthetic slides."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local torchvision ResNet-50 state dict (default: random-init encoder)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    heatmaps: int = typer.Option(4, "--heatmaps", min=0, help="Number of tumor slides to draw heatmaps for."),
):
    """The whole pipeline on a synthetic cohort: synth → extract → train LBMambaMIL (cross-validation) → eval → heatmaps."""
    from wsimamba.config import ExtractConfig, TrainConfig, build_config
    from wsimamba.eval.heatmap import attention_heatmap
    from wsimamba.eval.plots import write_plots
    from wsimamba.eval.report import load_run
    from wsimamba.features.extract import extract_folder
    from wsimamba.slide.synth import synth_cohort
    from wsimamba.train import demo as spec
    from wsimamba.train.run import train_run

    t_all = time.perf_counter()
    times: dict[str, float] = {}
    out_dir = Path(out_dir)
    cohort = out_dir / "cohort"
    t0 = time.perf_counter()
    c = spec.COHORT
    if not (cohort / "labels.csv").is_file():
        with _bar("synth slides") as (progress, task):
            synth_cohort(
                cohort, slides, seed=c["seed"], size=c["size"], fmt="svs", mpp=c["mpp"], tumor_fraction=c["tumor_fraction"],
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    times["synth"] = time.perf_counter() - t0

    e = spec.EXTRACT
    cfg = build_config(
        ExtractConfig,
        dict(encoder=e["encoder"], random_init=weights is None, weights=weights, target_mpp=e["target_mpp"],
             patch_size=e["patch_size"], device=device, workers=workers, batch_size=e["batch_size"]),
    )
    if weights is None:
        stdout.print("note: patch features come from a RANDOM-INIT ResNet-50 (no pretrained weights; pass --weights "
                     "for real ones). The numbers below describe this synthetic cohort with those features, "
                     "not a pathology model; say so wherever they go.", highlight=False, soft_wrap=True)
    bar = _RichExtractProgress()
    t0 = time.perf_counter()
    try:
        results = extract_folder(cohort / "slides", out_dir / "features", cfg, progress=bar)
    finally:
        bar.stop()
    times["extract"] = time.perf_counter() - t0
    if _report_extract(results, out_dir / "features", times["extract"]):
        return 1

    t0 = time.perf_counter()
    tcfg = build_config(TrainConfig, spec.demo_train_dict(out_dir), where="demo config")
    result = train_run(tcfg, progress_bar=sys.stdout.isatty(), on_event=_train_events)
    times["train"] = time.perf_counter() - t0
    if result.summary is None:
        raise WsimambaError("no fold finished training; see the messages above")

    t0 = time.perf_counter()
    run = load_run(result.run_dir)
    _print_run_table(run)
    plots = write_plots(run)
    times["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    import json

    meta = json.loads((cohort / "cohort.json").read_text())
    tumor = [s for s in meta["slides"] if s["label"] == 1]  # in id order: no picking of slides that look good
    drawn = []
    for s in tumor[:heatmaps]:
        r = attention_heatmap(run, cohort / s["path"])
        _print_heatmap(r)
        drawn.append(r)
    times["heatmaps"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all

    auc = result.summary["metrics"]["auc"]
    stdout.print(
        f"\ndemo finished in {total / 60:.1f} min (synth {times['synth']:.0f} s, extract {times['extract']:.0f} s, "
        f"train {times['train']:.0f} s, eval {times['eval']:.0f} s, heatmaps {times['heatmaps']:.0f} s)",
        highlight=False, soft_wrap=True,
    )
    enc = "random-init ResNet-50 features" if weights is None else f"ResNet-50 features ({weights})"
    stdout.print(f"{tcfg.model.name} on {enc}: cross-validated AUC {_pm(auc)} over {len(run.folds)} folds "
                 f"({len(run.y)} slides)", highlight=False, soft_wrap=True)
    locs = [r.localisation["patch_auc"] for r in drawn if r.localisation and r.localisation["patch_auc"] is not None]
    if locs:
        stdout.print(f"attention vs the tumor masks: patch AUC {min(locs):.2f}–{max(locs):.2f} on the first "
                     f"{len(locs)} tumor slide(s)", highlight=False, soft_wrap=True)
    stdout.print(f"cohort:    {cohort} (slides/, masks/, labels.csv)", highlight=False, soft_wrap=True)
    stdout.print(f"features:  {out_dir / 'features'} (QC pictures in qc/)", highlight=False, soft_wrap=True)
    stdout.print(f"run:       {result.run_dir} (config.yaml, splits.csv, fold_*/, summary.json)", highlight=False, soft_wrap=True)
    stdout.print(f"plots:     {plots['roc']}  {plots['confusion']}  {plots['calibration']}", highlight=False, soft_wrap=True)
    if drawn:
        stdout.print(f"heatmaps:  {drawn[0].png.parent}", highlight=False, soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------
# quantize


@app.command()
def quantize(
    run_dir: Path = typer.Argument(..., help="A run folder written by `wsimamba train`."),
    cfg: Optional[Path] = typer.Option(None, "--cfg", "-c", help="Quantization config (YAML), e.g. configs/quant.yaml."),
    method: Optional[str] = typer.Option(None, "--method", help="naive, hadamard, mambaquant or all (default all)."),
    calib_slides: Optional[int] = typer.Option(None, "--calib-slides", help="Training slides per fold to calibrate on (default 8)."),
    w_bits: Optional[int] = typer.Option(None, "--w-bits", help="Weight bits: 8 or 4 (default 8)."),
    a_bits: Optional[int] = typer.Option(None, "--a-bits", help="Activation bits: 8."),
    granularity: Optional[str] = typer.Option(None, "--act", help="Activation scales: tensor (static) or token (dynamic)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default auto)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/quant)."),
):
    """Post-training W8A8 quantization (MambaQuant) of every fold; float vs each method on the test slides."""
    from wsimamba.quant.run import check_run_dir, quantize_run
    from wsimamba.config import load_quant_config
    from wsimamba.quant.spec import METHODS

    qc = load_quant_config(cfg, {"method": method, "calib_slides": calib_slides, "w_bits": w_bits, "a_bits": a_bits,
                                 "granularity": granularity, "device": device})
    check_run_dir(run_dir)  # before the bar starts, so a bad folder is one line
    methods = METHODS if qc.method == "all" else (qc.method,)
    with _bar("quantize") as (progress, task):
        def on_event(kind: str, info: dict) -> None:
            if kind == "start":
                progress.update(task, total=info["steps"])
            elif kind == "step":
                progress.update(task, advance=1, description=f"fold {info['fold']} {info['method']}")

        result = quantize_run(run_dir, methods, qc.calib_slides, qc.w_bits, qc.a_bits, out, qc.device,
                              qc.granularity, qc.percentile, qc.alpha, qc.seed, on_event=on_event)
    s = result.summary
    table = Table("method", "AUC", "accuracy", "bal. accuracy", "F1", "mean |Δp|",
                  title=f"{run_dir}: W{s['w_bits']}A{s['a_bits']}, {s['folds']} fold(s), {s['device']}")
    for name, m in s["methods"].items():
        table.add_row(name, _pm(m["auc"]), _pm(m["accuracy"]), _pm(m["balanced_accuracy"]), _pm(m["f1"]),
                      _pm(m["mean_abs_dprob"]))
    (stdout if stdout.is_terminal else Console(width=140, file=sys.stdout)).print(table)
    stdout.print(f"table: {result.out_dir / 'quant_table.csv'}  summary: {result.out_dir / 'quant_summary.md'}  "
                 f"checkpoints: {len(result.checkpoints)} in {result.out_dir}", highlight=False, soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by `python -m wsimamba`)."""
    global _argv
    argv = list(sys.argv[1:] if argv is None else argv)
    _argv = argv
    debug = "--debug" in argv
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="wsimamba", standalone_mode=False)
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except _UsageError as e:
        if debug:
            raise
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say_interrupted()
        return 130
    except WsimambaError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: still one line, the traceback behind --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    if rv == 130:  # click (8.2+, non-standalone) turns a Ctrl-C inside a command into this return value
        _say_interrupted()
    return int(rv) if isinstance(rv, int) else 0


def _say_interrupted() -> None:
    """One line for a Ctrl-C; not from the ranks of `extract --gpus`, whose launcher says it once."""
    from wsimamba.features.ranks import PROGRESS_FD_ENV

    if not os.environ.get(PROGRESS_FD_ENV):
        print("error: interrupted", file=sys.stderr)


def entry() -> None:
    """The `wsimamba` program (console script and `python -m wsimamba`): `main()`, then exit.

    After an extraction, the process leaves with `os._exit` once its output is flushed, skipping the
    interpreter's teardown: tearing down torch, torchvision and timm took ~1 s of CPU on the CI machine,
    paid at the end of every run and by every rank under torchrun. `extract_cohort` has closed every
    file, joined its threads and stopped its worker processes by then. Other commands exit normally
    (their libraries may flush at exit).

    A Ctrl-C that Python would drop in a finalizer (OpenSlide's `__del__`) is raised again
    (`wsimamba.interrupts`): the program, not a library calling `main`, owns SIGALRM and the unraisable hook."""
    from wsimamba.interrupts import retry_dropped_interrupts

    retry_dropped_interrupts()
    rc = main()
    if _exit_fast:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
