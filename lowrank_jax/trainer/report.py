"""The final table (markdown) and plot of a multi-config run.

Rows are the per-run result dicts (:func:`lowrank_jax.trainer.run.run`). A run that
diverged stays in both: its row says ``diverged`` instead of a score, and the plot marks
it with a red cross on the lower edge.
"""

from __future__ import annotations

import math
import pathlib
from typing import Optional, Sequence

import numpy as np

from lowrank_jax.trainer import files

__all__ = ["table", "plot", "save_figure", "score"]

# (result key, column title, plot label, higher is better)
_SCORES = (("test_accuracy", "test accuracy", "test accuracy (%)", True),
           ("eval_perplexity", "eval perplexity", "eval perplexity", False))


def _num(v: Optional[float], fmt: str) -> str:
  return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def score(result: dict) -> tuple[str, Optional[float]]:
  """``(key, value)`` of the row's headline metric."""
  for key, *_ in _SCORES:
    if key in result:
      return key, result[key]
  return "", None


def table(results: Sequence[dict]) -> str:
  """The markdown table: parameters, score(s), deployed accuracy, step time, peak RSS, status."""
  scores = [s for s in _SCORES if any(s[0] in r for r in results)]
  head = (["method", "trainable params", "% of total"] + [s[1] for s in scores]
          + ["deployed acc.", "step time (s)", "peak RSS (GiB)", "status"])
  rows = ["| " + " | ".join(head) + " |",
          "|---|" + "---:|" * (len(head) - 2) + "---|"]
  for r in results:
    diverged = r.get("status") == "diverged"
    cells = [r["name"], f"{r['trainable_params']:,}", _num(r.get("trainable_percent"), ".3f")]
    for key, *_ in scores:
      cells.append("diverged" if diverged else _num(r.get(key), ".4f"))
    cells += [_num(r.get("deployed_test_accuracy"), ".4f"), _num(r.get("step_time_s"), ".3f"),
              _num((r.get("peak_rss_bytes") or 0) / 2**30, ".2f"),
              "diverged at step {}".format(r["diverged"]["step"]) if diverged else r.get("status", "completed")]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes a matplotlib figure as PNG atomically (mode 0644) and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  try:
    with files.atomic_path(path, suffix=".png") as tmp:
      fig.savefig(tmp, dpi=120, format="png")
  finally:
    plt.close(fig)


def _lora_sweep(results: Sequence[dict]) -> list[tuple[int, int]]:
  """``(rank, row index)`` of plain AdamW LoRA runs on ``(query|value)/kernel`` (the rank sweep)."""
  out = []
  for i, r in enumerate(results):
    methods = r["config"].get("methods", [])
    if (len(methods) == 1 and methods[0].get("name") == "lora" and r["config"].get("quantize") is None
        and methods[0].get("where") == "(query|value)/kernel"
        and r["config"].get("optimizer", {}).get("kind", "adamw") == "adamw"):
      out.append((methods[0].get("rank", 0), i))
  return sorted(out)


def plot(results: Sequence[dict], path: pathlib.Path, title: str = "") -> None:
  """Score vs trainable parameters (log scale); colour = median step time, marker area =
  peak RSS, the LoRA q,v rank sweep joined by a line, diverged runs as red crosses."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  key = next((s for s in _SCORES if any(s[0] in r for r in results)), _SCORES[0])
  scale = 100.0 if key[0] == "test_accuracy" else 1.0
  fig, ax = plt.subplots(figsize=(7.6, 4.8))
  ok = [r for r in results if r.get("status") != "diverged" and r.get(key[0]) is not None]
  bad = [r for r in results if r not in ok]
  x = np.array([r["trainable_params"] for r in ok], float)
  y = np.array([scale * r[key[0]] for r in ok], float)
  if ok:
    t = np.array([r.get("step_time_s") or np.nan for r in ok], float)
    rss = np.array([(r.get("peak_rss_bytes") or 0) / 2**30 for r in ok])
    sweep = _lora_sweep(ok)
    if len(sweep) > 1:
      idx = [i for _, i in sweep]
      ax.plot(x[idx], y[idx], color="0.6", lw=1, zorder=1,
              label="LoRA q,v, r = " + ", ".join(str(r) for r, _ in sweep))
    sc = ax.scatter(x, y, c=t, s=30 + 60 * rss, cmap="viridis", edgecolors="k", linewidths=0.4, zorder=2)
    fig.colorbar(sc, ax=ax, label="step time (s)")
    for r, xi, yi in zip(ok, x, y):
      ax.annotate(r["name"], (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
  if bad:
    lo = float(np.min(y)) if len(y) else 0.0
    xb = np.array([r["trainable_params"] for r in bad], float)
    ax.scatter(xb, np.full(len(bad), lo), marker="x", color="red", s=60, zorder=3, label="diverged")
    for r, xi in zip(bad, xb):
      ax.annotate(f"{r['name']} (diverged)", (xi, lo), fontsize=7, color="red", xytext=(4, -10),
                  textcoords="offset points")
  if bad or len(_lora_sweep(ok)) > 1:
    ax.legend(loc="lower right", fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel(key[2])
  ax.set_title(title or "score vs trainable parameters (marker area: peak RSS)", fontsize=10)
  ax.grid(alpha=0.3)
  save_figure(fig, path)
