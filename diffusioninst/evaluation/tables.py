"""AP tables (markdown / CSV / JSON) and flat MLflow metric names, over several sampling-step counts.

``metrics_by_steps`` maps the number of DDIM sampling steps to the :class:`EvalResult` of that run. One table
row per ``(steps, task)``; values on the 0-100 scale, printed with one decimal like ``37.3``; ``nan`` marks a
statistic without ground truth. Markdown is written by hand (``pandas.to_markdown`` needs ``tabulate``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusioninst.evaluation.eval_result import EvalResult, ap_columns


def _checked(metrics_by_steps: Mapping[int, EvalResult], kind: str) -> list[tuple[int, EvalResult]]:
    ap_columns(kind)  # validates kind
    if not metrics_by_steps:
        raise ValueError("metrics_by_steps is empty: nothing to tabulate")
    items = sorted((int(s), r) for s, r in metrics_by_steps.items())
    for steps, result in items:
        if result.kind != kind:
            raise ValueError(f"steps {steps}: result is a {result.kind!r} evaluation, table kind is {kind!r}")
    return items


def _fmt(value: float, digits: int = 1) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; columns whose cells are all numbers (or ``nan``) are right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    right = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" if r else ":" + "-" * (w + 1) for w, r in zip(widths, right)) + "|")
    for row in rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ap_rows(metrics_by_steps: Mapping[int, EvalResult], kind: str, with_ar: bool = False) -> list[dict[str, Any]]:
    """One dict per ``(steps, task)``: ``steps``, ``task`` and the AP columns (plus AR columns if ``with_ar``)."""
    rows = []
    for steps, result in _checked(metrics_by_steps, kind):
        columns = (*result.ap_columns, *result.ar_columns) if with_ar else result.ap_columns
        for task in result.tasks:
            rows.append({"steps": steps, "task": task, **{c: result[task][c] for c in columns}})
    return rows


def format_ap_table(metrics_by_steps: Mapping[int, EvalResult], kind: str, digits: int = 1) -> str:
    """Markdown table ``| steps | task | AP | AP50 | ... |`` (LVIS adds APr/APc/APf), values like ``37.3``."""
    columns = ap_columns(kind)
    rows = ap_rows(metrics_by_steps, kind)
    body = [[str(r["steps"]), r["task"], *(_fmt(r[c], digits) for c in columns)] for r in rows]
    return _markdown(["steps", "task", *columns], body)


def flat_metrics(metrics_by_steps: Mapping[int, EvalResult], kind: str) -> dict[str, float]:
    """MLflow metrics ``eval/steps_<S>/<bbox|segm>/<AP|AP50|AP75|APs|APm|APl[|APr|APc|APf]>`` (0-100; NaN kept)."""
    out: dict[str, float] = {}
    for row in ap_rows(metrics_by_steps, kind):
        for column in ap_columns(kind):
            out[f"eval/steps_{row['steps']}/{row['task']}/{column}"] = float(row[column])
    return out


def _category_rows(metrics_by_steps: Mapping[int, EvalResult], kind: str) -> tuple[list[str], list[dict[str, Any]]]:
    items = _checked(metrics_by_steps, kind)
    tasks = [t for t in ("bbox", "segm") if any(t in r.tasks for _, r in items)]
    header = ["steps", "category_id", "name", *(["frequency"] if kind == "lvis" else []), "num_gt", *tasks]
    rows = []
    for steps, result in items:
        for cat in result.per_category:
            row = {"steps": steps, **{k: cat.get(k) for k in header[1:] if k not in tasks}}
            row.update({t: cat.get(t, math.nan) for t in tasks})
            rows.append(row)
    return header, rows


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return "" if value is None else value


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_csv_value(row[h]) for h in header])


def write_ap_tables(
    metrics_by_steps: Mapping[int, EvalResult], out_dir: str | Path, kind: str, digits: int = 1
) -> dict[str, Path]:
    """Write the AP tables into ``out_dir`` and return ``{file name: path}``:

    * ``ap_table.md``: :func:`format_ap_table` (AP columns, one decimal);
    * ``ap_table.csv``: same rows with AP and AR columns at full precision;
    * ``ap_table.json``: those rows plus every :class:`EvalResult` (stats incl. AR, per-category AP, notes,
      evaluator summaries), ``NaN`` written as ``null``;
    * ``per_category_ap.csv`` / ``.md``: AP per category, task and steps (``num_gt`` = GT instances evaluated).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _checked(metrics_by_steps, kind)
    paths = {name: out_dir / name for name in ("ap_table.md", "ap_table.csv", "ap_table.json")}
    paths.update({name: out_dir / name for name in ("per_category_ap.csv", "per_category_ap.md")})

    paths["ap_table.md"].write_text(format_ap_table(metrics_by_steps, kind, digits))
    full_rows = ap_rows(metrics_by_steps, kind, with_ar=True)
    columns = list(full_rows[0])[2:] if full_rows else list(ap_columns(kind))
    _write_csv(paths["ap_table.csv"], ["steps", "task", *columns], full_rows)
    document = {
        "kind": kind,
        "ap_columns": list(ap_columns(kind)),
        "columns": columns,
        "rows": full_rows,
        "results": {str(steps): result.to_dict() for steps, result in items},
    }
    paths["ap_table.json"].write_text(json.dumps(_strict(document), indent=2) + "\n")

    header, cat_rows = _category_rows(metrics_by_steps, kind)
    _write_csv(paths["per_category_ap.csv"], header, cat_rows)
    body = [
        [_fmt(r[h], digits) if isinstance(r[h], float) else ("" if r[h] is None else str(r[h])) for h in header]
        for r in cat_rows
    ]
    paths["per_category_ap.md"].write_text(_markdown(header, body))
    return paths


def _strict(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj
