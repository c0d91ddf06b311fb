"""Peer parity with TRL's ORPOTrainer (``trl.experimental.orpo``, pinned in the ``test`` extra).

Parity tests feed *the same token ids* to both: TRL tokenizes the rows with its own ``tokenize_row``,
and those ids become our :class:`TokenizedPair` s, which then go through our ``collate`` (prefix
sharing and packing on), ``PolicyForward`` (block attention, chunked lm-head) and ``orpo_loss`` with
``prompt_in_nll=True`` (TRL's convention). TRL's numbers come from calling its own methods
(``concatenated_forward``, ``odds_ratio_loss``, ``get_batch_loss_metrics``, ``training_step``) on its
own collated batch; its training loop is never run. Everything is fp32 and must agree to 1e-5 relative.

Difference tests show where TRL's tokenization or averaging differs from ours and why ours is right;
each one is a row of the table in docs/maths.md.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "trl.experimental is experimental" and friends
    trl_orpo = pytest.importorskip("trl.experimental.orpo")

import datasets  # noqa: E402

from orpo.data.batching import collate, nll_tokens  # noqa: E402
from orpo.data.readers import Pair, normalize_row  # noqa: E402
from orpo.data.templates import TokenizedPair, TokenStats, tokenize_pairs  # noqa: E402
from orpo.forward import PolicyForward  # noqa: E402
from orpo.loss import log_odds, metric_vector, odds_ratio_loss, orpo_loss, sequence_logps, summarize  # noqa: E402

from conftest import CONV_ROWS, PLAIN_ROWS, SHARED_DATA, make_tiny_llama, requires_shared_data, requires_smollm2  # noqa: E402

datasets.disable_progress_bars()
RTOL = 1e-5
BETA = 0.1

# Uneven lengths on purpose: short and long completions in the same batch, so padding, the token-mean
# NLL and the per-pair means all get exercised.
LONG_ROWS = PLAIN_ROWS + [
    {"prompt": "Human: tell me a long story Assistant:", "chosen": " " + "The quick brown fox jumps over the lazy dog. " * 6,
     "rejected": " No."},
]


# ------------------------------------------------------------------------------------------------
# Helpers


def make_trainer(model, tokenizer, rows, tmp_path, max_length=512, beta=BETA, grad_accum=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers renames gradient_checkpointing; TRL still reads it
        cfg = trl_orpo.ORPOConfig(
            output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, max_length=max_length, beta=beta, remove_unused_columns=False,
            per_device_train_batch_size=len(rows), gradient_accumulation_steps=grad_accum,
            save_strategy="no", logging_strategy="no", disable_dropout=True, seed=0,
        )
        return trl_orpo.ORPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                                    processing_class=tokenizer)


def trl_rows(trainer) -> list[dict]:
    ds = trainer.train_dataset
    return [ds[i] for i in range(len(ds))]


def trl_batch(trainer, rows: list[dict]):
    return trainer.data_collator(rows)


def pairs_from_trl(rows: list[dict]) -> list[TokenizedPair]:
    """TRL's token ids as our pairs: the prompt is where TRL's labels are -100."""
    out = []
    for i, r in enumerate(rows):
        pc, pr = r["chosen_labels"].count(-100), r["rejected_labels"].count(-100)
        prompt = r["chosen_input_ids"][:pc]
        assert prompt == r["rejected_input_ids"][:pr], "TRL gave chosen and rejected different prompts"
        assert all(x != -100 for x in r["chosen_labels"][pc:]) and all(x != -100 for x in r["rejected_labels"][pr:])
        out.append(TokenizedPair(np.asarray(prompt, dtype=np.int32), np.asarray(r["chosen_input_ids"][pc:], dtype=np.int32),
                                 np.asarray(r["rejected_input_ids"][pr:], dtype=np.int32), f"trl:{i}"))
    return out


def ours(model, pairs, beta=BETA, sharing=True, packing=True, nll_norm=None, pair_norm=None, chunk=7):
    """Our micro-batch loss with TRL's convention (prompt in the NLL), normalised by the given step totals.
    ``chunk``: lm-head tokens per chunk; 7 makes the tiny tests cross many chunk boundaries."""
    batch = collate(pairs, sharing, packing, prompt_in_nll=True)
    lp = PolicyForward(model, "blocks", chunk=chunk)(batch)
    nll_norm = nll_norm if nll_norm is not None else float(sum(nll_tokens(p, True) for p in pairs))
    pair_norm = pair_norm if pair_norm is not None else float(len(pairs))
    out = orpo_loss(lp, batch.pair, batch.kind, batch.n_pairs, beta, True, nll_norm, pair_norm)
    chosen, rejected = sequence_logps(lp.detach(), batch.pair, batch.kind, batch.n_pairs)
    return out, chosen, rejected


def rel(a, b, scale: float = 0.0) -> float:
    """Largest difference over the largest magnitude of the reference (a scalar or a tensor), or over
    ``scale`` when that is larger. A difference of two fp32 numbers (the log-odds ratio, the reward
    margin) is only as exact as the numbers themselves, so those are measured against the magnitude of
    their operands: a relative error of the result alone would measure the cancellation, not a
    disagreement."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / max(b.abs().max().item(), scale, 1e-30))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_rel(g1: dict, g2: dict) -> float:
    """Worst per-parameter-tensor relative difference (max abs difference over the tensor's max abs)."""
    assert g1.keys() == g2.keys() and g1
    return max(rel(g1[k], g2[k]) for k in g1)


