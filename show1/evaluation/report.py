"""The evaluation report: one self-contained HTML page (no CDN, no script) with every video playable, the
set-level and per-prompt metrics, and plots of the metrics across registry versions (matplotlib PNGs)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from show1 import atomic

PLOTTED = ("fid_vid", "fvd", "clipsim", "temporal_consistency", "inception_score")
LABELS = {"fid_vid": "FID-vid ↓", "fvd": "FVD ↓", "clipsim": "CLIPSIM ↑",
          "temporal_consistency": "temporal consistency ↑", "inception_score": "Inception Score ↑",
          "inception_score_std": "IS std"}


@dataclass(frozen=True)
class HistoryPoint:
    """One evaluation of the metric history: a label naming its model versions, and its metrics."""

    label: str
    metrics: dict[str, float]
    current: bool = False


def plot_history(history: list[HistoryPoint], target: Path) -> Path | None:
    """One panel per metric, evaluations in time order; the current one highlighted. None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in PLOTTED if any(m in point.metrics for point in history)]
    if not names:
        return None
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        points = [(i, p) for i, p in enumerate(history) if name in p.metrics]
        xs = [i for i, _ in points]
        axis.plot(xs, [p.metrics[name] for _, p in points], marker="o", color="#3465a4")
        for i, point in points:
            if point.current:
                axis.plot([i], [point.metrics[name]], marker="o", markersize=10, color="#cc0000", zorder=3)
        axis.set_title(LABELS.get(name, name))
        axis.set_xticks(xs, [p.label for _, p in points], rotation=45, ha="right", fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return target


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def render(title: str, facts: dict[str, str], metrics: dict[str, float], skipped: dict[str, str],
           rows: list[dict[str, Any]], plot: str | None) -> str:
    """The page. `rows`: {"prompt", "videos": [relative paths, webm first], "metrics": {...}}."""
    e = html.escape
    metric_names = sorted({k for row in rows for k in row["metrics"]})
    fact_items = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items())
    metric_items = "".join(f"<tr><th>{e(LABELS.get(k, k))}</th><td>{_number(v)}</td></tr>" for k, v in metrics.items())
    skipped_items = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in skipped.items())
    header = "".join(f"<th>{e(LABELS.get(k, k))}</th>" for k in metric_names)
    body = []
    for i, row in enumerate(rows):
        sources = "".join(f'<source src="{e(path)}" type="video/{Path(path).suffix[1:]}">' for path in row["videos"])
        cells = "".join(f"<td>{_number(row['metrics'].get(k, '–'))}</td>" for k in metric_names)
        body.append(f'<tr><td>{i}</td><td class="prompt">{e(row["prompt"])}</td>'
                    f'<td><video controls muted loop playsinline preload="metadata">{sources}</video></td>{cells}</tr>')
    plot_html = f'<img src="{e(plot)}" alt="metrics across registry versions">' if plot else \
        "<p>No metric to plot yet.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: middle; }}
th {{ background: #f3f3f3; }}
td.prompt {{ max-width: 24rem; }}
video {{ max-width: 420px; display: block; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<table class="facts">{fact_items}</table>
<h2>Metrics</h2>
<table class="metrics">{metric_items}</table>
{f"<p>Not computed:</p><ul>{skipped_items}</ul>" if skipped_items else ""}
<h2>Across registry versions</h2>
{plot_html}
<h2>Per prompt</h2>
<table class="videos"><tr><th>#</th><th>prompt</th><th>video</th>{header}</tr>
{"".join(body)}
</table>
</body>
</html>
"""
