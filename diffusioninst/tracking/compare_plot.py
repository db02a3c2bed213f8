"""PNG of a :class:`~diffusioninst.tracking.compare.Comparison`: AP against each swept axis.

One panel per axis. Series are the tasks (box, mask), split by step count when runs were evaluated at several.
Numeric axes: every run is a point, the line joins the best value at each x (log2 x-scale when the values span
a factor >= 8). Categorical axes (booleans, strings, ``n/a``): grouped bars of the best value per category,
with every run as a point on its bar. With several axes, "best" is over the other axes' values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from diffusioninst.tracking.compare import Comparison, _axis_text, _sort_key

TASK_NAMES = {"bbox": "box", "segm": "mask"}


def _series(comp: Comparison, column: str) -> list[tuple[str, str, int | None]]:
    """(label, value column, steps filter) per plotted series."""
    runs_steps: dict[str, set[int]] = {}
    for r in comp.rows:
        runs_steps.setdefault(r["run_id"], set()).add(r["steps"])
    several = comp.show_steps and any(len(s) > 1 for s in runs_steps.values())
    tasks = [c.split("/")[0] for c in comp.value_columns if c.endswith("/" + column)]
    if not several:
        return [(f"{TASK_NAMES.get(t, t)} {column}", f"{t}/{column}", None) for t in tasks]
    steps = sorted({r["steps"] for r in comp.rows})
    return [
        (f"{TASK_NAMES.get(t, t)} {column}, {s} step{'s' if s > 1 else ''}", f"{t}/{column}", s)
        for t in tasks
        for s in steps
    ]


def _points(comp: Comparison, axis: str, col: str, steps: int | None) -> list[tuple[Any, float]]:
    out = []
    for r in comp.rows:
        v = r.get(col, math.nan)
        if (steps is None or r["steps"] == steps) and v is not None and not math.isnan(v):
            out.append((r[axis], v))
    return out


def _is_numeric(values: list[Any]) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_comparison(comp: Comparison, path: str | Path, column: str = "AP") -> Path:
    """Write the PNG to ``path`` (no pyplot global state) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    series = _series(comp, column)
    n = max(1, len(comp.axes))
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for i, axis in enumerate(comp.axes):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        label = comp.labels[axis]
        values = [r[axis] for r in comp.rows]
        numeric = _is_numeric(values) and len(set(values)) > 1
        cats = sorted(set(map(_axis_text, values)), key=lambda t: _sort_key(_lookup(values, t)))
        width = 0.8 / max(1, len(series))
        for j, (name, col, steps) in enumerate(series):
            pts = _points(comp, axis, col, steps)
            if not pts:
                continue
            color = colors[j % len(colors)]
            best: dict[Any, float] = {}
            for x, y in pts:
                key = x if numeric else _axis_text(x)
                best[key] = max(best.get(key, -math.inf), y)
            if numeric:
                xs = sorted(best)
                ax.plot(xs, [best[x] for x in xs], "-", color=color, label=name)
                ax.scatter([x for x, _ in pts], [y for _, y in pts], color=color, s=18, alpha=0.6)
            else:
                offset = (j - (len(series) - 1) / 2) * width
                pos = {c: k + offset for k, c in enumerate(cats)}
                ax.bar(
                    [pos[c] for c in best], list(best.values()), width=width * 0.9, color=color, alpha=0.45, label=name
                )
                ax.scatter([pos[_axis_text(x)] for x, _ in pts], [y for _, y in pts], color=color, s=14, zorder=3)
        if numeric:
            xs = sorted(set(values))
            if min(xs) > 0 and max(xs) / min(xs) >= 8:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.set_xticklabels([_axis_text(x) for x in xs])
        else:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats)
        ax.set_xlabel(label)
        ax.set_ylabel(column)
        ax.set_title(f"{column} vs {label}")
        ax.grid(alpha=0.3)
        if i == 0 and series:
            ax.legend(fontsize=8)
    if len(comp.axes) > 1:
        fig.suptitle(f"{column} per value of each axis (lines/bars: best over the other axes; points: every run)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _lookup(values: list[Any], text: str) -> Any:
    for v in values:
        if _axis_text(v) == text:
            return v
    return text