def twin_models(vocab, seed=0):
    """Two identical tiny Llamas: ours switches its config to block attention, TRL's keeps SDPA."""
    a, b = make_tiny_llama(vocab, seed), make_tiny_llama(vocab, seed)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    return a, b


def compare(trl_model, our_model, trainer, rows, sharing=True, packing=True, beta=BETA, out_grads=None,
            chunk=7) -> dict[str, float]:
    """Run both on the same ids; return the relative error of every compared quantity. ``out_grads``, a
    dict, receives both sides' gradients under "trl" and "ours"."""
    batch = trl_batch(trainer, rows)
    pairs = pairs_from_trl(rows)
    n = len(rows)

    # TRL, per pair: logps from concatenated_forward, log-odds from odds_ratio_loss one pair at a time
    with torch.no_grad():
        c_t, r_t, _, _, _ = trainer.concatenated_forward(trl_model, batch)
    per_pair_t = [trainer.odds_ratio_loss(c_t[i : i + 1], r_t[i : i + 1]) for i in range(n)]
    log_odds_t = torch.stack([x[4] for x in per_pair_t])  # the log-odds ratio of each pair
    logsig_t = torch.stack([x[3] for x in per_pair_t])  # log sigmoid of it, = -L_OR
    trl_model.zero_grad()
    loss_t, metrics_t = trainer.get_batch_loss_metrics(trl_model, batch)
    loss_t.backward()
    g_t = grads(trl_model)

    our_model.zero_grad()
    out, c_o, r_o = ours(our_model, pairs, beta, sharing, packing, chunk=chunk)
    out.loss.backward()
    g_o = grads(our_model)
    or_o, ratio_o = odds_ratio_loss(c_o, r_o)
    m_o = summarize(metric_vector(out, n), beta)
    if out_grads is not None:
        out_grads.update(trl=g_t, ours=g_o)

    odds_scale = float(torch.cat([log_odds(c_o), log_odds(r_o)]).abs().max())
    logp_scale = float(torch.cat([c_o, r_o]).abs().max())
    errs = {
        "logps/chosen per pair": rel(c_o, c_t),
        "logps/rejected per pair": rel(r_o, r_t),
        "log odds ratio per pair": rel(ratio_o, log_odds_t, odds_scale),
        "log sigmoid(ratio) per pair": rel(-or_o, logsig_t),
        "loss": rel(out.loss.detach(), loss_t.detach()),
        "grads": grad_rel(g_o, g_t),
    }
    scales = {"log_odds_chosen": odds_scale, "rewards/margins": beta * logp_scale}
    for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected", "rewards/chosen",
              "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        errs[f"metric {k}"] = rel(m_o[k], metrics_t[k], scales.get(k, 0.0))
    errs["metric loss"] = rel(m_o["loss"], loss_t.item())
    return errs


# ------------------------------------------------------------------------------------------------
# Parity on the same ids


@pytest.mark.parametrize("data", ["conv", "plain"])
@pytest.mark.parametrize("sharing,packing", [(True, True), (False, False)])
def test_parity_with_trl_tiny_llama(tmp_path, chatml_tokenizer, data, sharing, packing):
    rows = CONV_ROWS if data == "conv" else LONG_ROWS
    trl_model, our_model = twin_models(len(chatml_tokenizer))
    trainer = make_trainer(trl_model, chatml_tokenizer, rows, tmp_path)
    errs = compare(trl_model, our_model, trainer, trl_rows(trainer), sharing, packing)
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, bad


