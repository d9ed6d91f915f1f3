"""``stats --plot``: the report drawn with matplotlib (the ``plot`` extra, imported only here)."""

from __future__ import annotations

import math
from pathlib import Path

from . import reportfile
from .display import fmt
from .errors import ShadowgraftError


def check_plot(path: str | Path) -> None:
    """Fail early (before any tensor is read) when ``path`` cannot be plotted to."""
    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ShadowgraftError(f"{path}: a plot file must end in .png, .svg or .pdf")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ShadowgraftError("plotting needs matplotlib; install it with: pip install 'shadowgraft[plot]'") from None


def plot(r, path: Path) -> Path:
    """The stats report ``r`` as sigma per layer: one line per module kind, one panel per tower (and the change with --tuned)."""
    check_plot(path)
    from matplotlib.figure import Figure

    tuned = r.tuned is not None and any(g.delta_ratio is not None for g in r.layers)
    # One panel per tower with blocks: vision block 0 and text layer 0 are different layers.
    towers = list(dict.fromkeys(g.tower for g in r.layers)) or ["language"]
    rows = len(towers) + tuned
    fig = Figure(figsize=(10, 4.5 + 2.5 * (rows - 1)), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    order = [str(g.key) for g in r.modules]
    for ax, tw in zip(axes, towers):
        # Per (layer, module kind): the unweighted mean sigma of that kind's tensors.
        cells: dict[str, dict[int, list[float]]] = {}
        for x in r.tensors:
            if x.layer is not None and x.tower == tw and math.isfinite(x.sigma):
                cells.setdefault(x.module, {}).setdefault(x.layer, []).append(x.sigma)
        for kind in sorted(cells, key=lambda k: order.index(k) if k in order else len(order)):
            pts = sorted(cells[kind].items())
            ax.plot([k for k, _ in pts], [sum(v) / len(v) for _, v in pts], marker=".", linewidth=1, label=kind)
        lay = [g for g in r.layers if g.tower == tw]
        if lay:
            ax.plot([g.key for g in lay], [g.sigma_mean for g in lay], color="black", linewidth=2.5, label="layer mean")
        ax.axhline(r.summary.close, color="green", linestyle=":", linewidth=1, label=f"close siblings under {r.summary.close:g}")
        ax.axhline(r.summary.threshold, color="red", linestyle="--", linewidth=1, label=f"diverging over {r.summary.threshold:g}")
        ax.set_ylabel("sigma = sum|A-B| / (sum|A|+sum|B|)")
        if len(towers) > 1:
            ax.set_xlabel(f"{tw} layer")
        ax.legend(fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
    what = " (language model)" if len(towers) > 1 else ""
    axes[0].set_title(f"{r.a} vs {r.b}: sigma_mean{what} {fmt(r.summary.sigma_mean)}", fontsize="medium")
    if tuned:
        lay = [g for g in r.layers if g.delta_ratio is not None and g.tower == towers[0]]
        ax2 = axes[-1]
        ax2.plot([g.key for g in lay], [g.delta_ratio for g in lay], marker=".", label="|T-A| / |B-A|")
        ax2.plot([g.key for g in lay], [g.delta_cosine for g in lay], marker=".", label="cos(T-A, B-A)")
        ax2.axhline(0, color="gray", linewidth=0.8)
        ax2.set_ylabel("fine-tuning change vs instruct change")
        ax2.set_xlabel(f"{towers[0]} layer" if len(towers) > 1 else "layer")
        ax2.legend(fontsize="small")
        ax2.grid(alpha=0.3)
    if len(towers) == 1:
        axes[-1].set_xlabel("layer")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fmt_ = path.suffix.lower().lstrip(".")
    reportfile.write(path, "plot",
                     lambda tmp: fig.savefig(tmp, format=fmt_, metadata={"Creator": reportfile.PLOT_CREATOR}))
    return path
