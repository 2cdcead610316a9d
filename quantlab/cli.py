"""The ``quantlab`` command line: one subcommand per stage, each calling one public function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress vision-language models to a memory budget and measure what it cost.")
console = Console()

Device = Annotated[Optional[str], typer.Option(
    help="compute device: cpu, cuda or cuda:N. Decoder blocks, statistics, solvers and evaluation run there; "
         "the model stays in host memory (default: cpu)")]


Stream = Annotated[bool, typer.Option(
    help="read decoder and vision blocks from the checkpoint's safetensors one at a time instead of loading "
         "the model (a local directory; for models larger than memory). Same results")]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _check_device(device: str | None) -> None:
    from quantlab.device import resolve_device

    try:
        resolve_device(device)
    except ValueError as err:
        console.print(f"[red]--device: {err}[/]")
        raise typer.Exit(code=2) from None


@app.command()
def models() -> None:
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


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory (any format) or hub id")],
    tasks: Annotated[str, typer.Option(help="comma-separated task names")] = "shapes-vqa",
    data_dir: Annotated[Optional[Path], typer.Option(help="root of the benchmark folders")] = None,
    limit: Annotated[Optional[int], typer.Option(help="seeded subset of this many items per task")] = 500,
    batch_size: Annotated[int, typer.Option()] = 32,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write results as JSON here")] = None,
    device: Device = None,
) -> None:
    """Evaluate a model (built-in toy, local checkpoint, quantlab native checkpoint or hub id) on VQA tasks."""
    from quantlab.eval.runner import evaluate
    from quantlab.models.load import open_model

    _check_device(device)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    loaded = open_model(model)
    if device is not None:
        loaded.model.to(device)
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


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _overrides(sets: list[str]) -> dict:
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        import yaml

        out[key] = yaml.safe_load(value)
    return out


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory or hub id")],
    recipe: Annotated[Path, typer.Option(help="recipe YAML (calibration + stats sections)")],
    out: Annotated[Path, typer.Option(help="directory for the statistics artifact")],
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    device: Device = None,
    stream: Stream = False,
) -> None:
    """Stream calibration samples block by block and write activation statistics (+ entropy plot)."""
    from quantlab.calib.data import build_calibration_set
    from quantlab.calib.plot import plot_entropy
    from quantlab.models import load_model
    from quantlab.recipe import Recipe
    from quantlab.stages import stats_options

    _check_device(device)
    r = Recipe.from_yaml(recipe, _overrides(set_))
    if out.exists() and not overwrite:
        console.print(f"[red]{out} exists; pass --overwrite to replace it[/]")
        raise typer.Exit(code=1)
    weights = None
    if stream:
        from quantlab.calib.weights import stream_model

        loaded, weights = stream_model(model)
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
def quantize(
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory or hub id")],
    recipe: Annotated[Path, typer.Option(help="recipe YAML")],
    out: Annotated[Path, typer.Option(help="run directory (created, or resumed if it holds this run)")],
    overwrite: bool = typer.Option(False, help="start over in --out instead of resuming"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(help="ORG/NAME to upload the exported model to")] = None,
    device: Device = None,
    stream: Stream = False,
) -> None:
    """Run calibrate -> plan -> quantize -> export -> eval -> report in a run directory.

    With --stream, evaluation still loads the models it compares; --set 'eval.tasks=[]' skips it.
    """
    from quantlab.pipeline import run_all

    _check_device(device)
    summary = run_all(model, recipe, out, overwrite=overwrite, overrides=_overrides(set_),
                      say=lambda m: console.print(f"[bold cyan]{m}[/]"), device=device, stream=stream)
    console.print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    for key, rep in summary.get("eval", {}).items():
        console.print(f"{key}: " + ", ".join(f"{t} {r.score:.3f}" for t, r in rep.tasks.items()))
    if push_to_hub:
        from quantlab.export.hub import push_to_hub as push

        try:
            console.print(f"pushed: {push(summary['model_dir'], push_to_hub)}")
        except ConnectionError as err:
            console.print(f"[red]{err}[/]")
            raise typer.Exit(code=1) from None


def _stage_on_run(run_dir: Path, stop_after: str | None, device: str | None = None, stream: bool = False) -> None:
    from quantlab.pipeline import run_all

    _check_device(device)
    state = run_dir / "state.json"
    if not state.is_file():
        console.print(f"[red]{run_dir} is not a quantlab run directory (no state.json); "
                      "start one with `quantlab quantize MODEL --recipe R --out DIR`[/]")
        raise typer.Exit(code=1)
    model = json.loads(state.read_text())["_model"]
    summary = run_all(model, run_dir / "recipe.yaml", run_dir, stop_after=stop_after,
                      say=lambda m: console.print(f"[bold cyan]{m}[/]"), device=device, stream=stream)
    console.print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


@app.command()
def plan(
    target: Annotated[str, typer.Argument(help="a run directory, or MODEL: alias, checkpoint dir or config.json")],
    recipe: Annotated[Optional[Path], typer.Option(help="recipe YAML (MODEL mode)")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="statistics from `quantlab calibrate` (MODEL mode)")] = None,
    budget_gb: Annotated[Optional[float], typer.Option(help="whole-model budget in GB (1e9 bytes)")] = None,
    avg_bits: Annotated[Optional[float], typer.Option(help="target average bits of the decoder Linears")] = None,
    out: Annotated[Optional[Path], typer.Option(help="plan.yaml to write (MODEL mode)")] = None,
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key: a.b=value")] = None,
    device: Device = None,
    stream: Stream = False,
) -> None:
    """Make a plan: on a run directory, (re)make RUN/plan.yaml; on a MODEL, write --out plan.yaml.

    MODEL mode needs no weights for the uniform planner, or for luq given --stats: a config.json of a real
    7B architecture is enough. The budget planner (and luq without --stats) calibrates the model first.
    """
    if (Path(target) / "state.json").is_file() and recipe is None:
        _stage_on_run(Path(target), "plan", device, stream)
        return
    if recipe is None or out is None:
        console.print("[red]quantlab plan MODEL needs --recipe and --out (or pass a run directory)[/]")
        raise typer.Exit(code=1)
    if budget_gb is not None and avg_bits is not None:
        console.print("[red]pass --budget-gb or --avg-bits, not both[/]")
        raise typer.Exit(code=1)
    if out.exists() and not overwrite:
        console.print(f"[red]{out} exists; pass --overwrite to replace it[/]")
        raise typer.Exit(code=1)
    _check_device(device)
    from quantlab.stages import plan_for_model

    overrides = _overrides(set_)
    if budget_gb is not None:
        overrides.update({"plan.budget_gb": budget_gb, "plan.target_avg_bits": None, "plan.k": None})
    if avg_bits is not None:
        overrides.update({"plan.target_avg_bits": avg_bits, "plan.budget_gb": None, "plan.k": None})
    loaded, made, st = plan_for_model(target, recipe, overrides, stats_dir=stats,
                                      say=lambda m: console.print(f"[bold cyan]{m}[/]"), device=device)
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
    console.print(f"wrote {out} and {png}")


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="run directory")], device: Device = None,
           stream: Stream = False) -> None:
    """Quantize (resuming) and export RUN/model in the recipe's format."""
    _stage_on_run(run_dir, "export", device, stream)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="run directory")], device: Device = None,
           stream: Stream = False) -> None:
    """Evaluate baseline vs quantized and write RUN/report.{md,json}."""
    _stage_on_run(run_dir, None, device, stream)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