def test_parity_llama3_template_with_bos(tmp_path, llama3_tokenizer):
    """A template that writes its own BOS (and a tokenizer that would add one): still the same numbers."""
    trl_model, our_model = twin_models(len(llama3_tokenizer))
    trainer = make_trainer(trl_model, llama3_tokenizer, CONV_ROWS, tmp_path)
    rows = trl_rows(trainer)
    bos = llama3_tokenizer.bos_token_id
    assert all(r["prompt_input_ids"][0] == bos and r["prompt_input_ids"][1] != bos for r in rows)
    errs = compare(trl_model, our_model, trainer, rows)
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, bad


def test_odds_ratio_term_matches_trl_on_random_logps(tmp_path, chatml_tokenizer):
    """The odds-ratio term alone, over the whole range of log P a real model produces."""
    trainer = make_trainer(make_tiny_llama(len(chatml_tokenizer)), chatml_tokenizer, PLAIN_ROWS[:1], tmp_path)
    torch.manual_seed(0)
    c = -torch.cat([torch.rand(200) * 30, torch.logspace(-5, 0, 50)])
    r = -torch.cat([torch.rand(200) * 30, torch.logspace(-5, 0, 50).flip(0)])
    c1, r1 = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    losses_t, _, _, _, _ = trainer.odds_ratio_loss(c1, r1)
    (-losses_t.sum()).backward()
    c2, r2 = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    or_o, ratio_o = odds_ratio_loss(c2, r2)
    (BETA * or_o.sum()).backward()
    assert rel(BETA * or_o.detach(), -losses_t.detach()) <= RTOL
    assert rel(c2.grad, c1.grad) <= RTOL and rel(r2.grad, r1.grad) <= RTOL
    # the log-odds ratio itself, per pair
    per_pair = torch.stack([trainer.odds_ratio_loss(c[i : i + 1], r[i : i + 1])[4] for i in range(len(c))])
    assert rel(ratio_o.detach(), per_pair) <= RTOL


@pytest.mark.integration
@requires_smollm2
@requires_shared_data
def test_parity_with_trl_smollm2_on_hh_rlhf(tmp_path):
    """The real SmolLM2-135M-Instruct and its ChatML template on real HH-RLHF conversations.

    Every value (per-pair log-probs and log-odds, NLL, loss, metrics) agrees with TRL to 1e-5 in fp32.
    The parameter gradients of a 30-layer model in fp32 are not reproducible to 1e-5 by *any* two
    implementations that sum in a different order (TRL against itself with eager instead of SDPA
    attention already differs by ~3e-5), so they are compared in fp64, where ours and TRL's agree to
    ~1e-6 (TRL computes its odds-ratio term in fp32 even for an fp64 model). In fp32 our gradient is
    within ~5e-5 of that fp64 gradient, and TRL's own fp32 gradient is ~10x further from it (~4e-4).
    """
    import copy
    import gzip
    import json

    from transformers import AutoModelForCausalLM

    from orpo.model import load_tokenizer, resolve_model

    path = SHARED_DATA / "hh_rlhf_conv_train.jsonl.gz"
    if not path.exists():
        pytest.skip("no hh_rlhf_conv_train.jsonl.gz in ../shared/data")
    raw = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            # short rows keep this test quick on a CPU; the conversation format is what matters
            if len(json.dumps(row)) < 700 and row["chosen"] != row["rejected"]:
                raw.append({"chosen": row["chosen"], "rejected": row["rejected"]})
            if len(raw) == 2:
                break
    folder = resolve_model(None, quiet=True)
    tok = load_tokenizer(folder)
    trl32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    ours32 = copy.deepcopy(trl32)
    trainer = make_trainer(trl32, tok, raw, tmp_path, max_length=1024)
    rows = trl_rows(trainer)
    assert all(r["chosen_input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>") for r in rows)

    g32: dict = {}
    errs = compare(trl32, ours32, trainer, rows, out_grads=g32, chunk=0)  # the default, automatic chunk
    grads_fp32 = errs.pop("grads")
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, ("fp32", bad)

    trl64, ours64 = copy.deepcopy(trl32).double(), copy.deepcopy(ours32).double()
    del trl32, ours32
    g64: dict = {}
    errs64 = compare(trl64, ours64, trainer, rows, out_grads=g64, chunk=0)
    bad = {k: v for k, v in errs64.items() if not v <= RTOL}
    assert not bad, ("fp64", bad)

    ours_err = grad_rel(g32["ours"], g64["ours"])
    trl_err = grad_rel(g32["trl"], g64["ours"])
    assert ours_err <= 1e-4 and ours_err <= trl_err, (ours_err, trl_err, grads_fp32)


