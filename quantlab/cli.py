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


def _not_built(stage: str, issue: str) -> None:
    console.print(f"[bold red]quantlab {stage}[/]: this stage is not built yet (tracked in the {issue} issue).")
    raise typer.Exit(code=2)


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
    model: Annotated[str, typer.Argument(help="alias, checkpoint directory or hub id")],
    tasks: Annotated[str, typer.Option(help="comma-separated task names")] = "shapes-vqa",
    limit: Annotated[int, typer.Option(help="number of items per task")] = 500,
    batch_size: Annotated[int, typer.Option()] = 64,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write results as JSON here")] = None,
) -> None:
    """Evaluate a model (built-in toy, local checkpoint or hub id) on VQA tasks."""
    from quantlab.eval.shapes_eval import evaluate_shapes
    from quantlab.models import load_model

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t != "shapes-vqa"]
    if unknown:
        console.print(f"[red]unknown or not yet supported task(s) {unknown}; available: ['shapes-vqa'][/]")
        raise typer.Exit(code=2)
    loaded = load_model(model)
    results = {"model": model, "tasks": {}}
    for name in names:
        r = evaluate_shapes(loaded, n=limit, batch_size=batch_size)
        results["tasks"][name] = r
        table = Table(title=f"{name} ({r['n']} items)")
        table.add_column("question type")
        table.add_column("accuracy", justify="right")
        for t, acc in r["per_type"].items():
            table.add_row(t, f"{acc:.3f}")
        table.add_row("[bold]overall[/]", f"[bold]{r['accuracy']:.3f}[/]")
        console.print(table)
    if json_out is not None:
        _write_json_atomic(json_out, results)
        console.print(f"wrote {json_out}")


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


@app.command()
def calibrate(model: str, recipe: Optional[Path] = typer.Option(None), out: Optional[Path] = typer.Option(None)) -> None:
    """Stream calibration samples block by block and write activation statistics."""
    _not_built("calibrate", "Calibration")


@app.command()
def plan(stats: Path, recipe: Optional[Path] = typer.Option(None), out: Optional[Path] = typer.Option(None)) -> None:
    """Choose a quantization scheme per layer under a memory budget."""
    _not_built("plan", "Planner")


@app.command()
def quantize(
    model: str,
    recipe: Optional[Path] = typer.Option(None),
    out: Optional[Path] = typer.Option(None),
    overwrite: bool = typer.Option(False),
) -> None:
    """Run calibrate -> plan -> quantize -> export -> evaluate -> report."""
    _not_built("quantize", "End to end")


@app.command()
def export(run_dir: Path, format: str = typer.Option("compressed-tensors")) -> None:
    """Write a quantized model in a format third-party loaders open."""
    _not_built("export", "Export")


@app.command()
def report(run_dir: Path) -> None:
    """Summarise a run: memory, accuracy, baseline vs quantized."""
    _not_built("report", "Evaluation")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
