"""Plots as inline SVG, drawn with matplotlib (no network, no JavaScript needed to see them)."""

from __future__ import annotations

import functools
import html
import importlib.util
import io
import math
import re
from collections.abc import Callable

from .run import number

__all__ = ["error_along_model", "errors_overlaid", "end_to_end_by_step", "error_histogram", "HISTOGRAM_LABELS"]

HISTOGRAM_LABELS = ["0", "<1e-10"] + [f"1e{k}" for k in range(-10, 4)] + ["≥1e4", "inf/NaN"]
FLOOR = 1e-12
NO_PLOTS = '<p class="note">(no plot: matplotlib is not installed here; the tables below hold every number)</p>'


def _optional(draw: Callable[..., str]) -> Callable[..., str]:
    """Why: a report must still render where only torch is installed (a GPU box with no package
    index); without matplotlib each plot becomes one line saying so."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> str:
        if importlib.util.find_spec("matplotlib") is None:
            return NO_PLOTS
        return draw(*args, **kwargs)

    return wrapper


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


def _titled(svg: str, titles: dict[str, list[str]]) -> str:
    """Each point of the scatter with gid ``key`` gets its ``<title>`` (a hover tooltip, no JavaScript):
    matplotlib writes a collection's points in data order, as ``<use>`` or ``<path>`` elements."""
    for gid, texts in titles.items():
        start = svg.find(f'<g id="{gid}">')
        if start < 0 or not texts:
            continue
        end = _group_end(svg, start)
        body = svg[start:end]
        defs = body.find("</defs>")
        cut = defs + len("</defs>") if defs >= 0 else len(f'<g id="{gid}">')
        svg = svg[:start] + body[:cut] + _wrap_points(body[cut:], texts) + svg[end:]
    return svg


def _group_end(svg: str, start: int) -> int:
    depth = 0
    for m in re.finditer(r"<g\b|</g>", svg[start:]):
        depth += 1 if m.group(0) == "<g" else -1
        if depth == 0:
            return start + m.end()
    return len(svg)


def _wrap_points(svg: str, texts: list[str]) -> str:
    pending = iter(texts)

    def wrap(m: re.Match) -> str:
        return f'<g class="pt"><title>{html.escape(next(pending))}</title>{m.group(0)}</g>'

    return re.sub(r"<(?:use|path)\b[^>]*/>", wrap, svg, count=len(texts))


def _point_title(o, prefix: str = "") -> str:
    local = o.local.max_abs if o.local is not None else None
    prop = o.propagated.max_abs if o.propagated is not None else None
    return (f"{prefix}op {o.index} {o.op} · {o.module or '(model)'}" + (f" #{o.call}" if o.call else "")
            + f" · local {_text(local)} · propagated {_text(prop)}")


def _text(x) -> str:
    if x is None:
        return "not measured"
    return x if isinstance(x, str) else f"{x:.3g}"


def _scatter(ax, ops: list, key: str, label: str, style: dict, gid: str, titles: dict, prefix: str = "") -> float:
    """One series (``local`` or ``propagated`` max abs per op); returns its largest finite value."""
    xs, ys, inf_x, texts, top = [], [], [], [], 1.0
    for o in ops:
        metrics = getattr(o, key)
        v = number(metrics.max_abs) if metrics is not None else None
        if v is None:
            continue
        if math.isinf(v) or math.isnan(v):
            inf_x.append(o)
        else:
            xs.append(o.index)
            ys.append(_plottable(v))
            texts.append(_point_title(o, prefix))
            top = max(top, v)
    ax.scatter(xs, ys, label=label, zorder=3, **style).set_gid(gid)
    titles[gid] = texts
    if inf_x:
        ax.scatter([o.index for o in inf_x], [top * 10] * len(inf_x), marker="^", color=style["color"], s=18,
                   label=f"{label}: inf/NaN", zorder=3).set_gid(gid + "-inf")
        titles[gid + "-inf"] = [_point_title(o, prefix) for o in inf_x]
    return top


