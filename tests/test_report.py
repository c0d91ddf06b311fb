"""OUT/report.html: built from a run's files, self-contained, robust to a run still in progress."""

import base64
import html
import json
import math
import os
import re

import pytest

import orpo
from browser import find_chromium, open_page
from orpo.cli import main
from orpo.compare import compare_numbers, plot_compare
from orpo.report import (
    load_run,
    make_plots,
    read_metrics,
    smooth,
    write_report,
    write_report_safe,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_row(step, drift=0.0):
    c, r = -2.0 + 0.02 * step, -2.2 + drift * step
    return {"step": step, "epoch": step / 20, "time_s": 1.5 * step, "pair_tokens": 900, "loss": 2.5 - 0.03 * step,
            "nll_loss": 2.4 - 0.03 * step, "log_odds_ratio": -0.6, "log_odds_chosen": 0.3, "logps/chosen": c,
            "logps/rejected": r, "rewards/chosen": 0.1 * c, "rewards/rejected": 0.1 * r, "rewards/margins": 0.1 * (c - r),
            "rewards/accuracies": 0.5 + 0.01 * step, "grad_norm": 3.0, "learning_rate": 1e-4 * min(1, step / 3),
            "tokens_per_s": 600.0 + step}


def eval_row(step, drift=0.0):
    r = train_row(step, drift)
    keys = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected", "rewards/chosen",
            "rewards/rejected", "rewards/margins", "rewards/accuracies")
    return {"step": step, "epoch": step / 20, **{"eval_" + k: r[k] for k in keys}, "eval_pairs": 16}


