"""Held-out numbers: per-pair values and intervals from evaluate_pairs, the built-in data's kinds, and
the default job's answer summary (right in content counted, regressions listed)."""

import numpy as np
import pytest

from orpo.answers import answer_summary, summary_lines
from orpo.data.builtin import builtin_pairs, heldout_pairs, heldout_questions, is_right_in_content, rejected_kind
from orpo.data.prepare import prepare_pairs
from orpo.evaluate import VALUE_COLUMNS, evaluate_pairs
from orpo.forward import PolicyForward

from conftest import make_tiny_llama


@pytest.fixture
def heldout_store(chatml_tokenizer):
    store, _stats, _ = prepare_pairs(None, chatml_tokenizer, 128, pairs=heldout_pairs()[:20], label="held-out", cache=False)
    return store


def test_per_pair_values_agree_with_the_means_and_carry_intervals(chatml_tokenizer, heldout_store):
    policy = PolicyForward(make_tiny_llama(len(chatml_tokenizer)))
    m, values = evaluate_pairs(policy, heldout_store, 0.1, False, batch_size=6, keep_values=True)
    assert values.shape == (len(heldout_store), len(VALUE_COLUMNS))
    c, r = values[:, 1], values[:, 2]
    assert m["eval_logps/chosen"] == pytest.approx(c.mean(), abs=1e-5)
    assert m["eval_logps/rejected"] == pytest.approx(r.mean(), abs=1e-5)
    assert m["eval_rewards/accuracies"] == pytest.approx((c > r).mean())
    assert m["eval_nll_loss"] == pytest.approx(values[:, 4].sum() / values[:, 5].sum(), rel=1e-5)  # token-weighted
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "nll_loss", "logp_margin"):
        lo, hi = m[f"eval_{key}_ci"]
        point = m["eval_logp_margin"] if key == "logp_margin" else m[f"eval_{key}"]
        assert lo <= point <= hi and lo < hi, key


def test_shares_evaluated_apart_and_summed_give_the_whole_table(chatml_tokenizer, heldout_store):
    """Two processes' shares (rank::2), gathered by one sum-reduce: the numbers of one process that saw all."""
    policy = PolicyForward(make_tiny_llama(len(chatml_tokenizer)))
    n = len(heldout_store)
    whole, v_all = evaluate_pairs(policy, heldout_store, 0.1, False, batch_size=4, keep_values=True)
    sent = []  # what process 1 contributes to each all-reduce, in call order

    def keep(t):
        sent.append(t.clone())
        return t

    evaluate_pairs(policy, heldout_store[1::2], 0.1, False, batch_size=4, reduce=keep, positions=range(1, n, 2), n_total=n)
    calls = iter(sent)
    m, v = evaluate_pairs(policy, heldout_store[0::2], 0.1, False, batch_size=4, reduce=lambda t: t + next(calls),
                          positions=range(0, n, 2), n_total=n, keep_values=True)
    np.testing.assert_allclose(v, v_all, atol=1e-5)
    assert m["eval_pairs"] == n
    for key in ("eval_logps/chosen", "eval_rewards/accuracies", "eval_nll_loss"):
        assert m[key] == pytest.approx(whole[key], abs=1e-5)
    assert m["eval_rewards/accuracies_ci"] == whole["eval_rewards/accuracies_ci"]


def test_builtin_pairs_say_which_kind_of_rejected_answer_they_hold():
    held = heldout_pairs()
    kinds = [rejected_kind(p.where) for p in held]
    assert set(kinds) == {"chatty", "wrong"} and kinds.count("chatty") == kinds.count("wrong")
    assert {rejected_kind(p.where) for p in builtin_pairs()} == {"chatty", "wrong"}
    assert rejected_kind("data.jsonl:3") is None and rejected_kind("data.jsonl: row 3") is None


