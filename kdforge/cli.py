"""The kdforge command line: parse, load the recipe, call ONE library function, print a summary.

Library errors (KdforgeError) become one clean message and an exit code here, and nowhere else.
Heavy imports (torch, timm) happen inside the commands, so `kdforge --help` is instant.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from kdforge import __version__
from kdforge.errors import KdforgeError, describe_os_error, shorten
from kdforge.formats import FORMATS, servable
from kdforge.layout import BENCH, SEEDS, SUMMARY
from kdforge.phases import on_notes
from kdforge.serve import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_BYTES, DEFAULT_MAX_CONNECTIONS

if TYPE_CHECKING:
    from kdforge.recipe import Recipe

class Commands(TyperGroup):
    """kdforge's command group: a bad option or argument (a value out of range, an unknown option, a missing
    argument) is ONE `error:` line naming it and exit code 2 (a bad recipe's), as every other refusal, instead of
    Click's boxed usage panel."""

    def make_context(self, *args, **kwargs):
        with _usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors():
            return super().invoke(ctx)


# Click's UsageError, found through typer's public BadParameter: typer 0.2x vendors Click (typer._click), older
# typers use Click itself, and the errors are that Click's classes
UsageError = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    try:
        yield
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `kdforge` alone prints its help
            raise
        where = exc.ctx.command_path if exc.ctx else "kdforge"
        _error_lines(f"{where}: {exc.format_message()} (`{where} --help` lists what it takes)")
        raise typer.Exit(2) from None


app = typer.Typer(
    cls=Commands,
    name="kdforge",
    help="Compress big vision models for small devices: teacher -> distilled student -> INT8 -> ONNX/TensorRT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Validate and inspect recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")

# soft_wrap: a message is one line, never wrapped mid-line in logs and pipes (tables still fit the width)
# emoji off: a `:name:` in a file name or value prints as it is (markup in messages is escaped where they print)
out = Console(soft_wrap=True, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)
LONGEST_LINE = 2000  # characters of one error line: a huge value echoed in a message is shortened

RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file, e.g. recipes/quickstart.toml.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set train.epochs=1 (repeatable).",
                 show_default=False),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an unfinished run from its last checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Delete this stage's earlier run and start over.")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (default: the recipe's).")
]
FORMAT_HELP = (f"auto (the fastest verified format in bench.json, else a verified INT8, else ONNX) or one of "
               f"{', '.join(servable())} (OpenVINO, LiteRT and NCNN files need the serve-openvino, serve-litert and "
               f"serve-ncnn extras).")
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where runs are written.", envvar="KDFORGE_RUNS_DIR")]
NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, help="Train with N processes (DistributedDataParallel via torchrun; one GPU each, or gloo "
    "on CPU). train.batch_size stays the global batch.")]


SeedsOpt = Annotated[str | None, typer.Option(
    "--seeds", metavar="S,S,...", help="Run the chain once per seed (e.g. 0,1,2) and report mean +- sd and the "
    "95% confidence interval of the gain (the same as --set experiment.seeds=[0,1,2]).")]
NnodesOpt = Annotated[int, typer.Option(
    "--nnodes", min=1, help="Train on N machines: run the same command on each, with the same --rdzv-endpoint; "
    "--nproc processes on each. The runs folder must be on a filesystem all of them see.")]
RdzvOpt = Annotated[str | None, typer.Option(
    "--rdzv-endpoint", metavar="HOST:PORT", help="With --nnodes: where the machines meet (torchrun's c10d "
    "rendezvous), an address of one of them, e.g. node0:29400.")]


def _launch_torchrun(nproc: int, args: list[str], recipe: Recipe, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "kdforge") -> None:
    """Run `kdforge ARGS` again as N processes (per node) under torchrun, and exit with its exit code; the
    recipe's batches are checked to split over them first (one error here, not one per process)."""
    import subprocess

    from kdforge.recipe import check_processes
    from kdforge.runtime import torchrun_command

    with user_errors():
        for section in (recipe.teacher, recipe.student):
            if section is not None:
                check_processes(section.train.batch_size, nproc * nnodes, recipe.data.augment.mixes)
        command = torchrun_command(args, nproc, nnodes, rdzv_endpoint, rdzv_id)
    where = f" on this node, one of {nnodes} meeting at {rdzv_endpoint}" if nnodes > 1 else ""
    err.print(f"launching {nproc} processes{where}: {' '.join(command[2:])}", highlight=False, soft_wrap=True)
    raise typer.Exit(subprocess.call(command))


def _common_args(recipe: Path, overrides, resume: bool, device: str | None, runs_dir: Path) -> list[str]:
    args = [str(recipe), *[a for o in overrides or [] for a in ("--set", o)], "--runs-dir", str(runs_dir)]
    return args + (["--resume"] if resume else []) + (["--device", device] if device else [])


def _is_main() -> bool:
    from kdforge.runtime import current_rank

    return current_rank() == 0


RESUMABLE = "interrupted; checkpoints are intact: run the same command with --resume to continue"


@data_app.command("shard")
def data_shard(
    imagefolder: Annotated[Path, typer.Argument(help="An ImageFolder: train/<class>/*.jpg and test/<class>/*.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for classes.txt and {train,test}/shard-*.tar.")],
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard (1,000 at ~100 KB each: ~100 MB shards).")]
    = 1000,
    max_size: Annotated[int | None, typer.Option(help="Store images whose longer side is above this many pixels "
                                                      "resized to it (JPEG); default: the files' own bytes.")] = None,
) -> None:
    """Write an ImageFolder as WebDataset shards (a recipe then reads them with dataset = "webdataset").

    Each image keeps its own file bytes; its label goes beside it as <key>.cls. With --max-size N, larger images
    are stored upright, resized to a longer side of N, as JPEGs: much faster to decode in every epoch (phone photos
    are 4032x3024; 320-512 is plenty for training at 224). Shards are written whole or not at all: run the same
    command again after an interruption and only the missing shards are written.

    Example:  kdforge data shard data/photos --out data/photos-shards --shard-size 1000 [--max-size 320]
    """
    from kdforge.data.shards import write_shards

    with user_errors():
        result = write_shards(imagefolder, out_dir, shard_size, max_size=max_size,
                              consumers=[on_notes(lambda line: err.print(escape(line), highlight=False))])
    images = " + ".join(f"{count:,} {split}" for split, count in result.images.items())
    out.print(f"wrote {result.written} shard(s) ({result.kept} kept from an earlier run) of {images} images to "
              f"{escape(str(result.out))}", highlight=False)


@data_app.command("index")
def data_index(
    shards_dir: Annotated[Path, typer.Argument(help="A shards folder: classes.txt and {train,test}/*.tar.")],
) -> None:
    """Write index.json beside WebDataset shards: every sample's shard, offset, length and label, and each shard's
    sha256. Served with the shards over HTTP(S), it lets a recipe read them by range requests
    ([data] root = "https://host/FOLDER"). `kdforge data shard` writes it too; this is for shards made elsewhere.

    Example:  kdforge data index data/photos-shards
    """
    from kdforge.data.shards import write_index

    with user_errors():
        path = write_index(shards_dir)
    out.print(f"wrote {escape(str(path))}", highlight=False)


@contextlib.contextmanager
def user_errors(interrupted: str = RESUMABLE) -> Iterator[None]:
    """The CLI's one error boundary: library errors (every KdforgeError: recipes, data, checkpoints, exports,
    serving, images) and the operating-system failures a user can act on (a full disk, a read-only folder,
    permissions, quotas, open-file limits: `describe_os_error`) become `error:` lines and an exit code, never a
    traceback; Ctrl-C prints `interrupted` and exits 130. Files are written atomically, so a failed write leaves
    nothing half-written that a later command would trust."""
    try:
        yield
    except KdforgeError as exc:
        _error_lines(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        line = describe_os_error(exc)
        if line is None:
            raise
        _error_lines(line)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print(interrupted)
        raise typer.Exit(130) from None


def warn(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


def _error_lines(message: str) -> None:
    for line in message.splitlines():
        line = shorten(line, LONGEST_LINE)
        err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"kdforge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """kdforge: train a teacher, distill it into a compact student, export and verify it.

    Start with:  kdforge teacher recipes/quickstart.toml
    """


def _train(stage: str, recipe_path: Path, overrides, resume, overwrite, device, runs_dir, nproc=1, nnodes=1,
           rdzv_endpoint=None) -> None:
    from kdforge.recipe import load_recipe
    from kdforge.runtime import distributed_session
    from kdforge.train.stages import train_stage

    with user_errors():
        recipe = load_recipe(recipe_path, overrides or [])
    if nproc > 1 or nnodes > 1:
        _launch_torchrun(nproc, [stage, *_common_args(recipe_path, overrides, resume, device, runs_dir),
                                 *(["--overwrite"] if overwrite else [])], recipe, nnodes, rdzv_endpoint,
                         recipe_path.stem)
    with user_errors(), distributed_session():
        result = train_stage(recipe, stage, runs_dir=runs_dir, resume=resume, overwrite=overwrite, device=device)
        main = _is_main()
    if not main:
        return
    if result.skipped:
        out.print(f"{stage} already trained with these settings in {result.stage_dir} (use --overwrite to retrain)")
    out.print(
        f"{stage} {result.model}: test top-1 {result.top1:.2%}, top-5 {result.top5:.2%} "
        f"(best epoch {result.best_epoch}: {result.best_top1:.2%}), {result.params / 1e6:.2f}M params, "
        f"{result.steps} steps, {result.train_images_per_s:.0f} img/s -> {result.stage_dir}",
        highlight=False,
    )


@app.command()
def teacher(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
            device: DeviceOpt = None, runs_dir: RunsDirOpt = Path("runs"), nproc: NprocOpt = 1,
            nnodes: NnodesOpt = 1, rdzv_endpoint: RdzvOpt = None) -> None:
    """Train the teacher model of a recipe (its \\[teacher] section).

    Example:  kdforge teacher recipes/quickstart.toml --set train.epochs=2
    """
    _train("teacher", recipe, set_, resume, overwrite, device, runs_dir, nproc, nnodes, rdzv_endpoint)


@app.command("teacher-cache")
def teacher_cache(recipe: RecipeArg, set_: SetOpt = None, device: DeviceOpt = None,
                  runs_dir: RunsDirOpt = Path("runs"), nproc: NprocOpt = 1, nnodes: NnodesOpt = 1,
                  rdzv_endpoint: RdzvOpt = None) -> None:
    """Store the trained teacher's answers ahead of distillation (\\[distill.teacher_cache]).

    The one file runs/NAME/teacher_cache.safetensors, or with distill.teacher_cache.store = DIR the sharded store
    DIR/KEY/, built by every process of --nproc/--nnodes (each its shards) and reused by any run with the same key.

    Example:  kdforge teacher-cache recipes/quickstart.toml --set distill.teacher_cache.views=4 \\
                  --set distill.teacher_cache.store=/data/teacher-stores --nproc 2
    """
    from kdforge.recipe import load_recipe
    from kdforge.runtime import distributed_session
    from kdforge.train.events import ProgressDisplay
    from kdforge.train.stages import build_teacher_cache

    with user_errors():
        loaded = load_recipe(recipe, set_ or [])
    if nproc > 1 or nnodes > 1:
        _launch_torchrun(nproc, ["teacher-cache", *_common_args(recipe, set_, False, device, runs_dir)], loaded,
                         nnodes, rdzv_endpoint, recipe.stem)
    with user_errors(), distributed_session():
        main = _is_main()
        cache, where = build_teacher_cache(loaded, runs_dir, device, [ProgressDisplay()] if main else [])
    if main:
        out.print(f"teacher answers for {cache.num_images} training images x {cache.views} view(s) in {where}",
                  highlight=False)


@app.command()
def baseline(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             device: DeviceOpt = None, runs_dir: RunsDirOpt = Path("runs"), nproc: NprocOpt = 1,
             nnodes: NnodesOpt = 1, rdzv_endpoint: RdzvOpt = None) -> None:
    """Train the student model of a recipe (its \\[student] section) on labels alone, without a teacher.

    This is the baseline that distillation must beat.

    Example:  kdforge baseline recipes/quickstart.toml
    """
    _train("baseline", recipe, set_, resume, overwrite, device, runs_dir, nproc, nnodes, rdzv_endpoint)


@app.command()
def distill(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False, device: DeviceOpt = None,
            runs_dir: RunsDirOpt = Path("runs"), seeds: SeedsOpt = None, nproc: NprocOpt = 1, nnodes: NnodesOpt = 1,
            rdzv_endpoint: RdzvOpt = None) -> None:
    """Run the recipe's chain: teacher, baseline student, distilled student, and the stages it enables.

    Finished stages whose settings match the recipe are reused; changed ones are redone. Ends with a summary
    table, also written to runs/NAME/summary.json, and a report in runs/NAME/report/. With --nproc N every
    training stage runs on N processes (the same as `torchrun --nproc-per-node N -m kdforge distill ...`); add
    --nnodes M --rdzv-endpoint HOST:PORT and run the same command on each of M machines to train on all of them.

    With --seeds 0,1,2 the chain runs once per seed (runs/NAME-seedS/; one teacher for all seeds unless
    experiment.share_teacher = false) and ends with mean +- sd per model and whether the gain is significant
    (runs/NAME/seeds.json, runs/NAME/report/seeds.md).

    Example:  kdforge distill recipes/quickstart.toml
              kdforge distill recipes/quickstart.toml --seeds 0,1,2
              kdforge distill recipes/vit_to_vit.toml --nproc 8
              kdforge distill recipes/vit_to_vit.toml --nproc 8 --nnodes 2 --rdzv-endpoint node0:29400   # on both
    """
    from kdforge.plan import describe_plan
    from kdforge.recipe import load_recipe

    if seeds is not None:
        set_ = [*(set_ or []), f"experiment.seeds=[{_parse_seeds(seeds)}]"]
    with user_errors():  # the recipe is checked and the plan said before torch is imported (about 3 s)
        loaded = load_recipe(recipe, set_ or [])
    if nproc > 1 or nnodes > 1:
        _launch_torchrun(nproc, ["distill", *_common_args(recipe, set_, resume, device, runs_dir)], loaded, nnodes,
                         rdzv_endpoint, recipe.stem)
    with user_errors():
        plan_shown = os.environ.get("RANK", "0") == "0"  # torchrun's rank of this process, read before torch
        if plan_shown:
            out.print(describe_plan(loaded), highlight=False, soft_wrap=True)
    from kdforge.estimate import minutes
    from kdforge.runtime import describe_machine, distributed_session
    from kdforge.seeds import run_recipe

    with user_errors(), distributed_session():
        main = _is_main()
        summary = run_recipe(loaded, runs_dir=runs_dir, resume=resume, device=device, plan_shown=plan_shown)
    if not main:
        return
    if loaded.experiment.seeds:
        over_seeds = summary
        out.print(seeds_table(over_seeds))
        out.print(f"{over_seeds.verdict} -> {runs_dir / loaded.name / SEEDS}, report: {over_seeds.report}",
                  highlight=False)
        _exit_if_failed(over_seeds.failures)
        return
    out.print(summary_table(summary))
    if summary.val_images:
        out.print(f"(test split; the validation split, {summary.val_images} images held out of the training split, "
                  f"chose each stage's best checkpoint and judged INT8's held-out checks)", highlight=False)
    if summary.exports:
        out.print(exports_table(summary.exports))
        _print_int8_steps(summary.exports)
    gain = f"{summary.gain_top1 * 100:+.2f} points top-1 over the baseline, " if summary.gain_top1 is not None else ""
    out.print(f"distillation: {gain}{summary.compression:.1f}x fewer parameters than the teacher "
              f"-> {runs_dir / summary.recipe / SUMMARY}, report: {summary.report}", highlight=False)
    out.print(f"took {minutes(summary.wall_s)} on {describe_machine(summary.machine)}", highlight=False)
    _exit_if_failed(summary.failures)
    _exit_if_unavailable(summary.unavailable)


def _parse_seeds(text: str) -> str:
    try:
        return ", ".join(str(int(part)) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}") from None


def seeds_table(summary):
    from rich.table import Table

    from kdforge.seeds import ROLES

    table = Table(title=f"{summary.recipe}: test top-1 over {len(summary.seeds)} seeds")
    for column in ("seed", "teacher", "baseline", "distilled", "gain (points)"):
        table.add_column(column, justify="right")
    for row in summary.per_seed:
        table.add_row(str(row["seed"]), *(f"{row[role]:.2f}%" for role in ROLES), f"{row['gain']:+.2f}")
    stats, gain = summary.stats, summary.gain
    table.add_row("mean +- sd", *(f"{stats[role]['mean']:.2f} +- {stats[role]['sd']:.2f}" for role in ROLES),
                  f"{gain['mean']:+.2f} +- {gain['sd']:.2f}")
    return table


def _exit_if_failed(failures: dict[str, str]) -> None:
    """One `error:` line per artifact that failed verification (after the summary was printed and written)."""
    from kdforge.errors import VerificationError

    for message in failures.values():
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(VerificationError.exit_code)


def summary_table(summary):
    from rich.table import Table

    table = Table(title=f"{summary.recipe}: test accuracy")
    for column in ("role", "model", "params", "top-1", "top-5", "input"):
        table.add_column(column, justify="left" if column in ("role", "model") else "right")
    rows = [("teacher", summary.teacher), ("baseline", summary.baseline), ("distilled", summary.student)]
    for role, row in rows:
        if row is not None:
            table.add_row(role, row["model"], f"{row['params'] / 1e6:.2f}M", f"{row['top1']:.2%}",
                          f"{row['top5']:.2%}", str(row["input_size"]))
    return table


def exports_table(rows):
    from rich.table import Table

    table = Table(title="exported vs PyTorch student, test split")
    for column in ("format", "PyTorch top-1", "exported top-1", "agreement", "max |Δlogit|", "result"):
        table.add_column(column, justify="left" if column in ("format", "result") else "right")
    for name, row in rows.items():
        if row["verified"]:
            table.add_row(name, f"{row['pytorch_top1']:.2%}", f"{row['exported_top1']:.2%}", f"{row['agreement']:.2%}",
                          f"{row['max_abs_diff']:.1e}", "PASS" if row["passed"] else "FAIL")
        else:
            table.add_row(name, "-", "-", "-", "-", "not verified")
    return table


def _print_int8_steps(rows) -> None:
    """When an INT8 format needed more than its first step: what each step measured and which one produced the
    shipped file."""
    for name, row in rows.items():
        steps = row.get("int8_steps", [])
        if len(steps) < 2:
            continue
        for step in steps:
            out.print(f"{name} step {step['step']}: top-1 {step['top1_delta_points']:+.2f} points ({step['lost']} "
                      f"images lost, {step['gained']} gained, McNemar p = {step['mcnemar_p']:.2g}), agreement "
                      f"{step['agreement']:.2%}: {'PASS' if step['passed'] else 'FAIL'}", highlight=False)
        shipped = steps[-1]
        out.print(f"{name}: {'shipped the' if shipped['passed'] else 'no step passed; kept the last,'} "
                  f"{shipped['step']} file", highlight=False)


@app.command()
def export(
    target: Annotated[Path | None, typer.Argument(
        help="A run (runs/NAME), a stage folder or a recipe file; default: the most recent run.",
        show_default=False)] = None,
    formats: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help=f"Format to write (repeatable): {', '.join(FORMATS)}; default: the recipe's "
        "export.formats, else onnx.", show_default=False)] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (>= 17); default: the recipe's export.opset.",
                                                 show_default=False, min=17)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="The FP16 ONNX (with --trt: an FP16 TensorRT engine).")]
    = False,
    int8: Annotated[bool, typer.Option("--int8", help="The INT8 ONNX (with --trt: an INT8 TensorRT engine).")]
    = False,
    trt: Annotated[bool, typer.Option("--trt", help="Build TensorRT engines on this GPU (FP16 unless --int8).")]
    = False,
    int8_target: Annotated[str | None, typer.Option(
        "--target", help="INT8 target: cpu (uint8 activations) or tensorrt (symmetric int8); default: the recipe's.",
        show_default=False)] = None,
    calibration: Annotated[int | None, typer.Option(
        help="INT8 calibration images from the training split; default: the recipe's (512).", min=1,
        show_default=False)] = None,
    method: Annotated[str | None, typer.Option(
        help="INT8 calibration method: minmax, entropy or percentile; default: the recipe's.",
        show_default=False)] = None,
    max_batch: Annotated[int | None, typer.Option(
        help="TensorRT: largest batch of the engine's profile; default: the recipe's (256).", min=1,
        show_default=False)] = None,
    workspace_mb: Annotated[int | None, typer.Option(
        help="TensorRT: builder workspace limit in MB; default: TensorRT's.", min=1, show_default=False)] = None,
    timing_cache: Annotated[str | None, typer.Option(
        help="TensorRT: timing cache file, reused and updated by each build.", show_default=False)] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify each artifact on the test split.")]
    = True,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Exports folder; default: the recipe's export.dir.",
                                                    show_default=False)] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    device: DeviceOpt = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override an export setting of the run's recipe ([export], [quantize], [verify]), e.g. "
        "--set quantize.max_top1_drop=0.5 (repeatable).", show_default=False)] = None,
    bundle: Annotated[bool, typer.Option("--bundle", help="Then write the device bundle of the export (see "
                                         "`kdforge bundle`) to bundles/NAME and bundles/NAME.tar.")] = False,
    bundle_images: Annotated[int, typer.Option(help="Test images in the bundle (stratified by class).", min=1)]
    = 1000,
) -> None:
    """Export a trained student (the distilled one, else the baseline) and verify it against PyTorch.

    Artifacts go to exports/NAME/ (student.onnx, student.fp16.onnx, student.int8.onnx, student.fp16.engine,
    metadata.json, verify.json). A format made from another brings it along: --trt exports and verifies the
    FP32 and FP16 ONNX first. A failed verification exits 1 and says by how much; an engine this machine cannot
    build (no TensorRT or no GPU) exits 3 after everything else is done.

    When the INT8 file fails verification, the remedies of quantize.escalate are tried (accuracy-aware INT8,
    then quantization-aware distillation, by default) and the first that passes is shipped; every step is printed
    and recorded in metadata.json. --set quantize.mode=qad makes the INT8 file by QAD from the start.

    Examples:  kdforge export runs/quickstart --format onnx
               kdforge export runs/quickstart --int8 --target cpu --calibration 512 --method entropy
               kdforge export runs/quickstart --int8 --set quantize.max_top1_drop=0.5
               kdforge export runs/quickstart --int8 --set quantize.mode=qad --set quantize.qad_epochs=2
               kdforge export --trt --int8
    """
    from kdforge.export.artifacts import export_target, requested_formats
    from kdforge.train.events import ProgressDisplay

    with user_errors():
        result = export_target(target, runs_dir, requested_formats(formats, fp16, int8, trt), overrides=set_ or [],
                               opset=opset, exports_dir=out_dir, verify=verify, device=device,
                               quantize={"target": int8_target, "calibration": calibration, "method": method},
                               tensorrt={"max_batch": max_batch, "workspace_mb": workspace_mb,
                                         "timing_cache": timing_cache},
                               consumers=[ProgressDisplay()])
    _print_export(result)
    _exit_if_failed(result.failures)
    if bundle:
        _make_bundle(result.export_dir, Path("bundles") / result.export_dir.name, bundle_images, None)
    _exit_if_unavailable(result.unavailable)


def _make_bundle(export_dir: Path, folder: Path, images: int, formats: list[str] | None) -> None:
    from kdforge.bundle import make_bundle
    from kdforge.train.events import ProgressDisplay

    with user_errors():
        result = make_bundle(export_dir, folder, images, formats, consumers=[ProgressDisplay()])
    for name, why in result.skipped.items():
        err.print(f"note: {name} not bundled: {escape(why)}", highlight=False, soft_wrap=True)
    out.print(f"bundle: {result.images} test images, {', '.join(result.formats)} -> {result.folder} and {result.tar} "
              f"({result.bytes / 1e6:.1f} MB)", highlight=False)
    out.print(f"on the device: python -m kdforge.serve.probe {result.tar.name} --verify; then here: kdforge verify "
              f"{export_dir} --device-report device-report.json", highlight=False)


@app.command("bundle")
def bundle_command(
    export_dir: Annotated[Path, typer.Argument(help="An export folder, e.g. exports/quickstart.", show_default=False)],
    images: Annotated[int, typer.Option("--images", help="Test images in the bundle (stratified by class).", min=1)]
    = 1000,
    formats: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="Format to bundle (repeatable); default: every verified format a device runs without "
        "torch (ONNX, OpenVINO, LiteRT, NCNN).", show_default=False)] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="The bundle folder (its .tar beside it); default: "
                                                 "bundles/NAME.", show_default=False)] = None,
) -> None:
    """Write a device bundle: the export's servable files, test images with their labels, the PyTorch student's
    logits on them, the host's run of each file and the [verify] tolerances, as a folder and a .tar (torch-free).

    Copy the .tar to the device and run the probe there; it judges each file with the arithmetic of `kdforge
    verify` and writes device-report.json, which `kdforge verify --device-report`, `kdforge serve --device-report`
    and `kdforge students --device-profile` read back.

    Example:  kdforge bundle exports/quickstart --images 1000
              python -m kdforge.serve.probe quickstart.tar --verify --seconds 60     (on the device)
    """
    _make_bundle(export_dir, out_dir or Path("bundles") / export_dir.resolve().name, images, formats)


def _print_export(result) -> None:
    """The export's notes, one line per file made, the verification table and the INT8 steps."""
    from kdforge.pipeline import export_rows

    for note in result.notes:
        err.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    rows = export_rows(result)
    for name, row in rows.items():
        out.print(f"exported {name} in {row['export_s']:.1f} s ({row['bytes'] / 1e6:.2f} MB) -> {row['artifact']}",
                  highlight=False)
    if result.quantization and result.quantization.float_nodes:
        kept = ", ".join(f"{n['node']} ({n['sensitivity_points']:+.2f})" for n in result.quantization.float_nodes)
        out.print(f"int8: kept in float (top-1 drop in points when quantized alone): {kept}", highlight=False)
    out.print(exports_table(rows))
    _print_int8_steps(rows)


def _exit_if_unavailable(unavailable: dict[str, str]) -> None:
    """One line per reason for the formats this machine could not make, then exit 3."""
    from kdforge.errors import UnavailableError

    reasons: dict[str, list[str]] = {}
    for name, reason in unavailable.items():
        reasons.setdefault(reason, []).append(name)
    for reason, names in reasons.items():
        err.print(f"[red]error:[/red] {escape(', '.join(names))} not built: {escape(reason)}", highlight=False,
                  soft_wrap=True)
    if unavailable:
        raise typer.Exit(UnavailableError.exit_code)


@app.command()
def verify(
    target: Annotated[Path | None, typer.Argument(
        help="An artifact (exports/NAME/student.onnx) or export folder; default: the most recent export.",
        show_default=False)] = None,
    exports_dir: Annotated[Path, typer.Option("--exports-dir", help="Where to look for the most recent export.")]
    = Path("exports"),
    device: DeviceOpt = None,
    device_report: Annotated[Path | None, typer.Option(
        help="Record the verdicts of a device-report.json (from `python -m kdforge.serve.probe BUNDLE --verify` on "
             "the device) in verify.json beside this machine's, instead of verifying here.", show_default=False)]
    = None,
) -> None:
    """Verify exported artifacts against the PyTorch student on the test split; writes verify.json.

    Exits non-zero when an artifact is outside the recipe's [verify] tolerance (with --device-report: when a
    file failed on that device).

    Example:  kdforge verify exports/quickstart/student.onnx
              kdforge verify exports/quickstart --device-report device-report.json
    """
    from kdforge.locate import resolve_export_dir

    with user_errors():
        export_dir, fmt = resolve_export_dir(target, exports_dir)
        if target is None:
            err.print(f"verifying the most recent export: {export_dir}", highlight=False)
        if device_report is not None:
            _import_device_report(export_dir, device_report)
            return
        from kdforge.verify import verify_formats

        notes: list[str] = []  # a read-only export folder: verified all the same, verify.json not updated
        reports = verify_formats(export_dir, [fmt] if fmt else None, device=device, notes=notes)
    out.print(exports_table({name: {"artifact": str(export_dir / name), **report.row()}
                             for name, report in reports.items()}))
    warn(notes)


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _import_device_report(export_dir: Path, report_path: Path) -> None:
    """`kdforge verify --device-report`: the device's verdicts into verify.json, a table, exit 1 if one failed."""
    from rich.table import Table

    from kdforge.device import device_name, import_device_report, read_device_report

    report = read_device_report(report_path)
    recorded, ignored = import_device_report(export_dir, report)
    table = Table(title=f"{export_dir} on {device_name(report)}")
    for column in ("format", "top-1 there", "PyTorch", "agreement", "max |Δ|", "changed vs host", "p95 ms",
                   "MB", "verdict"):
        table.add_column(column, justify="left" if column in ("format", "verdict") else "right",
                         no_wrap=column in ("format", "verdict"))
    for name, record in recorded.items():
        cells = [_cell(record.get(key), spec) for key, spec in (
            ("candidate_top1", ".2%"), ("reference_top1", ".2%"), ("agreement", ".2%"), ("max_abs_diff", ".2e"),
            ("top1_changed_vs_host", "d"), ("latency_sustained_p95_ms", ".2f"), ("memory_mb", ".0f"))]
        table.add_row(name, *cells, "PASS" if record["passed"] else "[red]FAILED[/red]")
    out.print(table)
    for file, why in ignored.items():
        err.print(f"note: {escape(file)} not recorded: {escape(why)}", highlight=False, soft_wrap=True)
    if not recorded:
        raise KdforgeError(f"{report_path} judged no file of {export_dir}: bundle this export (`kdforge bundle "
                           f"{export_dir}`) and probe it on the device")
    from kdforge.card import write_model_card

    write_model_card(export_dir)  # the card's device verdicts
    out.print(f"-> {export_dir / 'verify.json'} (devices)", highlight=False)
    failed = {name: record for name, record in recorded.items() if not record["passed"]}
    for name, record in failed.items():
        _error_lines(f"{name} FAILED on {device_name(report)}: {'; '.join(record['failures'])}")
    if failed:
        raise typer.Exit(1)


@app.command()
def probe(
    bundle: Annotated[Path, typer.Argument(help="A device bundle's .tar (kdforge bundle), or its folder without "
                                          "--ssh.", show_default=False)],
    ssh: Annotated[str | None, typer.Option("--ssh", metavar="USER@HOST", help="Run the probe on this device over "
                                            "SSH (scp and ssh of this system; keys, never a password prompt).",
                                            show_default=False)] = None,
    image: Annotated[str | None, typer.Option(help="Run the probe there inside this serving image (podman or "
                                              "docker); default: the probe installed there.",
                                              show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="SSH port.", min=1, max=65535, show_default=False)] = None,
    ssh_option: Annotated[list[str] | None, typer.Option(
        "--ssh-option", "-o", help="An ssh option for ssh and scp, e.g. -o IdentityFile=~/.ssh/board (repeatable).",
        show_default=False)] = None,
    python: Annotated[str, typer.Option(help="The Python there that has kdforge[serve,...] installed.")]
    = "python3",
    seconds: Annotated[float, typer.Option(help="Sustained timing per file, in seconds.", min=0.1)] = 60,
    precision: Annotated[str, typer.Option(help="fp32 (kdforge's verified settings), default (the runtime's own "
                                           "on that CPU) or both.")] = "fp32",
    device_name: Annotated[str | None, typer.Option(help="How the report names the device (default: its host "
                                                    "name).", show_default=False)] = None,
    export: Annotated[Path | None, typer.Option(help="The export folder to record the verdicts in (default: the "
                                                "one the bundle was made from, when it is here).",
                                                show_default=False)] = None,
    output: Annotated[Path, typer.Option(help="Where the device report is written here.")]
    = Path("device-report.json"),
) -> None:
    """Verify a device bundle on a device: copy it there over SSH, run the torch-free probe (judged as `kdforge
    verify` judges, timed sustained), bring device-report.json back and record it in the export's verify.json.
    Without --ssh it runs the probe on this machine. Exits 1 when a file failed on the device.

    Example:  kdforge probe bundles/quickstart.tar --ssh pi@raspberrypi.local --seconds 60
              kdforge probe bundles/quickstart.tar --ssh pi@board --image ghcr.io/me/kdforge-serve:arm64
    """
    from kdforge import device

    if precision not in ("fp32", "default", "both"):
        _error_lines(f"--precision must be fp32, default or both, not {precision!r}")
        raise typer.Exit(2)
    with user_errors():
        if ssh is None:
            from kdforge.serve.probe import main as probe_main

            args = [str(bundle), "--verify", "--seconds", f"{seconds:g}", "--precision", precision, "--output",
                    str(output), *(["--device-name", device_name] if device_name else [])]
            try:
                probe_main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
                if not output.is_file() or isinstance(exc.code, str):
                    raise
        else:
            from kdforge.remote import probe_over_ssh

            _, code = probe_over_ssh(bundle, ssh, output, seconds, precision, image, port, ssh_option or [], python,
                                     device_name)
        report = device.read_device_report(output)
        out.print(f"device report: {output} ({device.device_name(report)})", highlight=False)
        target = export
        if target is None:
            with device.open_bundle(bundle) as opened:
                made_from = Path(opened.manifest.get("export", ""))
            target = made_from if (made_from / "metadata.json").is_file() else None
        if target is not None:
            _import_device_report(target, report_path=output)
        elif code:
            raise typer.Exit(code)


@app.command()
def bench(
    target: Annotated[Path | None, typer.Argument(
        help="An export folder (exports/NAME) or a run (runs/NAME); default: the most recent export.",
        show_default=False)] = None,
    formats: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="Format to measure (repeatable): pytorch or one in the export; default: all.",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size for throughput (latency is at batch 1).", min=1)] = 64,
    repeats: Annotated[int, typer.Option(help="Timed batch-1 calls per format.", min=1)] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.", min=0)] = 5,
    threads: Annotated[int, typer.Option(help="CPU threads for PyTorch and ONNX Runtime.", min=1)] = 2,
    exports_dir: Annotated[Path, typer.Option("--exports-dir", help="Where to look for the most recent export.")]
    = Path("exports"),
    device: DeviceOpt = None,
) -> None:
    """Measure every format of an export: size, latency p50/p95 at batch 1, images/s at a larger batch, with
    the test top-1 from verification. Prints a table and writes bench.json in the export folder.

    Example:  kdforge bench exports/quickstart --threads 2 --batch-size 64
    """
    from kdforge.bench import BenchSettings, bench_export
    from kdforge.locate import resolve_bench_dir

    with user_errors():
        export_dir = resolve_bench_dir(target, exports_dir)
        settings = BenchSettings(batch_size, repeats, warmup, threads, tuple(formats) if formats else None, device)
        with err.status("benchmarking") as status:
            notes: list[str] = []  # a read-only export folder: measured all the same, bench.json not updated
            result = bench_export(export_dir, settings,
                                  consumers=[on_notes(lambda name: status.update(f"benchmarking {name}"))],
                                  notes=notes)
    out.print(bench_table(result))
    for name, why in result.skipped.items():
        err.print(f"note: {name} not measured: {escape(why)}", highlight=False, soft_wrap=True)
    if notes:
        warn(notes)
    else:
        out.print(f"-> {export_dir / BENCH}", highlight=False)


def bench_table(result):
    from rich.table import Table

    table = Table(title=f"{result.export_dir}: {result.settings['threads']} threads, "
                        f"throughput at batch {result.settings['batch_size']}")
    for column in ("format", "runtime", "size MB", "p50 ms", "p95 ms", "images/s", "test top-1", "agreement",
                   "verified"):
        table.add_column(column, justify="left" if column in ("format", "runtime", "verified") else "right",
                         no_wrap=column in ("format", "verified"))  # narrow terminals wrap the other columns
    for row in result.rows:
        verified = ("reference" if row.format == "pytorch" else "not verified" if row.verified is None
                    else "PASS" if row.verified else "[red]FAILED[/red]")
        table.add_row(row.format, row.runtime, f"{row.bytes / 1e6:.2f}", f"{row.latency_p50_ms:.2f}",
                      f"{row.latency_p95_ms:.2f}", f"{row.throughput:.0f}",
                      "-" if row.top1 is None else f"{row.top1:.2%}",
                      "-" if row.agreement is None else f"{row.agreement:.2%}", verified)
    return table


@app.command()
def students(
    recipe: RecipeArg,
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="The format the student ships as (default: "
                                            "\\[student.search] format, else onnx).", show_default=False)] = None,
    budget_ms: Annotated[float | None, typer.Option("--budget-ms", help="p50 latency per call the student must "
                                                    "meet (default: \\[student.search] budget_ms).",
                                                    show_default=False)] = None,
    batch: Annotated[int | None, typer.Option(help="Images per call (default 1).", min=1, show_default=False)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads of the runtime while timing (default 2).", min=1,
                                                show_default=False)] = None,
    candidates: Annotated[str | None, typer.Option(
        metavar="A,B,...", help="timm models to compare (default: \\[student.search] candidates, else the curated "
        "edge list).", show_default=False)] = None,
    race_steps: Annotated[int | None, typer.Option(help="Steps of the race's first round (default 100).", min=1,
                                                   show_default=False)] = None,
    sizes: Annotated[str | None, typer.Option(
        metavar="S,S,...", help="Input sizes to build and time every candidate at: each (model, size) competes "
        "(default: \\[student.search] sizes, else the student's input size).", show_default=False)] = None,
    device_profile: Annotated[Path | None, typer.Option(
        help="latency.json from `python -m kdforge.serve.probe` on the device (or its device-report.json): rank by "
             "its timings, the budget on its sustained p95 where it timed them sustained; files that failed there "
             "are dropped.", show_default=False)] = None,
    max_memory_mb: Annotated[float | None, typer.Option(
        help="Memory a candidate's session may add on the device, as the device profile measured it (default: "
             "\\[student.search] max_memory_mb).", min=0, show_default=False)] = None,
    race: Annotated[bool, typer.Option("--race/--no-race", help="Race the candidates within budget on the "
                                       "validation split (distils from the recipe's teacher).")] = True,
    write_recipe: Annotated[Path | None, typer.Option(help="Write the recipe with the winner as its student here.",
                                                      show_default=False)] = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Which student fits a latency budget: export each candidate to the format, time it here (or read a device's
    timings), then race the ones within budget on the validation split. Prints the table sorted by latency and
    writes runs/NAME/students/students.json; `\\[student] model = "auto"` in a recipe runs the same search inside
    `kdforge distill`.

    Example:  kdforge students recipes/quickstart.toml --format int8 --budget-ms 2
              kdforge students recipes/quickstart.toml --budget-ms 2 --candidates resnet10t,mobilenetv3_small_050
              kdforge students recipes/quickstart.toml --budget-ms 2 --sizes 24,32
    """
    from kdforge.recipe import load_recipe
    from kdforge.students import choose_student, no_fit_message, search_settings

    with user_errors():
        loaded = load_recipe(recipe, set_ or [])
        names = [name.strip() for name in candidates.split(",") if name.strip()] if candidates is not None else None
        sized = [part.strip() for part in sizes.split(",") if part.strip()] if sizes is not None else None
        settings = search_settings(loaded, format=fmt, budget_ms=budget_ms, batch=batch, threads=threads,
                                   candidates=names, race_steps=race_steps, sizes=sized,
                                   device_profile=str(device_profile) if device_profile else None,
                                   max_memory_mb=max_memory_mb)
        result = choose_student(loaded, settings, runs_dir, race, write_recipe, device)
    out.print(candidates_table(result))
    for model, why in result.skipped.items():
        err.print(f"note: {model} not compared: {escape(why)}", highlight=False, soft_wrap=True)
    for entry in result.race:
        ranked = sorted(entry["val_top1"].items(), key=lambda kv: -kv[1])
        out.print(f"race round {entry['round']} ({entry['steps']} steps, validation top-1): " + ", ".join(
            f"{model} {top1:.2%}{'' if model in entry['kept'] else ' (out)'}" for model, top1 in ranked),
            highlight=False)
    record = runs_dir / loaded.name / "students" / "students.json"
    if result.winner is None:
        _error_lines(no_fit_message(result))
        out.print(f"-> {record}", highlight=False)
        raise typer.Exit(1)
    out.print(f"chosen: {result.winner['model']} (p50 {result.winner['latency_p50_ms']:.2f} ms within "
              f"{settings.budget_ms:g} ms) -> {record}", highlight=False)
    if write_recipe is not None:
        out.print(f"recipe with this student: {write_recipe} (kdforge distill {write_recipe})", highlight=False)


def candidates_table(result):
    from rich.table import Table

    where = result.rows[0]["measured_on"] if result.rows else "here"
    sustained = bool(result.rows) and result.rows[0].get("sustained")
    on = "the sustained p95" if sustained else "p50"
    sizes = sorted({row.get("input_size") or result.input_size for row in result.rows}) or [result.input_size]
    table = Table(title=f"candidates at {', '.join(f'{s}x{s}' for s in sizes)}: {result.settings['format']}, batch "
                        f"{result.settings['batch']}, timed {where}{' sustained' if sustained else ''}; budget "
                        f"{result.settings['budget_ms']:g} ms on {on}")
    for column in ("model", "params M", "MMACs", "size MB", "p50 ms", "p95 ms", "budget", "race val top-1"):
        table.add_column(column, justify="left" if column in ("model", "budget") else "right", no_wrap=True)
    reached = {}
    for entry in result.race:  # each candidate's score in the last round it ran
        reached.update(entry["val_top1"])
    chosen = (result.winner or {}).get("name") or (result.winner or {}).get("model")
    for row in result.rows:
        name = row.get("name") or row["model"]  # "model@size" when the search had several sizes
        mark = "[bold green]chosen[/bold green]" if name == chosen else "fits" if row["fits"] else "over"
        table.add_row(escape(name), f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e6:.1f}",
                      f"{row['bytes'] / 1e6:.2f}", f"{row['latency_p50_ms']:.2f}", f"{row['latency_p95_ms']:.2f}",
                      mark, f"{reached[name]:.2%}" if name in reached else "-")
    return table


@app.command()
def report(
    run: Annotated[Path | None, typer.Argument(
        help="A run (runs/NAME) or its recipe file; default: the most recent run.", show_default=False)] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Write runs/NAME/report/report.md and report.html: the summary, training curves, size per format and,
    after `kdforge bench`, accuracy against latency (PNG plots beside them). `kdforge distill` writes it too.

    Example:  kdforge report runs/quickstart
    """
    from kdforge.locate import resolve_run_dir
    from kdforge.report import write_report

    with user_errors():
        paths = write_report(resolve_run_dir(run, runs_dir))
    out.print(f"report: {paths.markdown} and {paths.html} ({len(paths.plots)} plots)", highlight=False)