def write_run(out, steps=20, finished=True, partial_line=True, drift=0.0):
    """A run folder as train() writes it; ``finished=False`` leaves it as a run still going."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(eval_row(0, drift))]
    for s in range(1, steps + 1):
        lines.append(json.dumps(train_row(s, drift)))
        if s % 10 == 0:
            lines.append(json.dumps(eval_row(s, drift)))
    text = "\n".join(lines) + "\n"
    if partial_line:
        text += json.dumps(train_row(steps + 1))[:37]  # a line cut short by a write in progress
    (out / "metrics.jsonl").write_text(text)
    (out / "config.yaml").write_text("model: null\ndata: pairs.jsonl\nbeta: 0.1\nlora: true\nmax_steps: 20\nlr: 0.0001\n")
    (out / "data_counts.json").write_text(json.dumps({
        "train": {"rows_read": 120, "kept": 117, "prompt_truncated": 9, "completion_truncated": 4, "skipped": 3,
                  "tokens_cut": 2345, "largest_cut": 610, "skipped_by_reason": {"chosen identical to rejected": 3}},
        "eval": {"rows_read": 16, "kept": 16, "prompt_truncated": 1, "completion_truncated": 0, "skipped": 0,
                 "skipped_by_reason": {}}}))
    if finished:
        (out / "summary.json").write_text(json.dumps({"steps": steps, "time_s": 31.0, "answer_accuracy": None}))
        with open(out / "samples.jsonl", "w") as fh:
            fh.write(json.dumps({"prompt": "What is <b>2+2</b>?", "before": "It is 5 & more", "after": "4"}) + "\n")
            fh.write(json.dumps({"prompt": "Capital of France?", "expected": "Paris", "before": "Lyon", "after": "Paris",
                                 "correct_before": False, "correct_after": True}) + "\n")
    return out


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_read_metrics_splits_train_and_eval_and_skips_a_partial_line(tmp_path):
    out = write_run(tmp_path / "run")
    train, evals, bad = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert bad == 1
    # a resumed run logs a step again: the later row wins
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write("\n" + json.dumps({**train_row(20), "loss": 9.0}) + "\n")
    train, _, _ = read_metrics(out / "metrics.jsonl")
    assert len(train) == 20 and train[-1]["loss"] == 9.0
    assert read_metrics(tmp_path / "missing.jsonl") == ([], [], 0)


def test_report_of_a_finished_run_has_the_plots_and_tables(tmp_path):
    out = write_run(tmp_path / "run")
    path = write_report(out)
    assert path == out / "report.html"
    page = path.read_text()
    pngs = images(page)
    assert len(pngs) >= 8 and all(p.startswith(PNG_MAGIC) and len(p) > 2000 for p in pngs)
    for title in ("Loss and NLL", "Log-probabilities of chosen and rejected answers", "Margins", "Preference accuracy",
                  "Learning rate", "Throughput", "Held-out evaluation"):
        assert f"alt='{title}'" in page, title
    assert "finished: 20 steps" in page
    # data counts, timings, config, eval table and the generation table
    for text in ("rows read", "prompts truncated", "chosen identical to rejected", "training time", "0m31s",
                 "max_steps", "held-out, step 0", "held-out, step 20", "16 held-out pairs per evaluation",
                 "base model (before)", "trained model (after)", "Capital of France?", "✓", "✗"):
        assert text in page, text
    # the tokens truncation cut, in total and from one pair (train has them; eval's file predates them)
    assert re.search(r"tokens cut by truncation</t[dh]>\s*<td[^>]*>2345</td>", page)
    assert re.search(r"largest cut from one pair \(tokens\)</t[dh]>\s*<td[^>]*>610</td>", page)
    # user text is escaped, never interpreted
    assert "What is &lt;b&gt;2+2&lt;/b&gt;?" in page and "It is 5 &amp; more" in page
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "@import" not in page


def test_report_of_a_run_in_progress(tmp_path):
    out = write_run(tmp_path / "run", steps=7, finished=False)
    (out / "data_counts.json").unlink()
    page = write_report(out).read_text()
    assert "in progress" in page and "step 7 of 20" in page
    assert "1 line(s) of metrics.jsonl could not be read" in page
    assert "no samples.jsonl yet" in page and "no data_counts.json" in page
    assert len(images(page)) >= 6


def test_report_with_no_metrics_or_only_some(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    page = write_report(out).read_text()
    assert "nothing to plot yet" in page and "no config.yaml" in page
    (out / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "loss": float("nan"), "skipped": True}) + "\n"
        + json.dumps({"step": 3, "loss": 0.5}) + "\n")
    run = load_run(out)
    assert [p.title for p in make_plots(run)] == ["Loss and NLL"]
    page = write_report(out).read_text()
    assert len(images(page)) == 1 and "steps skipped" in page


def test_a_plotting_failure_keeps_the_tables_and_never_fails_a_run(tmp_path, monkeypatch, capsys):
    out = write_run(tmp_path / "run")
    import orpo.report.page as report

    def boom(run):
        raise RuntimeError("no display")

    monkeypatch.setattr(report, "make_plots", boom)
    page = write_report(out).read_text()
    assert "plots could not be drawn: RuntimeError: no display" in page and "rows read" in page
    messages = []
    assert write_report_safe(tmp_path / "no-such-run", messages.append) is None
    assert messages and messages[0].startswith("warning: could not write")


def test_report_command(tmp_path, capsys):
    out = write_run(tmp_path / "run", finished=False)
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert (out / "report.html").is_file()
    other = tmp_path / "elsewhere.html"
    assert main(["report", str(out), "--output", str(other)]) == 0 and other.is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_smooth():
    assert smooth([]) == [] and smooth([1.0, 2.0]) == [1.0, 2.0]
    ys = [float(i % 2) for i in range(100)]
    assert all(abs(v - 0.5) < 0.06 for v in smooth(ys)[20:])


def test_compare_figure_and_numbers(tmp_path):
    sft = write_run(tmp_path / "sft", drift=0.02)  # rejected rises with chosen
    orpo = write_run(tmp_path / "orpo", drift=-0.01)  # rejected falls: the gap widens
    runs = {"SFT": sft, "ORPO": orpo}
    nums = compare_numbers(runs)
    assert nums["SFT"]["logps/rejected"]["change"] == pytest.approx(0.4)
    assert nums["ORPO"]["logp_margin"]["change"] == pytest.approx(0.6)
    assert nums["SFT"]["first_step"] == 0 and nums["SFT"]["last_step"] == 20 and nums["SFT"]["evals"] == 3
    fig = plot_compare(runs, tmp_path / "fig" / "figure3.png", title="test")
    assert fig.read_bytes().startswith(PNG_MAGIC) and fig.stat().st_size > 10_000
    assert all(math.isfinite(v["change"]) for v in nums["ORPO"].values() if isinstance(v, dict) and "change" in v)


def test_a_training_run_leaves_a_report(tmp_path, tiny_model_dir, conv_file):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(conv_file), "--eval-data", str(conv_file),
               "--output-dir", str(out), "--max-steps", "2", "--eval-steps", "1", "--batch-size", "2", "--precision",
               "fp32", "--save-steps", "0", "--eval-samples", "2"])
    assert rc == 0
    page = (out / "report.html").read_text()
    assert "finished: 2 steps" in page and len(images(page)) >= 6
    assert "held-out, step 0" in page and "held-out, step 2" in page and "trained model (after)" in page
    # the path the start-up check chose, as the run printed it
    line = json.loads((out / "summary.json").read_text())["paths"]["line"]
    assert line.startswith("attention: blocks + prefix sharing + packing") and f"log-probs: {html.escape(line)}" in page


CHROMIUM = find_chromium()
# Under CI (.ci/run installs Debian's chromium) the browser test must run, never skip.
MUST_RUN = os.environ.get("ORPO_REQUIRE_INTEGRATION") == "1" or os.environ.get("CI", "").lower() == "true"


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if MUST_RUN:
            pytest.fail("chromium is not installed, and under CI the report must be opened in a browser "
                        "(.ci/run installs it: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium): the report was not opened in a browser")
    return CHROMIUM


def blank_share(png: bytes) -> tuple[float, set]:
    """(share of near-white pixels, the set of colours) of a screenshot."""
    import io

    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return float((px.min(axis=1) > 245).mean()), {tuple(c) for c in np.unique(px[:: max(1, len(px) // 200000)], axis=0)}


def test_report_renders_in_headless_chromium(tmp_path, chromium):
    """The page as a person sees it: every plot image decoded, no console error, and a screenshot that
    shows the plots (their chosen-green and rejected-red lines), not a blank page."""
    out = write_run(tmp_path / "run")
    page = write_report(out)
    view = open_page(page.as_uri(), chromium, tmp_path / "profile")
    n_plots = len(images(page.read_text()))
    assert n_plots >= 4 and len(view.images) == n_plots
    bad = [im for im in view.images if not (im["complete"] and im["naturalWidth"] > 0 and im["naturalHeight"] > 0)]
    assert not bad, bad
    assert view.errors == []
    white, colors = blank_share(view.screenshot)
    assert white < 0.97 and len(colors) > 200
    near = lambda rgb, c: all(abs(a - b) < 30 for a, b in zip(rgb, c))  # noqa: E731
    assert any(near(c, (44, 160, 44)) for c in colors) and any(near(c, (214, 39, 40)) for c in colors)


def test_the_browser_check_sees_a_broken_image_an_error_and_a_blank_page(tmp_path, chromium):
    """The checks above can fail: a page with an image that does not decode and a script error."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>x</title><body><img src='data:image/png;base64,iVBORw0KGgo='>"
                    "<script>console.error('plot missing'); undefinedFunction();</script></body>")
    view = open_page(page.as_uri(), chromium, tmp_path / "profile")
    assert view.images[0]["naturalWidth"] == 0
    assert any("plot missing" in e for e in view.errors) and any("undefinedFunction" in e for e in view.errors)
    white, _ = blank_share(view.screenshot)
    assert white > 0.97