def test_a_wrong_capital_is_the_plausible_mistake_not_another_countrys_capital():
    """The wrong answer to "What is the capital of Canada?" is Toronto (a city of Canada that is not its
    capital), in training and held out: "Paris" would teach the odds-ratio term nothing."""
    from orpo.data.builtin import CAPITALS, NOT_CAPITAL

    capitals = dict(CAPITALS)
    seen = 0
    for p in builtin_pairs() + heldout_pairs():
        if ":capital:" in p.where and rejected_kind(p.where) == "wrong":
            country = next(c for c in capitals if p.prompt[-1]["content"].endswith(f" {c}?"))
            assert p.rejected[-1]["content"] == NOT_CAPITAL[country] != capitals[country]
            seen += 1
    assert seen >= 2 * len(CAPITALS)  # two wordings of every question, each against one wrong answer
    assert set(NOT_CAPITAL) == set(capitals) and not set(NOT_CAPITAL.values()) & set(capitals.values())


def test_the_kind_survives_tokenization(chatml_tokenizer):
    """The training loop's held-out store names pair i by its row; the kind is found from that."""
    from orpo.data.builtin import HELDOUT_LABEL

    held = heldout_pairs(seed=3)
    store, _stats, _ = prepare_pairs(None, chatml_tokenizer, 128, pairs=held, label=HELDOUT_LABEL, cache=False)
    assert len(store) == len(held)
    assert [rejected_kind(store[i].where) for i in range(len(store))] == [rejected_kind(p.where) for p in held]
    questions = heldout_questions()
    held_prompts = {p.prompt[-1]["content"] for p in held}
    assert all(q[-1]["content"] in held_prompts for q, _ in questions)
    assert not held_prompts & {p.prompt[-1]["content"] for p in builtin_pairs()}


def test_right_in_content_is_not_the_format():
    assert is_right_in_content("The capital of Canada is Ottawa, Canada.", "Ottawa", "What is the capital of Canada?")
    assert not is_right_in_content("Toronto", "Ottawa", "What is the capital of Canada?")
    assert is_right_in_content("Comparing 34 and 78, the larger number is 78.", "78", "Which number is larger, 34 or 78?")
    assert is_right_in_content("78 is larger than 34.", "78", "Which number is larger, 78 or 34?")
    assert not is_right_in_content("34", "78", "Which number is larger, 34 or 78?")
    assert is_right_in_content("The word 'apple' starts with the letter 'a'.", "a", "Which letter does 'apple' start with?")
    assert not is_right_in_content("It is a fruit.", "a", "Which letter does 'apple' start with?")
    assert not is_right_in_content("Mexico", "Mexico City", "What is the capital of Mexico?")


def test_default_job_summary_counts_content_and_lists_regressions():
    q = lambda text, answer: ([{"role": "user", "content": text}], answer)  # noqa: E731
    questions = [q("What is the capital of Canada?", "Ottawa"), q("What is the capital of Indonesia?", "Jakarta"),
                 q("Which number is larger, 12 or 40?", "40"), q("What is the opposite of 'hot'?", "cold")]
    before = ["The capital of Canada is Ottawa.", "The capital of Indonesia is Jakarta.", "12", "cold"]
    after = ["Toronto", "Jakarta", "40", "cold"]
    d = answer_summary(questions, before, after)
    assert d["exact_before"] == 0.25 and d["exact_after"] == 0.75
    assert d["content_before"] == 0.75 and d["content_after"] == 0.75
    assert [(r["question"], r["expected"]) for r in d["regressions"]] == [("What is the capital of Canada?", "Ottawa")]
    assert d["fixed"] == 1
    assert d["families"]["capital"] == {"questions": 2, "exact_before": 0, "exact_after": 1, "content_before": 2,
                                        "content_after": 1}
    lo, hi = d["content_before_ci"]
    assert lo <= 0.75 <= hi
    text = "\n".join(summary_lines(d))
    assert "answered exactly (bare answer): 25%" in text and "-> 75%" in text
    assert "right in content (answer in the reply): 75%" in text
    assert "right before and wrong after: 1:" in text and "'Toronto'" in text
