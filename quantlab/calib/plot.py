"""Plot LUQ's per-block entropy by modality (PNG, matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from quantlab.calib.artifact import CalibrationStats
from quantlab.calib.stats import MODALITIES

_STYLE = {"all": ("k", "o"), "image": ("tab:orange", "s"), "text": ("tab:blue", "^")}


def plot_entropy(stats: CalibrationStats, path: str | Path, *, kind: str = "kmeans") -> Path:
    """Entropy (bits) of each decoder block's LUQ tensor, one line per modality; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for m in MODALITIES:
        try:
            ent = stats.block_entropy(m, kind)
        except ValueError:
            continue
        color, marker = _STYLE[m]
        xs = sorted(ent)
        ax.plot(xs, [ent[i] for i in xs], color=color, marker=marker, label=m)
        drawn += 1
    if not drawn:
        raise ValueError(f"plot_entropy: no {kind} entropy in these statistics")
    k = stats.meta.get("options", {}).get("entropy_k")
    if kind == "kmeans" and k:
        ax.axhline(math.log2(k), color="grey", ls=":", lw=1, label=f"log2({k})")
    ax.set_xlabel("decoder block")
    ax.set_ylabel(f"{kind} entropy (bits)")
    where = stats.meta.get("luq_tensor", "")
    ax.set_title(f"{Path(str(stats.meta.get('source', ''))).name or 'model'}: {kind} entropy of {where}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
