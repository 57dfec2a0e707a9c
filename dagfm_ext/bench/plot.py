"""The speedup plot: speedup of the fused op vs batch size per interaction type, one panel per
device and pass. Needs matplotlib (the optional ``plot`` extra)."""
from __future__ import annotations

import os
from typing import Dict, List

from ..cost import PASSES
from ..reference import INTERACTIONS

__all__ = ["require_matplotlib", "write_plot"]

_COLORS = {"inner": "tab:blue", "outer": "tab:orange", "kernel": "tab:green"}
_SERIES = (("speedup_vs_eager", "-o", "vs eager"), ("speedup_vs_compiled", "--s", "vs torch.compile"),
           ("speedup_vs_graphs", ":^", "vs CUDA graphs"))


def require_matplotlib() -> None:
    """Raise ValueError naming --plot when matplotlib cannot be imported (checked before a run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ValueError("--plot: needs matplotlib, which is not installed here; install it with "
                         "`pip install dagfm_ext[plot]` (or `pip install matplotlib`)") from exc


def _x_family(rows: List[dict]):
    """The (F, D, L) with the most batch sizes: the plot's x axis."""
    fams: Dict[tuple, set] = {}
    for r in rows:
        fams.setdefault((r["num_fields"], r["embed_dim"], r["depth"]), set()).add(r["batch"])
    return max(fams, key=lambda k: (len(fams[k]), k)) if fams else None


def _panel(ax, plt, rows, fam, pass_, title):
    from matplotlib.ticker import FuncFormatter
    all_x: set = set()
    for inter in INTERACTIONS:
        sel = sorted((r for r in rows if fam and (r["num_fields"], r["embed_dim"], r["depth"]) == fam
                      and r["pass"] == pass_ and r["interaction"] == inter), key=lambda r: r["batch"])
        xs = [r["batch"] for r in sel]
        all_x.update(xs)
        for key, style, lab in _SERIES:
            pts = [(x, r.get(key)) for x, r in zip(xs, sel) if r.get(key)]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, color=_COLORS[inter],
                        label=f"{inter} {lab}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if all_x:
        ax.set_xticks(sorted(all_x))
        ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup of the fused op (x)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7)


def write_plot(results: List[dict], path: str) -> None:
    """Write the PNG to ``path`` (``require_matplotlib`` has been checked before the run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.get("status") == "ok"]
    devices = sorted({r["device"] for r in ok}) or ["cpu"]
    passes = [p for p in PASSES if any(r["pass"] == p for r in ok)] or list(PASSES)
    fig, axes = plt.subplots(len(devices), len(passes), figsize=(6.0 * len(passes), 4.2 * len(devices)),
                             squeeze=False)
    for i, dev in enumerate(devices):
        rows = [r for r in ok if r["device"] == dev]
        fam = _x_family(rows)
        fam_s = f"F={fam[0]} D={fam[1]} L={fam[2]}" if fam else ""
        for j, pass_ in enumerate(passes):
            _panel(axes[i][j], plt, rows, fam, pass_, f"{dev} {pass_} {fam_s}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
