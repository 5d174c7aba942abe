"""Numbers and chart geometry for the admin pages, computed on the server so the pages need no script (strict CSP)."""

from __future__ import annotations

import json
from typing import Any

BAR_WIDTH = 420  # pixels for the 0..1 scale
ROW_HEIGHT = 22


def interval_bars(
    rows: list[dict[str, Any]], *, reference: float | None = None, scale_max: float = 1.0, percent: bool = True
) -> dict[str, Any] | None:
    """Lays out horizontal bars with confidence whiskers, one per row of {label, value, low, high, n}.

    Rows without a value are left out. `reference` draws a vertical line (e.g. 0.5 for "no preference").
    """
    drawn = [row for row in rows if row.get("value") is not None]
    if not drawn:
        return None

    def x(value: float) -> float:
        return round(max(0.0, min(1.0, value / scale_max)) * BAR_WIDTH, 1)

    def text(value: float) -> str:
        return f"{value * 100:.1f} %" if percent else f"{value:.2f}"

    bars = []
    for i, row in enumerate(drawn):
        low, high = row.get("low"), row.get("high")
        interval = f" (95 % CI {text(low)}–{text(high)})" if low is not None and high is not None else ""
        bars.append(
            {
                "label": str(row["label"]),
                "y": i * ROW_HEIGHT,
                "width": x(row["value"]),
                "low": x(low) if low is not None else None,
                "high": x(high) if high is not None else None,
                "value_text": text(row["value"]),
                "title": f"{row['label']}: {text(row['value'])}{interval}, n = {row.get('n', '?')}",
            }
        )
    return {
        "bars": bars,
        "width": BAR_WIDTH,
        "height": len(bars) * ROW_HEIGHT,
        "row_height": ROW_HEIGHT,
        "reference": x(reference) if reference is not None else None,
        "max_text": text(scale_max),
    }


# Metrics recorded per step that are counters or settings, not curves worth a chart.
NOT_CHARTED = {"step", "epoch", "rows", "lr", "kl_coef"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """Formats a metric for a table cell: four significant digits for floats, thousands for ints."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def line_chart(points: list[tuple[float, float]], width: int = 640, height: int = 160) -> dict[str, Any] | None:
    """Scales (x, y) points into an SVG polyline between the data's own minimum and maximum."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y0 == y1:  # a flat line sits in the middle rather than on an axis
        y0, y1 = y0 - 0.5, y1 + 0.5
    x_span, y_span = (x1 - x0) or 1, y1 - y0
    coords = " ".join(f"{(x - x0) / x_span * width:.1f},{height - (y - y0) / y_span * height:.1f}" for x, y in points)
    return {
        "points": coords,
        "width": width,
        "height": height,
        "x_min": fmt(x0),
        "x_max": fmt(x1),
        "y_min": fmt(y0),
        "y_max": fmt(y1),
    }


def curves(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Finds every curve in a run's or version's metrics and draws each as a chart.

    Two shapes occur: rows of numbers per step (`curve`, written live by the
    worker; `log`, PPO's per-iteration record) and `<name>_curve` lists of one
    number per epoch in the final metrics (PPO's per-iteration ones repeat `log`).
    """
    charts: list[dict[str, Any]] = []
    drawn: set[str] = set()
    for key, x_label in (("curve", "step"), ("log", "iteration")):
        rows = [r for r in metrics.get(key) or [] if isinstance(r, dict)] if isinstance(metrics.get(key), list) else []
        names = list(
            dict.fromkeys(name for r in rows for name, v in r.items() if _number(v) and name not in NOT_CHARTED)
        )
        for name in names:
            points = [(float(r.get("step", i + 1)), float(r[name])) for i, r in enumerate(rows) if _number(r.get(name))]
            chart = line_chart(points)
            if chart:
                charts.append(
                    {
                        "name": name,
                        "title": name.replace("_", " "),
                        "x_label": x_label,
                        "last": fmt(points[-1][1]),
                        "chart": chart,
                    }
                )
                drawn.add(name)
    for key, values in metrics.items():
        name = key.removesuffix("_curve")
        if not key.endswith("_curve") or name in drawn or not isinstance(values, list):
            continue
        points = [(float(i + 1), float(v)) for i, v in enumerate(values) if _number(v)]
        chart = line_chart(points)
        if chart:
            charts.append(
                {
                    "name": name,
                    "title": name.replace("_", " "),
                    "x_label": "epoch",
                    "last": fmt(points[-1][1]),
                    "chart": chart,
                }
            )
    return charts


def flat_metrics(metrics: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Splits metrics into (name, formatted value) rows for scalars, nested one level deep, and the rest."""
    rows: list[tuple[str, str]] = []
    other: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in ("curve", "log") or key.endswith("_curve"):
            continue  # drawn as charts
        if value is None or isinstance(value, (int, float, str, bool)):
            rows.append((key, fmt(value)))
        elif isinstance(value, dict) and all(
            v is None or isinstance(v, (int, float, str, bool)) for v in value.values()
        ):
            rows.extend((f"{key}.{sub}", fmt(v)) for sub, v in value.items())
        else:
            other[key] = value
    return rows, other


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)