@app.command()
def publish(
    export_dir: Annotated[Path, typer.Argument(help="An export folder, e.g. exports/quickstart.", show_default=False)],
    repo: Annotated[str, typer.Option(help="The Hugging Face model repository: ORG/NAME (created if missing).",
                                      show_default=False)],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; upload nothing.")] = False,
) -> None:
    """Publish a verified export to the Hugging Face Hub in one commit: its model card (README.md, written again
    from the export's files), metadata.json, verify.json, bench.json, each file that passed verification and the
    run's recipe; never a file that did not pass, never the runs folder. The token: `hf auth login` or $HF_TOKEN.

    Example:  kdforge publish exports/quickstart --repo my-org/quickstart-student --dry-run
    """
    from kdforge.card import check_repo, publish_files, write_model_card
    from kdforge.card import publish as upload

    with user_errors():
        check_repo(repo)
        if dry_run:
            write_model_card(export_dir)
            for name, path in publish_files(export_dir).items():
                out.print(f"{name}  <-  {path}", highlight=False, soft_wrap=True)
            return
        url = upload(export_dir, repo, private=private)
    out.print(f"published {export_dir} to {url}", highlight=False)


@app.command()
def serve(
    export_dir: Annotated[Path, typer.Argument(help="An export folder, e.g. exports/quickstart.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 listens on every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)]
    = "auto",
    max_bytes: Annotated[int, typer.Option(help="Largest request body accepted, in bytes.", min=1)]
    = DEFAULT_MAX_BYTES,
    max_pixels: Annotated[int, typer.Option(help="Largest image decoded, in pixels (JPEGs count after the "
                                                 "decoder's 1/2-1/8 reduction).", min=1)] = 4096 * 4096,
    top_k: Annotated[int, typer.Option(help="Classes returned per image.", min=1)] = 5,
    api_key_file: Annotated[Path | None, typer.Option(
        help="A file whose first line is the key every request but /healthz must send (Authorization: Bearer KEY "
             "or X-API-Key: KEY).", envvar="KDFORGE_API_KEY_FILE")] = None,
    body_timeout: Annotated[float, typer.Option(
        help="Seconds a request body may take to arrive; a slower one gets 408.", min=0.001)]
    = DEFAULT_BODY_TIMEOUT_S,
    max_connections: Annotated[int, typer.Option(
        help="Connections served at once (idle keep-alive ones count); beyond it the server answers 503.",
        min=1)] = DEFAULT_MAX_CONNECTIONS,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a request's headers may take to arrive after connecting or after the last answer; a slower "
             "connection is closed.", min=0.001)] = DEFAULT_HEADER_TIMEOUT_S,
    ssl_certfile: Annotated[Path | None, typer.Option(
        help="Serve HTTPS with this certificate (PEM).", envvar="KDFORGE_SSL_CERTFILE")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(
        help="The certificate's private key (PEM, unencrypted).", envvar="KDFORGE_SSL_KEYFILE")] = None,
    device_report: Annotated[Path | None, typer.Option(
        help="Serve only a format that passed on the device of this device-report.json (`python -m "
             "kdforge.serve.probe BUNDLE --verify` there).", envvar="KDFORGE_DEVICE_REPORT")] = None,
) -> None:
    """Serve an exported student over HTTP (or HTTPS with --ssl-certfile/--ssl-keyfile): POST /predict,
    /predict/batch; GET /healthz, /metadata, /metrics (Prometheus); and the Open Inference Protocol under /v2
    (Triton's and KServe's clients). SIGTERM or Ctrl-C stops it cleanly (exit 0): running requests finish,
    waiting ones get 503.

    Example:  kdforge serve exports/quickstart --port 8000
              curl --data-binary @image.png -H "Content-Type: image/png" http://127.0.0.1:8000/predict
    """
    from kdforge.serve.__main__ import run

    with user_errors(interrupted="stopped"):
        run(export_dir, host, port, fmt, max_bytes, top_k=top_k, max_pixels=max_pixels, api_key_file=api_key_file,
            body_timeout_s=body_timeout, max_connections=max_connections, ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile, device_report=device_report, header_timeout_s=header_timeout)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP, ...).", show_default=False)],
    model: Annotated[Path, typer.Option("--model", help="An export folder.")] = Path("exports/quickstart"),
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)]
    = "auto",
    top_k: Annotated[int, typer.Option(help="Classes returned per image.", min=1)] = 5,
) -> None:
    """Classify images locally with an exported student; prints one JSON line per image, the same top-k as
    the server's /predict.

    Example:  kdforge predict cat.png dog.jpg --model exports/quickstart
    """
    import json

    from kdforge.serve.model import ServedModel, predict_files

    with user_errors(interrupted="interrupted"):
        served = ServedModel.load(model, fmt)
        for path, predictions in predict_files(served, images, top_k):
            out.print(json.dumps({"file": str(path), "predictions": predictions}), markup=False, highlight=False,
                      soft_wrap=True)


