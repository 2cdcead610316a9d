"""The ``quantlab`` command line: one subcommand per stage, each calling one public function."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from quantlab.core.errors import USER_ERRORS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress vision-language models to a memory budget and measure what it cost.")
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger(__name__)

Debug = Annotated[bool, typer.Option("--debug", help="show the full traceback of an error on the console "
                                                     "(it is always written to RUN/run.log)")]
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Run a command; an error becomes a short message and an exit code instead of a traceback.

    User errors (bad recipe, model, flag, file, full disk: :data:`quantlab.core.errors.USER_ERRORS`) exit 2;
    anything else is a bug in quantlab and exits 1. The traceback is in the run log when a run directory
    was open (the pipeline writes it there) and on the console only with ``--debug``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: rerun the same command to resume (finished stages and "
                              "quantized blocks are kept)")
            raise typer.Exit(code=130) from None
        except Exception as err:  # noqa: BLE001 - the one place errors meet the user
            if kwargs.get("debug"):
                err_console.print_exception()
            user = isinstance(err, USER_ERRORS)
            where = getattr(err, "quantlab_log", None)
            err_console.print(f"[red]error:[/] {err}" if user else
                              f"[red]internal error ({type(err).__name__}):[/] {err}\n"
                              "this is a bug in quantlab; please report it with the traceback")
            if not kwargs.get("debug"):
                err_console.print(f"(traceback in {where})" if where else "(rerun with --debug for the traceback)",
                                  style="dim")
            raise typer.Exit(code=2 if user else 1) from None

    return wrapper  # type: ignore[return-value]

Device = Annotated[Optional[str], typer.Option(
    help="compute device: cpu, cuda or cuda:N. Decoder blocks, statistics, solvers and evaluation run there; "
         "the model stays in host memory (default: cpu)")]


Stream = Annotated[bool, typer.Option(
    help="read decoder and vision blocks from the checkpoint's safetensors one at a time instead of loading "
         "the model (a local directory; for models larger than memory). Same results")]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _say(message: str) -> None:
    console.print(f"[bold cyan]{message}[/]")


def _overrides(sets: list[str] | None) -> dict:
    import yaml

    from quantlab.core.errors import UserError

    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set calibration.num_samples=16")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    return out


def _refuse_existing(path: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> None:
    """An existing output is replaced only with --overwrite, and only when it is quantlab's own ``what``."""
    from quantlab.core.errors import NotOurs

    if not path.exists():
        return
    if not overwrite:
        raise NotOurs(f"{path} exists", "pass --overwrite to replace it, or choose another path")
    if not is_ours(path):
        raise NotOurs(f"{path} exists and is not {what}; quantlab replaces only its own output",
                      "choose another path")


@app.command()
@friendly_errors
def models(debug: Debug = False) -> None:
    """List the supported architecture families and the built-in model aliases."""
    from quantlab.models import ADAPTERS, ALIASES

    fam = Table(title="Adapters (architecture families)")
    fam.add_column("model_type")
    fam.add_column("decoder blocks")
    fam.add_column("vision blocks")
    fam.add_column("projector")
    for model_type, a in sorted(ADAPTERS.items()):
        fam.add_row(model_type, a.decoder_blocks, a.vision_blocks, a.projector)
    console.print(fam)
    al = Table(title="Model aliases")
    al.add_column("alias")
    al.add_column("resolves to")
    for alias, target in ALIASES.items():
        al.add_row(alias, target)
    console.print(al)


@app.command()
@friendly_errors
def recipes(debug: Debug = False) -> None:
    """List the built-in recipes (pass a name to --recipe, or copy one from the path shown and edit it)."""
    from quantlab.recipe import BUILTIN_RECIPES, Recipe, builtin_recipes, recipe_summary

    table = Table(title="Built-in recipes (--recipe NAME)")
    for col in ("name", "planner", "format", "what"):
        table.add_column(col, overflow="fold")
    for name, path in builtin_recipes().items():
        r = Recipe.from_yaml(path)
        table.add_row(name, r.plan.planner, r.export.format, recipe_summary(path))
    console.print(table)
    console.print(f"files: {BUILTIN_RECIPES} (copy one to edit it)")