def write_pair_values(out, steps, drift_wrong, seed):
    """eval_pairs.jsonl of a run on 40 built-in-like pairs, half chatty, half wrong: the wrong answers'
    log p moves by ``drift_wrong`` per step, the chatty ones and the chosen ones as in both runs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base_c, base_r = rng.normal(-3, 0.5, 40), rng.normal(-4, 0.5, 40)
    where = [f"builtin-heldout:capital:{i}:{'chatty' if i % 2 else 'wrong'}" for i in range(40)]
    wrong = np.array([i % 2 == 0 for i in range(40)])
    with open(out / "eval_pairs.jsonl", "w") as fh:
        for s in steps:
            c = base_c + 0.05 * s + rng.normal(0, 0.02, 40)
            r = base_r + np.where(wrong, drift_wrong * s, -0.02 * s) + rng.normal(0, 0.02, 40)
            fh.write(json.dumps({"step": s, "where": where, "logps/chosen": c.tolist(), "logps/rejected": r.tolist()}) + "\n")
    with open(out / "samples.jsonl", "w") as fh:
        for i in range(10):
            fh.write(json.dumps({"prompt": f"q{i}", "expected": "x", "content_after": bool(i % 3)}) + "\n")


def test_compare_per_kind_with_intervals_and_the_paired_difference(tmp_path):
    from orpo.compare import compare_results, format_numbers

    sft, orpo = write_run(tmp_path / "sft"), write_run(tmp_path / "orpo")
    write_pair_values(sft, [0, 10, 20], drift_wrong=0.03, seed=0)  # SFT lifts the wrong answers
    write_pair_values(orpo, [0, 10, 20], drift_wrong=-0.03, seed=0)  # ORPO pushes them down
    result = compare_results({"SFT": str(sft), "ORPO": str(orpo)})
    kinds = result["kinds"]["SFT"]
    assert set(kinds) == {"all pairs", "chatty rejected", "wrong rejected"} and kinds["wrong rejected"]["pairs"] == 20
    up = kinds["wrong rejected"]["logps/rejected"]
    assert up[-1] - up[0] == pytest.approx(0.6, abs=0.05)
    lo, hi = kinds["wrong rejected"]["logps/rejected_ci"][-1]
    assert lo < up[-1] < hi
    paired = result["paired_orpo_minus_sft"]
    assert paired["wrong rejected"]["logps/rejected"]["distinguishable"]
    assert paired["wrong rejected"]["logps/rejected"]["diff"] == pytest.approx(-1.2, abs=0.05)
    assert not paired["chatty rejected"]["logps/rejected"]["distinguishable"]  # the same in both runs
    assert paired["content accuracy"]["diff"] == 0.0
    text = format_numbers(result)
    assert "wrong rejected: log p rejected: -1.2" in text and "distinguishable from zero: the whole 95% interval is below 0" in text
    assert "chatty rejected: log p rejected" in text and "not distinguishable from zero" in text
    fig = plot_compare({"SFT": sft, "ORPO": orpo}, tmp_path / "figure3.png", title="test")
    assert fig.read_bytes().startswith(PNG_MAGIC) and fig.stat().st_size > 30_000


def test_report_marks_content_lists_regressions_and_shows_intervals(tmp_path):
    from orpo.answers import answer_summary

    out = write_run(tmp_path / "run")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    for r in rows:
        if "eval_logps/chosen" in r:
            r["eval_logps/chosen_ci"] = [r["eval_logps/chosen"] - 0.25, r["eval_logps/chosen"] + 0.25]
            r["eval_rewards/accuracies_ci"] = [0.125, 0.875]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.yaml").write_text("model: null\ndata: null\neval_data: null\nbeta: 0.5\nlr: 0.0002\n")
    q = [([{"role": "user", "content": "What is the capital of Canada?"}], "Ottawa"),
         ([{"role": "user", "content": "What is the capital of Indonesia?"}], "Jakarta")]
    before, after = ["The capital of Canada is Ottawa.", "The capital of Indonesia is Jakarta."], ["Toronto", "Jakarta"]
    answers = answer_summary(q, before, after)
    (out / "summary.json").write_text(json.dumps({"steps": 20, "answer_accuracy": [0.0, 0.5], "answers": answers}))
    with open(out / "samples.jsonl", "w") as fh:
        for (msgs, exp), b, a in zip(q, before, after):
            fh.write(json.dumps({"prompt": msgs[-1]["content"], "expected": exp, "before": b, "after": a,
                                 "correct_before": False, "correct_after": a == exp,
                                 "content_before": True, "content_after": a == exp}) + "\n")
    page = write_report(out).read_text()
    # Right in content but chatty is not a red cross; the regression is listed by name.
    assert "title='right in content, not the bare answer'>≈</span> The capital of Indonesia is Jakarta." in page
    assert "title='wrong'>✗</span> Toronto" in page
    assert "Right in content before training and wrong after: <b>1</b>" in page and "<td>Toronto</td>" in page
    assert "right in content (the answer is in the reply)" in page
    # Held-out values carry their intervals; the config table names the model and the data.
    assert "[0.125, 0.875]" in page and "bootstrap 95% interval" in page
    assert "SmolLM2-135M-Instruct" in page.split("<h2>Config</h2>")[1]
    assert "orpo/data/builtin.py" in page.split("<h2>Config</h2>")[1]



def test_small_values_on_an_axis_read_in_scientific_notation(tmp_path, monkeypatch):
    """The learning-rate plot's tick labels: "1e-4" once on the axis, never "0.000200"."""
    import orpo.report.plots as plots

    labels = {}
    real_png = plots._png

    def spy(fig):
        fig.canvas.draw()
        ax = fig.axes[0]
        labels[ax.get_title()] = [t.get_text() for t in ax.get_yticklabels()] + [ax.yaxis.get_offset_text().get_text()]
        return real_png(fig)

    monkeypatch.setattr(plots, "_png", spy)
    plots.make_plots(load_run(write_run(tmp_path / "run")))
    lr = labels["Learning rate"]
    assert not any("0.0000" in t or "0.000" in t for t in lr), lr
    assert any("10^{−4}" in t or "10^{-4}" in t or "e-4" in t or "−4" in t for t in lr), lr


