"""bench/accuracy.py's figure: capture curve, Dice against tracking error, ROC of the estimate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def plot(path: str | Path, rows: list[dict], rocs: dict[str, dict[str, Any]],
         records: list[dict], *, bad_mm: float, good_mm: float) -> None:
    """Capture curve, Dice vs error, ROC of the estimate (bad: TRE > ``bad_mm``, good: TRE <=
    ``good_mm``): one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5), dpi=100)
    colours = {"A": "tab:blue", "B": "tab:red"}
    for fam in colours:
        mine = [r for r in rows if r["family"] == fam and r["error_level"] is not None]
        if not mine:
            continue
        lv = [r["error_level"] for r in mine]
        pts = [(r["tre_tracked_mm"], r["tre_registered_mm"]) for r in records
               if r["family"] == fam]
        if pts:
            x, y = np.asarray(pts, dtype=float).T
            ax[0].scatter(x, y, s=4, alpha=0.25, color=colours[fam])
        initial = [r["tre_tracked_median_mm"] for r in mine]
        ax[0].plot(initial, [r["tre_median_mm"] for r in mine], "-o", color=colours[fam],
                   label=f"{fam} registered median")
        ax[0].plot(initial, [r["tre_p90_mm"] for r in mine], ":", color=colours[fam],
                   label=f"{fam} registered p90")
        ax[1].plot(lv, [r["dice_prostate"] for r in mine], "-o", color=colours[fam],
                   label=f"{fam} prostate")
        ax[1].plot(lv, [r["dice_lesion"] for r in mine], "--s", color=colours[fam],
                   label=f"{fam} lesion")
        ax[1].plot(lv, [r["dice_registered"] for r in mine], ":^", color=colours[fam],
                   label=f"{fam} registered")
        r = rocs.get(fam)
        if r and r["fpr"]:
            ax[2].plot(r["fpr"], r["tpr"], color=colours[fam], label=f"{fam} AUC {r['auc']:.2f}")
    top = max([1.0] + [float(r["tre_tracked_mm"]) for r in records
                       if math.isfinite(r["tre_tracked_mm"])])
    ax[0].plot([0, top], [0, top], color="grey", lw=0.5, label="no correction")
    ax[0].set(xlabel="initial TRE, tracked plane (mm)", ylabel="final TRE, registered (mm)",
              title="capture curve (dots: frames; lines: medians per level)")
    ax[1].set(xlabel="tracking error (mm and deg)", ylabel="Dice", title="segmentation",
              ylim=(0, 1))
    ax[2].plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax[2].set(xlabel=f"false alarm (TRE <= {good_mm:g} mm flagged)",
              ylabel=f"detection (TRE > {bad_mm:g} mm flagged)", title="error estimate ROC")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