@recipe_app.command("check")
def recipe_check(
    files: Annotated[list[Path], typer.Argument(help="Recipe files to validate.", show_default=False)],
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print each resolved recipe (all defaults filled in).")] = False,
) -> None:
    """Validate recipes without running anything.

    Example:  kdforge recipe check recipes/*.toml
    """
    from kdforge.recipe import load_recipe, recipe_to_toml

    failed = 0
    for path in files:
        try:
            recipe = load_recipe(path, set_ or [])
        except KdforgeError as exc:
            failed += 1
            _error_lines(str(exc))  # shortened as every command's error lines are
            continue
        out.print(f"ok: {path} ({recipe.name})", highlight=False)
        if show:
            out.print(recipe_to_toml(recipe), markup=False, highlight=False)
    if failed:
        raise typer.Exit(2)


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write cifar-100-python/ into.")],
    train: Annotated[int, typer.Option(min=100, help="Training images.")] = 10_000,
    test: Annotated[int, typer.Option(min=100, help="Test images.")] = 2_000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives identical files.")] = 0,
) -> None:
    """Write the built-in synthetic dataset (100 classes) in the official CIFAR-100 format.

    Example:  kdforge data synth --out data/synth --train 10000 --test 2000
    """
    from kdforge.data.synthetic import write_synthetic

    with user_errors():
        folder = write_synthetic(out_dir, train=train, test=test, seed=seed)
    out.print(f"wrote {train} train + {test} test images (100 classes) to {folder}", highlight=False)