# ------------------------------------------------------------------------------------------------
# Where TRL differs, and why ours is right


def our_pairs(rows, tokenizer, max_length=512):
    return tokenize_pairs([normalize_row(r, f"t:{i}") for i, r in enumerate(rows)], tokenizer, max_length)


def test_trl_appends_second_im_end_after_chatml(tmp_path, chatml_tokenizer):
    """ChatML renders an assistant turn as ``content<|im_end|>\\n``. TRL's completion is that text, whose
    last token (``\\n``) is not EOS, so it appends EOS again: the model is trained to write
    ``<|im_end|>\\n<|im_end|>``. Generation stops at the first ``<|im_end|>``, so the two extra tokens are
    never produced at inference, yet they enter the NLL and dilute the length-normalised log P of every
    completion. Ours ends each completion with exactly one ``<|im_end|>``, as the template does."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    trainer = make_trainer(make_tiny_llama(len(tok)), tok, CONV_ROWS, tmp_path)
    theirs = pairs_from_trl(trl_rows(trainer))
    mine = our_pairs(CONV_ROWS, tok)
    for t, m in zip(theirs, mine):
        assert list(t.prompt) == list(m.prompt)  # same prompt, same boundary
        for tc, mc in ((t.chosen, m.chosen), (t.rejected, m.rejected)):
            assert list(mc).count(im_end) == 1 and mc[-1] == im_end
            assert list(tc) == list(mc) + newline + [im_end]
            assert tok.decode(tc).endswith("<|im_end|>\n<|im_end|>")


def test_trl_invents_bos_for_plain_strings(tmp_path, chatml_tokenizer):
    """SmolLM2's tokenizer adds no BOS, and its ``bos_token`` is ``<|im_start|>``. For plain-string rows TRL
    prepends it anyway, so training sees ``<|im_start|>Human: ...`` (a chat-turn opener glued to raw
    text) while ``tokenizer(prompt)`` at inference gives no such token. Ours tokenizes prompt+completion
    exactly as the tokenizer does; completions are otherwise identical."""
    tok = chatml_tokenizer
    trainer = make_trainer(make_tiny_llama(len(tok)), tok, PLAIN_ROWS, tmp_path)
    theirs = pairs_from_trl(trl_rows(trainer))
    mine = our_pairs(PLAIN_ROWS, tok)
    for row, t, m in zip(PLAIN_ROWS, theirs, mine):
        assert list(t.prompt) == [tok.bos_token_id] + list(m.prompt)
        assert list(m.prompt) == tok(row["prompt"])["input_ids"]  # what inference feeds the model
        assert list(t.chosen) == list(m.chosen) and list(t.rejected) == list(m.rejected)


def test_trl_leaves_sequences_longer_than_max_length(tmp_path, chatml_tokenizer):
    """TRL truncates only the completion, to ``max_length - len(prompt)`` tokens, never the prompt; a
    prompt that alone fills ``max_length`` leaves an over-long sequence with an empty completion, whose
    mean log P is 0/0 = NaN, and the loss of the whole batch becomes NaN. Ours cuts the prompt from the
    start first (keeping at least half of ``max_length`` for it), so every sequence fits and every
    completion keeps at least one token."""
    tok = chatml_tokenizer
    long_prompt = "Human: " + "please write a short poem about the sea and the sky. " * 6 + "Assistant:"
    rows = [{"prompt": long_prompt, "chosen": " The sea is blue.", "rejected": " No."}, PLAIN_ROWS[0]]
    max_length = 24
    model = make_tiny_llama(len(tok))
    trainer = make_trainer(model, tok, rows, tmp_path, max_length=max_length)
    tr = trl_rows(trainer)
    assert len(tr[0]["chosen_input_ids"]) > max_length and len(tr[0]["rejected_input_ids"]) > max_length
    assert all(x == -100 for x in tr[0]["chosen_labels"])  # nothing of the completion is left
    with torch.no_grad():
        loss_t, metrics_t = trainer.get_batch_loss_metrics(model, trl_batch(trainer, tr))
    assert math.isnan(loss_t.item()) and math.isnan(metrics_t["logps/chosen"])

    stats = TokenStats()
    mine = tokenize_pairs([normalize_row(r, f"t:{i}") for i, r in enumerate(rows)], tok, max_length, stats=stats)
    assert len(mine) == 2 and stats.prompt_truncated >= 1
    for p in mine:
        assert len(p.prompt) >= 1 and len(p.chosen) >= 1 and len(p.rejected) >= 1
        assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= max_length
    out, c, r = ours(model, mine)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(c).all() and torch.isfinite(r).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_trl_nll_is_a_mean_of_micro_batch_means_under_accumulation(tmp_path, chatml_tokenizer):
    """With gradient accumulation TRL's NLL is each micro-batch's own token mean, averaged over the
    micro-batches (the Trainer divides each loss by the accumulation steps), so a token of a short
    micro-batch weighs more than a token of a long one and the update depends on how the step was split.
    Ours divides every micro-batch's NLL sum by the step's total NLL tokens: accumulating gives exactly
    TRL's own one-big-batch gradient, which is what accumulation is supposed to reproduce."""
    tok = chatml_tokenizer
    rows = [LONG_ROWS[4], LONG_ROWS[1], LONG_ROWS[0], LONG_ROWS[3]]  # a very long completion first
    k = 2
    trl_model, our_model = twin_models(len(tok))
    big = make_trainer(trl_model, tok, rows, tmp_path / "big")
    tr = trl_rows(big)
    trl_model.zero_grad()
    big.get_batch_loss_metrics(trl_model, trl_batch(big, tr))[0].backward()
    g_big = grads(trl_model)

    # TRL's own accumulation path: Trainer.training_step on each micro-batch, k steps per update
    acc = make_trainer(trl_model, tok, rows, tmp_path / "acc", grad_accum=k)
    acc.current_gradient_accumulation_steps = k
    trl_model.zero_grad()
    micro = [tr[:2], tr[2:]]
    for part in micro:
        acc.training_step(trl_model, trl_batch(acc, part))
    g_acc = grads(trl_model)
    # ... which is the gradient of the mean of the micro-batch losses
    trl_model.zero_grad()
    (sum(acc.get_batch_loss_metrics(trl_model, trl_batch(acc, part))[0] for part in micro) / k).backward()
    assert grad_rel(g_acc, grads(trl_model)) <= RTOL
    assert grad_rel(g_acc, g_big) > 1e-2  # TRL: accumulation changes the update

    pairs = pairs_from_trl(tr)
    nll_norm = float(sum(nll_tokens(p, True) for p in pairs))
    our_model.zero_grad()
    for part in (pairs[:2], pairs[2:]):
        ours(our_model, part, nll_norm=nll_norm, pair_norm=float(len(pairs)))[0].loss.backward()
    assert grad_rel(grads(our_model), g_big) <= RTOL  # ours: accumulation is the big batch