@app.command("eval")
@friendly_errors
def eval_(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory (any format) or hub id")],
    tasks: Annotated[str, typer.Option(help="comma-separated task names")] = "shapes-vqa",
    data_dir: Annotated[Optional[Path], typer.Option(help="root of the benchmark folders")] = None,
    limit: Annotated[Optional[int], typer.Option(help="seeded subset of this many items per task")] = 500,
    batch_size: Annotated[int, typer.Option()] = 32,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write results as JSON here")] = None,
    overwrite: bool = typer.Option(False, help="replace an existing --json written by quantlab"),
    engine: Annotated[str, typer.Option(help="generation engine: transformers (in-process) or vllm "
                                             "(see quantlab engines)")] = "transformers",
    engine_python: Annotated[Optional[Path], typer.Option(help="the Python that runs --engine (default: "
                                                               "its quantlab-built environment)")] = None,
    tensor_parallel: Annotated[Optional[int], typer.Option(help="vllm: GPUs to shard the model over")] = None,
    device: Device = None,
    debug: Debug = False,
) -> None:
    """Evaluate a model (built-in toy, local checkpoint, quantlab native checkpoint or hub id) on VQA tasks."""
    from quantlab.core.errors import UserError, problems_error
    from quantlab.eval.engines import get_engine, open_engine
    from quantlab.eval.runner import EvalReport, evaluate
    from quantlab.eval.tasks import TASKS
    from quantlab.export.open import open_model
    from quantlab.pipeline.preflight import check_device, engine_problems

    check_device(device)
    problems = engine_problems(engine, None if engine_python is None else str(engine_python))
    if problems:
        raise problems_error("--engine", problems, "quantlab engines lists the engines and how to install them")
    if tensor_parallel is not None and get_engine(engine).in_process:
        raise UserError(f"--tensor-parallel is a vllm option; engine {engine!r} runs in this process")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise problems_error("--tasks", [f"unknown task {t!r}" for t in unknown] or ["no task given"],
                             f"valid tasks: {', '.join(sorted(TASKS))}")
    if json_out is not None:
        _refuse_existing(json_out, overwrite, lambda p: _loads(EvalReport.load_json, p), "a quantlab evaluation")
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    if get_engine(engine).in_process:
        loaded = open_model(model)
        if device is not None:
            loaded.model.to(device)
    else:
        loaded = open_engine(engine, model, python=engine_python,
                             options={} if tensor_parallel is None else {"tensor_parallel_size": tensor_parallel})
    report = evaluate(loaded, names, data_dir=data_dir, limit=limit, seed=seed, batch_size=batch_size, progress=True)
    for name, r in report.tasks.items():
        table = Table(title=f"{name} ({r.n} items, {r.n_failed} failed)")
        table.add_column("question type")
        table.add_column("n", justify="right")
        table.add_column("score", justify="right")
        for t, ts in r.per_type.items():
            table.add_row(t, str(ts.n), f"{ts.score:.3f}")
        table.add_row("[bold]overall[/]", str(r.n), f"[bold]{r.score:.3f}[/]" if r.score is not None else "-")
        console.print(table)
    if json_out is not None:
        report.save_json(json_out)
        console.print(f"wrote {json_out}")


@app.command()
@friendly_errors
def engines(
    install: Annotated[Optional[str], typer.Option(help="build this engine's own environment")] = None,
    debug: Debug = False,
) -> None:
    """List the generation engines `quantlab eval --engine` takes, or install one (`--install vllm`)."""
    from quantlab.eval.engines import ENGINES, engines_dir, install_engine

    if install is not None:
        py = install_engine(install, log=lambda m: console.print(f"[dim]{m}[/]"))
        console.print(f"engine {install!r} ready: {py}")
        return
    table = Table(title=f"generation engines (environments under {engines_dir()})")
    for col in ("engine", "runs", "environment"):
        table.add_column(col, overflow="fold")
    for e in ENGINES.values():
        where = "quantlab's own" if e.in_process else ", ".join(e.requirements)
        table.add_row(e.name, e.description, where)
    console.print(table)


def _loads(reader: Callable[[Path], Any], path: Path) -> bool:
    """True when ``reader`` reads ``path`` (it is quantlab's own artifact)."""
    try:
        reader(path)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ours"
        return False


