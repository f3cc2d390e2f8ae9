"""The report's charts, drawn with matplotlib and returned as inline SVG text.

SVG keeps the text as text (``svg.fonttype: none``): a chart of 30 classes stays a few tens of kB, scales
without blur, and needs nothing from the network. Each function takes plain arrays and returns one
``<svg>`` string; :mod:`deft_clean.report` decides what to draw.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

FLAGGED_COLOUR, KEPT_COLOUR, ESTIMATE_COLOUR = "#d62728", "#1f77b4", "#7f7f7f"


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure outside pyplot: no global backend switch, no figure registry to leak into."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _svg(figure: Any) -> str:
    """The figure as an ``<svg>`` element (XML prologue dropped)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "deft-clean"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def class_bars(names: list[str], flagged_share: np.ndarray, noise_estimate: np.ndarray) -> str:
    """Horizontal bars per class: share of its images flagged, and the estimated noise rate.

    ``names`` (K,), ``flagged_share`` and ``noise_estimate`` (K,) in [0, 1]; the first class is drawn on top.
    """
    from matplotlib.ticker import PercentFormatter

    k = len(names)
    figure = _figure(6.5, 0.8 + 0.28 * k)
    axes = figure.subplots()
    y = np.arange(k)
    axes.barh(y - 0.2, flagged_share, height=0.4, color=FLAGGED_COLOUR, label="flagged share")
    axes.barh(y + 0.2, noise_estimate, height=0.4, color=ESTIMATE_COLOUR, label="estimated noise rate")
    axes.set_yticks(y, names)
    axes.invert_yaxis()
    axes.set_xlim(0, max(0.05, float(np.nanmax([*flagged_share, *noise_estimate, 0.0])) * 1.1))
    axes.xaxis.set_major_formatter(PercentFormatter(1.0))
    axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("share of the class's images (given label)")
    return _svg(figure)


def confusion_heatmap(names: list[str], counts: np.ndarray) -> str:
    """Given (rows) → suggested (columns) label counts of the flagged images, ``counts`` (K, K) int."""
    k = len(names)
    side = 1.6 + 0.34 * k
    figure = _figure(side + 1.2, side)
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Reds", vmin=0)
    axes.set_xticks(np.arange(k), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(np.arange(k), names, fontsize=8)
    axes.set_xlabel("suggested label")
    axes.set_ylabel("given label")
    if k <= 20:
        top = counts.max() or 1
        for (i, j), value in np.ndenumerate(counts):
            if value:
                colour = "white" if value > top / 2 else "black"
                axes.text(j, i, str(value), ha="center", va="center", fontsize=7, color=colour)
    from matplotlib.ticker import MaxNLocator

    bar = figure.colorbar(image, ax=axes, shrink=0.7, label="flagged images")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    return _svg(figure)


def p_clean_histogram(flagged: np.ndarray, kept: np.ndarray) -> str:
    """``p_clean`` histograms (40 bins over [0, 1]) of the flagged and the kept images (counts log-scaled
    above 100 in a bin)."""
    figure = _figure(6.5, 2.8)
    axes = figure.subplots()
    bins = np.linspace(0.0, 1.0, 41)
    for values, colour, label in ((kept, KEPT_COLOUR, "kept"), (flagged, FLAGGED_COLOUR, "flagged")):
        axes.hist(values, bins=bins, color=colour, alpha=0.6, label=f"{label} ({len(values):,})")
    if max(np.histogram(flagged, bins)[0].max(initial=0), np.histogram(kept, bins)[0].max(initial=0)) > 100:
        axes.set_yscale("symlog", linthresh=10)  # thousands of kept rows would flatten the flagged ones
    axes.set_xlabel("p_clean (probability that the given label is right; low = likely wrong)")
    axes.set_ylabel("images")
    axes.legend(fontsize=8)
    return _svg(figure)