def test_trl_odds_ratio_not_finite_for_a_certain_completion(tmp_path, chatml_tokenizer):
    """log P = 0 (every token at probability 1 in fp32) makes TRL's log odds infinite. A certain
    *rejected* completion gives an infinite loss and NaN gradients (for the whole batch's backward: the
    NaN comes from 0 * inf, so it also appears with a zero incoming gradient). Ours clamps log P at -1e-6
    (``orpo.loss.LOGP_MAX``) and stays finite."""
    trainer = make_trainer(make_tiny_llama(len(chatml_tokenizer)), chatml_tokenizer, PLAIN_ROWS[:1], tmp_path)

    def run(fn):
        c = torch.tensor([-2.0, 0.0, -1e-9], requires_grad=True)
        r = torch.tensor([0.0, -1.0, -3.0], requires_grad=True)
        loss = fn(c, r)
        loss.backward()
        return loss.detach(), c.grad, r.grad

    loss_t, gc_t, gr_t = run(lambda c, r: -trainer.odds_ratio_loss(c, r)[0].mean())
    assert not math.isfinite(loss_t.item()) and not torch.isfinite(gr_t).all()
    loss_o, gc_o, gr_o = run(lambda c, r: BETA * odds_ratio_loss(c, r)[0].mean())
    assert math.isfinite(loss_o.item()) and torch.isfinite(gc_o).all() and torch.isfinite(gr_o).all()