@app.command()
@friendly_errors
def calibrate(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory or hub id")],
    recipe: Annotated[str, typer.Option(help="recipe YAML, or a built-in name (quantlab recipes)")],
    out: Annotated[Path, typer.Option(help="directory for the statistics artifact")],
    overwrite: bool = typer.Option(False, help="replace an existing --out written by quantlab calibrate"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    device: Device = None,
    stream: Stream = False,
    debug: Debug = False,
) -> None:
    """Stream calibration samples block by block and write activation statistics (+ entropy plot)."""
    from quantlab.calib.artifact import is_stats_dir
    from quantlab.calib.data import build_calibration_set
    from quantlab.calib.plot import plot_entropy
    from quantlab.core.errors import problems_error
    from quantlab.models import load_model
    from quantlab.pipeline.preflight import (
        calibration_problems,
        check_device,
        check_out,
        open_skeleton,
    )
    from quantlab.pipeline.stages import stats_options
    from quantlab.recipe import Recipe

    check_device(device)
    r = Recipe.from_yaml(recipe, _overrides(set_))
    check_out(out, model=model)
    _refuse_existing(out, overwrite, is_stats_dir, "a statistics directory written by quantlab calibrate")
    open_skeleton(model, stream=stream)
    problems = calibration_problems(r)
    if problems:
        raise problems_error(f"{r.name}: the calibration section cannot run", problems)
    weights = None
    if stream:
        from quantlab.calib.weights import stream_model

        loaded, weights = stream_model(model, device=device)
    else:
        loaded = load_model(model)
    cs = build_calibration_set(loaded, r.calibration)
    from quantlab.calib.collect import calibrate as run_calibrate

    stats = run_calibrate(loaded, cs, options=stats_options(r), device=device, weights=weights)
    stats.save(out, overwrite=overwrite)
    plot_entropy(stats, out / "entropy.png")
    table = Table(title=f"{model}: per-block statistics ({cs.n_image} image+text, {cs.n_text} text-only samples)")
    for col in ("block", "H image", "H text", "H all", "variance", "kurtosis", "outliers"):
        table.add_column(col, justify="right")
    for row in stats.table():
        table.add_row(str(row["block"]), _fmt(row["H_image"]), _fmt(row["H_text"]), _fmt(row["H_all"]),
                      _fmt(row.get("variance")), _fmt(row.get("kurtosis")), _fmt(row.get("outliers")))
    console.print(table)
    console.print(f"wrote {out} (stats.safetensors, summary.json, entropy.png)")


@app.command()
@friendly_errors
def quantize(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory or hub id")],
    recipe: Annotated[str, typer.Option(help="recipe YAML, or a built-in name (quantlab recipes)")],
    out: Annotated[Path, typer.Option(help="run directory (created, or resumed if it holds this run)")],
    overwrite: bool = typer.Option(False, help="start over in --out (a quantlab run directory) instead of resuming"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(help="ORG/NAME to upload the exported model to")] = None,
    device: Device = None,
    stream: Stream = False,
    debug: Debug = False,
) -> None:
    """Run calibrate -> plan -> quantize -> export -> eval -> report in a run directory.

    With --stream, evaluation still loads the models it compares; --set 'eval.tasks=[]' skips it.
    """
    from quantlab.pipeline import run_all

    summary = run_all(model, recipe, out, overwrite=overwrite, overrides=_overrides(set_), say=_say,
                      device=device, stream=stream, push_to_hub=push_to_hub)
    console.print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    for key, rep in summary.get("eval", {}).items():
        console.print(f"{key}: " + ", ".join(f"{t} {r.score:.3f}" for t, r in rep.tasks.items()))
    if push_to_hub:
        from quantlab.export.hub import push_to_hub as push

        console.print(f"pushed: {push(summary['model_dir'], push_to_hub)}")


@app.command()
@friendly_errors
def forecast(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory or hub id")],
    recipe: Annotated[str, typer.Option(help="recipe YAML, or a built-in name (quantlab recipes)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    device: Device = None,
    stream: Stream = False,
    debug: Debug = False,
) -> None:
    """Print each stage's forecast peak memory for `quantlab quantize` with the same arguments; runs nothing.

    Exits 2 when a stage would not fit in this machine's available memory (as quantize would refuse).
    """
    from quantlab.pipeline.forecast import check_forecast, format_forecast, host_budget
    from quantlab.pipeline.preflight import preflight
    from quantlab.recipe import Recipe

    spec = Recipe.from_yaml(recipe, _overrides(set_))
    skeleton = preflight(model, spec, stream=stream, device=device)
    console.print(format_forecast(check_forecast(skeleton, model, spec, stream=stream, device=device), host_budget()))


def _stage_on_run(run_dir: Path, stop_after: str | None, device: str | None = None, stream: bool = False) -> None:
    from quantlab.core.errors import UserError
    from quantlab.pipeline import run_all
    from quantlab.pipeline.rundir import read_state

    state = read_state(run_dir)
    if state is None:
        raise UserError(f"{run_dir} is not a quantlab run directory (no quantlab state.json)",
                        "start one with `quantlab quantize MODEL --recipe R --out DIR`")
    summary = run_all(state["_model"], run_dir / "recipe.yaml", run_dir, stop_after=stop_after, say=_say,
                      device=device, stream=stream)
    console.print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


@app.command()
@friendly_errors
def plan(
    target: Annotated[str, typer.Argument(help="a run directory, or MODEL: alias, checkpoint dir or config.json")],
    recipe: Annotated[Optional[str], typer.Option(help="recipe YAML or built-in name (MODEL mode)")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="statistics from `quantlab calibrate` (MODEL mode)")] = None,
    budget_gb: Annotated[Optional[float], typer.Option(help="whole-model budget in GB (1e9 bytes)")] = None,
    avg_bits: Annotated[Optional[float], typer.Option(help="target average bits of the decoder Linears")] = None,
    out: Annotated[Optional[Path], typer.Option(help="plan.yaml to write (MODEL mode)")] = None,
    overwrite: bool = typer.Option(False, help="replace an existing --out plan written by quantlab"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    device: Device = None,
    stream: Stream = False,
    debug: Debug = False,
) -> None:
    """Make a plan: on a run directory, (re)make RUN/plan.yaml; on a MODEL, write --out plan.yaml.

    MODEL mode needs no weights for the uniform planner, or for luq given --stats: a config.json of a real
    7B architecture is enough. The budget planner (and luq without --stats) calibrates the model first.
    """
    from quantlab.calib.artifact import is_stats_dir
    from quantlab.core.errors import UserError
    from quantlab.pipeline.preflight import check_device
    from quantlab.plan.plan import Plan

    if (Path(target) / "state.json").is_file() and recipe is None:
        _stage_on_run(Path(target), "plan", device, stream)
        return
    if recipe is None or out is None:
        raise UserError("quantlab plan MODEL needs --recipe and --out (or pass a run directory)")
    if budget_gb is not None and avg_bits is not None:
        raise UserError("pass --budget-gb or --avg-bits, not both")
    if stats is not None and not is_stats_dir(stats):
        raise UserError(f"--stats {stats} is not a statistics directory written by quantlab calibrate "
                        "(stats.safetensors + summary.json)")
    check_device(device)
    _refuse_existing(out, overwrite, lambda p: _loads(Plan.from_yaml, p), "a quantlab plan")
    png = out.with_suffix(".png")
    if png.exists() and not out.exists():
        raise UserError(f"{png} exists (the plan's plot goes there) and is not beside a quantlab plan",
                        "choose another --out")
    from quantlab.pipeline.stages import plan_for_model

    overrides = _overrides(set_)
    if budget_gb is not None:
        overrides.update({"plan.budget_gb": budget_gb, "plan.target_avg_bits": None, "plan.k": None})
    if avg_bits is not None:
        overrides.update({"plan.target_avg_bits": avg_bits, "plan.budget_gb": None, "plan.k": None})
    loaded, made, st = plan_for_model(target, recipe, overrides, stats_dir=stats, say=_say, device=device)
    made.to_yaml(out, overwrite=overwrite)
    _print_plan(loaded, made, st, out)


def _print_plan(loaded, made, st, out: Path) -> None:
    from quantlab.plan.summary import block_rows, plot_bits, totals

    rows = block_rows(loaded, made, st)
    t = totals(loaded, made)
    table = Table(title=f"{made.model}: {made.planner} plan ({made.format})")
    for col in ("block", "H image", "H text", "schemes", "bits/weight", "bytes"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.block), _fmt(r.entropy_image), _fmt(r.entropy_text), ", ".join(r.schemes),
                      f"{r.avg_bits:.3f}", f"{r.bytes:,}")
    console.print(table)
    png = plot_bits(rows, out.with_suffix(".png"), title=f"{Path(made.model).name}: {made.planner}")
    console.print(f"predicted size {t.total_bytes / 1e9:.4f} GB ({t.total_bytes:,} bytes); decoder Linears "
                  f"{t.avg_bits:.3f} stored bits/weight ({t.nominal_bits:.2f} nominal); saving vs fp16 "
                  f"{100 * t.saving_vs_fp16:.1f}%, vs uniform W4 g128 {100 * t.saving_vs_w4:.1f}%")
    fallbacks = made.info.get("fallbacks", {})
    if fallbacks:
        console.print(f"shape fallbacks ({len(fallbacks)} module(s), plan.shape_fallback): "
                      + "; ".join(f"{n}: {why}" for n, why in list(fallbacks.items())[:5])
                      + (" ..." if len(fallbacks) > 5 else ""))
    console.print(f"wrote {out} and {png}")


@app.command()
@friendly_errors
def export(run_dir: Annotated[Path, typer.Argument(help="run directory")], device: Device = None,
           stream: Stream = False, debug: Debug = False) -> None:
    """Quantize (resuming) and export RUN/model in the recipe's format."""
    _stage_on_run(run_dir, "export", device, stream)


@app.command()
@friendly_errors
def report(run_dir: Annotated[Path, typer.Argument(help="run directory")], device: Device = None,
           stream: Stream = False, debug: Debug = False) -> None:
    """Evaluate baseline vs quantized and write RUN/report.{md,json}."""
    _stage_on_run(run_dir, None, device, stream)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