def test_compare_without_data_runs_the_default_recipe_into_its_own_folder(monkeypatch, capsys):
    import orpo.compare as compare

    seen = {}

    def fake_run(base, orpo_beta, out):
        seen.update(base=base, beta=orpo_beta, out=out)
        return {"kinds": {}, "numbers": {}, "answers": {}, "paired_orpo_minus_sft": {}, "figure": "figure3.png"}

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert main(["compare"]) == 0
    base = seen["base"]
    assert base.data is None and base.lora and base.eval_steps == 8 and not base.overwrite
    assert seen["beta"] == 0.5 and seen["out"] == "runs/compare"  # the recipe's beta, not the default job's folder
    assert main(["compare", "--orpo-beta", "0.2", "--output-dir", "elsewhere"]) == 0
    assert seen["beta"] == 0.2 and seen["out"] == "elsewhere"


def test_compare_with_flags_is_the_default_recipe_with_those_flags_changed(monkeypatch, tmp_path):
    """As for `orpo train`: `orpo compare --data X` trains the default job's recipe with X, not another
    set of defaults (full fine-tuning, lr 5e-6, max length 1024)."""
    import orpo.compare as compare

    seen = {}
    monkeypatch.setattr(compare, "run_compare", lambda base, beta, out: seen.update(base=base, beta=beta, out=out) or
                        {"kinds": {}, "numbers": {}, "answers": {}, "paired_orpo_minus_sft": {}, "figure": "f.png"})
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert main(["compare", "--data", str(data), "--eval-data", str(data), "--max-steps", "5"]) == 0
    base, job = seen["base"], orpo.default_job()
    assert base.data == str(data) and base.max_steps == 5
    assert (base.lora, base.lr, base.batch_size, base.max_length, base.eval_steps) == \
        (job.lora, job.lr, job.batch_size, job.max_length, job.eval_steps)
    assert seen["beta"] == job.beta and seen["out"] == "runs/compare" and not base.overwrite
