"""The `wsimamba` command. Thin: parses, validates, calls the library, reports.

Errors are one line on stderr (`error: ...`) with a non-zero exit code; `--debug` shows tracebacks.
Exit codes: 0 success, 1 an error (or, for extract, at least one slide failed), 2 bad usage.
"""

from __future__ import annotations

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
):
    """Write a synthetic H&E cohort: pyramidal slides, tumor masks and labels.csv."""
    from wsimamba.slide.synth import synth_cohort

    if fmt not in ("svs", "tiff"):
        raise WsimambaError(f"--format must be svs or tiff, got {fmt!r}")
    with _bar("slides") as (progress, task):
        progress.update(task, total=slides)
        made = synth_cohort(
            out_dir, slides, seed=seed, size=size, tumor_fraction=tumor_fraction, fmt=fmt, mpp=mpp,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    pos = sum(1 for s in made if s.label == 1)
    stdout.print(f"wrote {len(made)} slides ({pos} tumor, {len(made) - pos} normal) to {Path(out_dir) / 'slides'}")
    stdout.print(f"labels: {Path(out_dir) / 'labels.csv'}   masks: {Path(out_dir) / 'masks'}")


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


class _RichExtractProgress:
    """Slides done/total and patches/s, drawn with rich on stderr."""

    def __init__(self):
        from wsimamba.features.extract import ExtractProgress  # noqa: F401  (the protocol we follow)

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=err,
        )
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
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes reading tiles."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides that are already complete."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: take the I-th of N deterministic parts of the slide list (SLURM arrays)."),
    no_qc: bool = typer.Option(False, "--no-qc", help="Do not write qc/<slide_id>.png."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random-init weights."),
):
    """Tile slides on tissue, embed every patch, write one feature file per slide."""
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
            batch_size=batch_size, workers=workers, format=fmt, overwrite=overwrite, qc=not no_qc,
        ),
    )
    shard_t = parse_shard(shard)
    bar = _RichExtractProgress()
    t0 = time.perf_counter()
    try:
        results = extract_folder(slides_dir, out, cfg, slide_list=slide_list, shard=shard_t, progress=bar)
    finally:
        bar.stop()
    return _report_extract(results, out, time.perf_counter() - t0)


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
# demo


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for the demo cohort and its outputs."),
    slides: int = typer.Option(6, "--slides", min=2, help="Number of synthetic slides."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
):
    """The main job on the built-in synthetic cohort: synth → extract (features with a random-init ResNet-50)."""
    from wsimamba.config import ExtractConfig, build_config
    from wsimamba.features.extract import extract_folder
    from wsimamba.slide.synth import synth_cohort

    cohort = Path(out_dir) / "cohort"
    if not (cohort / "labels.csv").is_file():
        with _bar("synth slides") as (progress, task):
            synth_cohort(
                cohort, slides, seed=0, size=(4096, 4096), fmt="svs", mpp=0.5,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    cfg = build_config(
        ExtractConfig,
        dict(encoder="resnet50-trunc", random_init=True, target_mpp=1.0, patch_size=224, device=device,
             workers=workers, batch_size=32),
    )
    bar = _RichExtractProgress()
    t0 = time.perf_counter()
    try:
        results = extract_folder(cohort / "slides", Path(out_dir) / "features", cfg, progress=bar)
    finally:
        bar.stop()
    code = _report_extract(results, Path(out_dir) / "features", time.perf_counter() - t0)
    stdout.print(f"QC pictures: {Path(out_dir) / 'features' / 'qc'}   labels: {cohort / 'labels.csv'}")
    return code


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by `python -m wsimamba`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
        print("error: interrupted", file=sys.stderr)
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
    return int(rv) if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
