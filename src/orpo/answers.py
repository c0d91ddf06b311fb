"""The default job's held-out answers, counted the way a user reading ``samples.jsonl`` would.

Two questions about each greedy answer, before and after training:

    exact       the reply is the expected answer and nothing else (the format the chosen answers teach)
    in content  the reply holds the expected answer ("The capital of Canada is Ottawa." counts)

and the questions whose answer was right in content before training and is not after: what training
broke, listed by name, so a rise in the exact share can never hide a loss of knowledge. Shares carry a
bootstrap 95% interval over the questions, and the change in each share a paired one.
"""

from __future__ import annotations

from .data.builtin import family_of, is_correct, is_right_in_content
from .stats import bootstrap_mean_ci, paired_difference


def _question(q) -> str:
    return q[-1]["content"] if isinstance(q, list) and q else str(q)


def answer_summary(questions: list[tuple], before: list[str], after: list[str]) -> dict:
    """Counts over ``questions`` [(prompt messages, expected answer)] of the answers ``before`` and
    ``after`` (same order). Returns shares, their intervals, per-family counts and the regressions."""
    n = len(questions)
    marks = {}
    for side, answers in (("before", before), ("after", after)):
        marks[side] = {
            "exact": [float(is_correct(a or "", q[1])) for a, q in zip(answers, questions)],
            "content": [float(is_right_in_content(a or "", q[1], _question(q[0]))) for a, q in zip(answers, questions)],
        }
    out: dict = {"questions": n}
    for kind in ("exact", "content"):
        for side in ("before", "after"):
            xs = marks[side][kind]
            out[f"{kind}_{side}"] = sum(xs) / n if n else 0.0
            out[f"{kind}_{side}_ci"] = bootstrap_mean_ci(xs)
        if n:
            out[f"{kind}_change"] = paired_difference(marks["after"][kind], marks["before"][kind])
    families: dict[str, dict] = {}
    for i, (q, _answer) in enumerate(questions):
        f = families.setdefault(family_of(_question(q[0])), {"questions": 0, "exact_before": 0, "exact_after": 0,
                                                             "content_before": 0, "content_after": 0})
        f["questions"] += 1
        for kind in ("exact", "content"):
            for side in ("before", "after"):
                f[f"{kind}_{side}"] += int(marks[side][kind][i])
    out["families"] = families
    out["regressions"] = [
        {"question": _question(q[0]), "expected": q[1], "before": before[i], "after": after[i]}
        for i, q in enumerate(questions) if marks["before"]["content"][i] and not marks["after"]["content"][i]
    ]
    out["fixed"] = sum(1 for i in range(n) if marks["after"]["content"][i] and not marks["before"]["content"][i])
    return out


def _share(d: dict, key: str) -> str:
    n = d["questions"]
    ci = d.get(f"{key}_ci")
    span = f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else ""
    return f"{d[key]:.0%}{span} ({round(d[key] * n)}/{n})"


def summary_lines(d: dict) -> list[str]:
    """The default job's last lines: what a user will see in its samples."""
    lines = [
        f"held-out questions ({d['questions']}), before -> after training, with 95% intervals:",
        f"  answered exactly (bare answer): {_share(d, 'exact_before')} -> {_share(d, 'exact_after')}",
        f"  right in content (answer in the reply): {_share(d, 'content_before')} -> {_share(d, 'content_after')}",
    ]
    fams = ", ".join(f"{name} {f['content_before']}->{f['content_after']}/{f['questions']}"
                     for name, f in sorted(d["families"].items()))
    lines.append(f"  right in content by family: {fams}")
    regs = d["regressions"]
    lines.append(f"  right before and wrong after: {len(regs)}" + (":" if regs else "") +
                 f" (wrong before and right after: {d['fixed']})")
    for r in regs:
        lines.append(f"    {r['question']} expected {r['expected']!r}: {r['before']!r} -> {r['after']!r}")
    return lines


def sample_marks(reply: str | None, answer: str, question: str) -> dict:
    """The marks samples.jsonl stores for one answer: exact and in content."""
    return {"exact": is_correct(reply or "", answer), "content": is_right_in_content(reply or "", answer, question)}
