"""``OUT/report.html``: what a run did, on one self-contained page.

Built only from the files a run writes (``metrics.jsonl``, ``config.yaml``, ``data_counts.json``,
``summary.json``, ``samples.jsonl``), so ``orpo report OUT`` can rebuild it at any time, also while the
run is still going: a line cut short by a write in progress is ignored, and any missing file or metric
only removes its own plot or table. The plots are matplotlib PNGs embedded as base64 data URIs and the
style is inline: the page needs no network, no CDN and no JavaScript.

This package imports nothing from torch or the rest of orpo, so it is cheap to run beside a training job.
The package: ``runs`` reads a run folder, ``plots`` draws the figures, ``page`` writes the HTML.
"""

from .page import REPORT_NAME, render_html, write_report, write_report_safe
from .plots import Plot, make_plots
from .runs import Run, load_run, read_metrics, series, smooth

__all__ = ["REPORT_NAME", "Plot", "Run", "load_run", "make_plots", "read_metrics", "render_html", "series", "smooth",
           "write_report", "write_report_safe"]
