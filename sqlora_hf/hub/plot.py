"""A PNG of the allocation: bits per weight and rank of every compressed layer, in model order.

matplotlib is imported only here and only when a picture is asked for, so loading and running a
compressed model never needs it.
"""
from __future__ import annotations

from typing import Any, Mapping

# Colours per code width, so tiers stand out in the picture.
PALETTE = {2: "#d62728", 3: "#ff7f0e", 4: "#1f77b4", 8: "#2ca02c"}


def require_matplotlib():
    """matplotlib's `Figure` class, or an ImportError that says what to install.

    The picture is drawn on a bare `Figure` (no pyplot), so the user's matplotlib backend and open
    figures in a notebook are left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "drawing the allocation picture needs matplotlib: pip install matplotlib "
            "(or push with include_plot=False / `sqlora push --no-plot`)"
        ) from None
    return Figure


def plot_allocation(report: Mapping[str, Any], path: str, title: str = "sqlora allocation") -> str:
    """Write a two-panel PNG (bits per weight on top, rank below) of `sqlora_hf.report(model)`.

    The file is byte-identical for an identical report (no timestamp, fixed size and dpi), so a
    re-push of an unchanged model does not re-upload it.
    """
    figure_class = require_matplotlib()
    layers = report.get("layers", {})
    if not layers:
        raise ValueError("the report has no compressed layers, so there is no allocation to plot")
    names = list(layers)
    bpw = [float(layers[n]["bits_per_weight"]) for n in names]
    bits = [int(layers[n]["bits"]) for n in names]
    ranks = [int(layers[n]["rank"]) for n in names]
    palette = PALETTE
    x = list(range(len(names)))

    width = min(16.0, max(6.0, 0.06 * len(names) + 4))
    fig = figure_class(figsize=(width, 5.0), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x, bpw, color=[palette.get(b, "#7f7f7f") for b in bits], width=0.9)
    top.set_ylabel("bits per weight")
    top.set_title(f"{title}: {len(names)} layers, {float(report.get('bits_per_weight', 0.0)):.3f} bits/weight")
    from matplotlib.patches import Patch

    handles = [Patch(color=palette.get(b, "#7f7f7f"), label=f"{b}-bit codes") for b in sorted(set(bits))]
    top.legend(handles=handles, loc="lower right", fontsize=8)
    bottom.bar(x, ranks, color="#9467bd", width=0.9)
    bottom.set_ylabel("low-rank r")
    bottom.set_xlabel("layer (model order)")
    if len(names) <= 40:
        bottom.set_xticks(x)
        bottom.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _short(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `3.q_proj`: the tick labels must stay readable."""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"{digits[-1]}.{parts[-1]}" if digits else parts[-1]