def _finish(ax, fig, top: float, titles: dict) -> str:
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 3, top * 30)
    ax.set_xlabel("op index (execution order)")
    ax.set_ylabel(f"max abs error (0 drawn at {FLOOR:g})")
    ax.patch.set_gid("plot-area")
    # above the axes, never over the points
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=4, frameon=False,
              borderaxespad=0).set_gid("legend")
    return _titled(_svg(fig), titles)


@_optional
def error_along_model(ops: list, boundaries: list[tuple[int, str]], atol: float | None,
                      culprit: int | None, first_nonfinite: int | None) -> str:
    """Local and propagated max abs error per op, in execution order, log scale; every point names its op."""
    fig, ax = _figure(10, 3.4)
    titles: dict[str, list[str]] = {}
    top = max(_scatter(ax, ops, "local", "local error", dict(marker="o", s=10, color="#1f77b4"), "pts-local",
                       titles),
              _scatter(ax, ops, "propagated", "propagated error", dict(marker="x", s=12, color="#ff7f0e"),
                       "pts-propagated", titles))
    if atol:
        ax.axhline(atol, color="#2ca02c", linestyle="--", linewidth=1, label=f"tolerance (atol {atol:g})", zorder=1)
    for x, name in boundaries:
        ax.axvline(x, color="#bbbbbb", linewidth=0.6, zorder=0.5)
        ax.text(x, FLOOR * 3, name, rotation=90, fontsize=6, color="#888888", va="bottom")
    if culprit is not None:
        ax.axvline(culprit, color="#d62728", linewidth=1.5, label=f"culprit (op {culprit})", zorder=1)
        row = next((o for o in ops if o.index == culprit and o.local is not None), None)
        v = number(row.local.max_abs) if row is not None else None
        if v is not None and math.isfinite(v):  # the culprit's own point, ringed above its line
            ax.scatter([culprit], [_plottable(v)], s=90, facecolors="none", edgecolors="#d62728", linewidths=1.6,
                       zorder=4).set_gid("pts-culprit")
            titles["pts-culprit"] = [_point_title(row, "culprit: ")]
    if first_nonfinite is not None:
        ax.axvline(first_nonfinite, color="#9467bd", linewidth=1.2, linestyle=":", zorder=1,
                   label=f"first NaN/Inf (op {first_nonfinite})")
    return _finish(ax, fig, top, titles)


@_optional
def errors_overlaid(runs: list[tuple[str, list]], atol: float | None) -> str:
    """Two (or more) runs' local errors along the same model on one axes: where one target is worse."""
    fig, ax = _figure(10, 3.4)
    titles: dict[str, list[str]] = {}
    styles = [dict(marker="o", s=12, color="#1f77b4"), dict(marker="x", s=16, color="#d62728"),
              dict(marker="^", s=12, color="#2ca02c")]
    top = 1.0
    for k, (name, ops) in enumerate(runs):
        top = max(top, _scatter(ax, ops, "local", f"{name}: local error", styles[k % len(styles)], f"pts-run{k}",
                                titles, prefix=f"{name}: "))
    if atol:
        ax.axhline(atol, color="#2ca02c", linestyle="--", linewidth=1, label=f"tolerance (atol {atol:g})", zorder=1)
    return _finish(ax, fig, top, titles)


@_optional
def end_to_end_by_step(steps: list) -> str:
    fig, ax = _figure(10, 2.6)
    names = [s.name for s in steps]
    values = [number(s.end_to_end.max_abs) or 0.0 for s in steps]
    finite = [v for v in values if math.isfinite(v)] or [1.0]
    shown = [_plottable(v) if math.isfinite(v) else max(finite) * 10 for v in values]
    colors = ["#2ca02c" if s.end_to_end.ok else "#d62728" for s in steps]
    ax.bar(range(len(steps)), shown, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(steps)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("end-to-end max abs")
    return _svg(fig)


@_optional
def error_histogram(counts: list[int]) -> str:
    fig, ax = _figure(6, 2.2)
    ax.bar(range(len(counts)), counts, color="#1f77b4")
    ax.set_xticks(range(len(counts)), HISTOGRAM_LABELS[:len(counts)], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("elements")
    ax.set_xlabel("|got − expected|")
    return _svg(fig)
