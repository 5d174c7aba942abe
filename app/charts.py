"""Chart geometry for the admin pages, computed on the server so the pages need no script (strict CSP)."""

from __future__ import annotations

from typing import Any

BAR_WIDTH = 420  # pixels for the 0..1 scale
ROW_HEIGHT = 22


def interval_bars(rows: list[dict[str, Any]], *, reference: float | None = None, scale_max: float = 1.0,
                  percent: bool = True) -> dict[str, Any] | None:
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
        bars.append({
            "label": str(row["label"]), "y": i * ROW_HEIGHT, "width": x(row["value"]),
            "low": x(low) if low is not None else None, "high": x(high) if high is not None else None,
            "value_text": text(row["value"]), "title": f"{row['label']}: {text(row['value'])}{interval}, n = {row.get('n', '?')}",
        })
    return {"bars": bars, "width": BAR_WIDTH, "height": len(bars) * ROW_HEIGHT, "row_height": ROW_HEIGHT,
            "reference": x(reference) if reference is not None else None,
            "max_text": text(scale_max)}
