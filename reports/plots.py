"""Plots as inline SVG, drawn with matplotlib (no network, no JavaScript needed to see them)."""

from __future__ import annotations

import io
import math
import re

__all__ = ["error_along_model", "end_to_end_by_step", "error_histogram", "HISTOGRAM_LABELS"]

HISTOGRAM_LABELS = ["0", "<1e-10"] + [f"1e{k}" for k in range(-10, 4)] + ["≥1e4", "inf/NaN"]
FLOOR = 1e-12


def _num(x) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        return math.inf if x in ("inf", "-inf") else math.nan
    return float(x)


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<\?xml.*?\?>\s*", "", text)
    text = re.sub(r"<!DOCTYPE.*?>\s*", "", text, flags=re.S)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    return text


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("svg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9})
    return plt.subplots(figsize=(width, height))


def _plottable(v: float) -> float:
    return FLOOR if v == 0 else v


def error_along_model(ops: list, boundaries: list[tuple[int, str]], atol: float | None,
                      culprit: int | None, first_nonfinite: int | None) -> str:
    """Local and propagated max abs error per op, in execution order, log scale."""
    fig, ax = _figure(10, 3.4)
    top = 1.0
    for key, label, style in (("local", "local error", dict(marker="o", s=10, color="#1f77b4")),
                              ("propagated", "propagated error", dict(marker="x", s=12, color="#ff7f0e"))):
        xs, ys, inf_x = [], [], []
        for o in ops:
            metrics = getattr(o, key)
            v = _num(metrics.max_abs) if metrics is not None else None
            if v is None:
                continue
            if math.isinf(v) or math.isnan(v):
                inf_x.append(o.index)
            else:
                xs.append(o.index)
                ys.append(_plottable(v))
                top = max(top, v)
        ax.scatter(xs, ys, label=label, **style)
        if inf_x:
            ax.scatter(inf_x, [top * 10] * len(inf_x), marker="^", color=style["color"], s=18,
                       label=f"{label}: inf/NaN")
    if atol:
        ax.axhline(atol, color="#2ca02c", linestyle="--", linewidth=1, label=f"tolerance (atol {atol:g})")
    for x, name in boundaries:
        ax.axvline(x, color="#bbbbbb", linewidth=0.6)
        ax.text(x, FLOOR * 3, name, rotation=90, fontsize=6, color="#888888", va="bottom")
    if culprit is not None:
        ax.axvline(culprit, color="#d62728", linewidth=1.5, label=f"culprit (op {culprit})")
    if first_nonfinite is not None:
        ax.axvline(first_nonfinite, color="#9467bd", linewidth=1.2, linestyle=":",
                   label=f"first NaN/Inf (op {first_nonfinite})")
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 3, top * 100)
    ax.set_xlabel("op index (execution order)")
    ax.set_ylabel(f"max abs error (0 drawn at {FLOOR:g})")
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    return _svg(fig)


def end_to_end_by_step(steps: list) -> str:
    fig, ax = _figure(10, 2.6)
    names = [s.name for s in steps]
    values = [_num(s.end_to_end.max_abs) or 0.0 for s in steps]
    finite = [v for v in values if math.isfinite(v)] or [1.0]
    shown = [_plottable(v) if math.isfinite(v) else max(finite) * 10 for v in values]
    colors = ["#2ca02c" if s.end_to_end.ok else "#d62728" for s in steps]
    ax.bar(range(len(steps)), shown, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(steps)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("end-to-end max abs")
    return _svg(fig)


def error_histogram(counts: list[int]) -> str:
    fig, ax = _figure(6, 2.2)
    ax.bar(range(len(counts)), counts, color="#1f77b4")
    ax.set_xticks(range(len(counts)), HISTOGRAM_LABELS[:len(counts)], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("elements")
    ax.set_xlabel("|got − expected|")
    return _svg(fig)
