"""Held-out preference metrics and greedy generations.

``evaluate_pairs`` runs the training forward and loss without gradients over held-out pairs and
returns the same metrics as training with an ``eval_`` prefix: the NLL token-weighted over the whole
set, everything else averaged over pairs, each with its bootstrap 95% interval (``eval_<name>_ci``). ``generate`` gives greedy (or sampled) answers for chat or
plain prompts, batched with left padding.

Several processes split the held-out pairs ``rank::world``, so one may hold a pair more than another,
and a batch more. Under FSDP and DeepSpeed ZeRO-3 every forward is a collective (it gathers the
weights), so a process with a batch more would wait forever for the others. Each process therefore runs
:func:`lockstep_batches` batches, the same number everywhere; one that has run out of pairs forwards a
padding batch (one pair, weight 0: its metrics are not added), as the training loop does for a short
last step.
"""

from __future__ import annotations

import math

import torch

from .data.batching import nll_tokens
from .data.templates import TokenizedPair
from .loss import (KIND_CHOSEN, KIND_PROMPT, METRIC_SIZE, metric_vector, odds_ratio_loss, orpo_loss, sequence_logps,
                   summarize)
from .stats import bootstrap_mean_ci, bootstrap_ratio_ci


# Per-pair values kept by evaluate_pairs, one column each (see PairValues).
VALUE_COLUMNS = ("weight", "logps/chosen", "logps/rejected", "log_odds_chosen", "nll_sum", "nll_tokens")


def lockstep_batches(n_pairs: int, world: int, batch_size: int) -> int:
    """Batches every process runs over ``n_pairs`` split ``rank::world``: those of the largest share."""
    return math.ceil(math.ceil(n_pairs / max(world, 1)) / batch_size)


@torch.no_grad()
def evaluate_pairs(
    policy,
    pairs: list[TokenizedPair],
    beta: float,
    prompt_in_nll: bool,
    batch_size: int = 8,
    collate_fn=None,
    pad_id: int = 0,
    device=None,
    autocast=None,
    reduce=None,
    n_batches: int | None = None,
    pad_pair: TokenizedPair | None = None,
    positions=None,
    n_total: int | None = None,
    keep_values: bool = False,
):
    """Eval metrics over ``pairs`` (this process's share). ``reduce`` sums a tensor across processes;
    ``autocast`` is a context manager factory for mixed precision; ``collate_fn(pairs, prompt_in_nll,
    pad_id)`` lays a batch out (the policy's own ``collate``, by default). ``n_batches`` (with
    ``pad_pair``, any held-out pair) makes this process run exactly that many forwards, padding with
    weight 0.

    Besides the means, every pair's own values are kept in an (n_total, 6) fp64 table (columns
    ``VALUE_COLUMNS``), row ``positions[i]`` for ``pairs[i]`` (its index in the whole held-out set;
    default ``range(len(pairs))``). Rows no process filled keep weight 0, so under several processes
    one sum-``reduce`` gathers the whole table, and a padding pair that enters no row is left out.
    The table gives the bootstrap 95% intervals (``stats``), stored as ``eval_<metric>_ci: [lo, hi]``.
    With ``keep_values`` the return is ``(metrics, table)``, the table a numpy array of the real pairs.
    """
    was_training = policy.training
    policy.eval()
    total = None
    positions = list(range(len(pairs))) if positions is None else [int(i) for i in positions]
    n_total = len(pairs) if n_total is None else int(n_total)
    table = torch.zeros(n_total, len(VALUE_COLUMNS), dtype=torch.float64, device=device)
    nll_norm = float(sum(nll_tokens(p, prompt_in_nll) for p in pairs)) or 1.0
    if n_batches is None:
        n_batches = math.ceil(len(pairs) / batch_size)
    for b in range(n_batches):
        chunk = pairs[b * batch_size : (b + 1) * batch_size]
        padding = not chunk
        if padding:  # keep in step with the processes that still have pairs; add nothing
            chunk = [pad_pair if pad_pair is not None else pairs[0]]
        batch = (collate_fn or _unwrap(policy).collate)(chunk, prompt_in_nll, pad_id)
        if device is not None:
            batch = batch.to(device)
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            logps = policy(batch)
        part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, beta, prompt_in_nll, nll_norm, len(pairs))
        if padding:
            continue
        vec = metric_vector(part, batch.n_pairs)
        total = vec if total is None else total + vec
        s = b * batch_size
        rows = torch.tensor(positions[s : s + batch.n_pairs], dtype=torch.long, device=table.device)
        table[rows] = _pair_values(logps, batch, prompt_in_nll).to(table.device)
    if total is None:
        total = torch.zeros(METRIC_SIZE, dtype=torch.float64, device=device)
    if reduce is not None:
        total = reduce(total)
        table = reduce(table)
    total, table = total.cpu(), table.cpu()
    if was_training:
        policy.train()
    metrics = summarize(total, beta)
    metrics["pairs"] = int(total[3].item())
    values = table[table[:, 0] > 0].numpy()
    out = {f"eval_{k}": v for k, v in metrics.items()}
    out.update(intervals(values, beta))
    return (out, values) if keep_values else out


def _pair_values(logps: torch.Tensor, batch, prompt_in_nll: bool) -> torch.Tensor:
    """(n_pairs, 6) per-pair values of one batch, in ``VALUE_COLUMNS`` order."""
    chosen, rejected = sequence_logps(logps, batch.pair, batch.kind, batch.n_pairs)
    _, ratio = odds_ratio_loss(chosen, rejected)
    nll_mask = batch.kind == KIND_CHOSEN
    if prompt_in_nll:
        nll_mask = nll_mask | (batch.kind == KIND_PROMPT)
    idx = batch.pair[nll_mask]
    nll_sum = logps.new_zeros(batch.n_pairs).index_add(0, idx, -logps[nll_mask])
    nll_tok = torch.bincount(idx, minlength=batch.n_pairs).to(logps.dtype)
    cols = (torch.ones_like(chosen), chosen, rejected, ratio, nll_sum, nll_tok)
    return torch.stack([c.double() for c in cols], dim=1)


def intervals(values, beta: float) -> dict[str, list[float]]:
    """Bootstrap 95% intervals from a per-pair table (rows = real pairs, ``VALUE_COLUMNS``):
    ``eval_<metric>_ci`` for the mean log-probs, the margins, the accuracy, the log-odds ratio and
    the token-weighted NLL, plus the beta-free gap ``eval_logp_margin`` (mean chosen - rejected log p)."""
    if len(values) == 0:
        return {}
    c, r, ratio = values[:, 1], values[:, 2], values[:, 3]
    out = {"eval_logp_margin": float((c - r).mean())}
    for key, x in (("logps/chosen", c), ("logps/rejected", r), ("logp_margin", c - r),
                   ("rewards/margins", beta * (c - r)), ("rewards/accuracies", (c > r).astype(float)),
                   ("log_odds_chosen", ratio)):
        ci = bootstrap_mean_ci(x)
        if ci is not None:
            out[f"eval_{key}_ci"] = ci
    ci = bootstrap_ratio_ci(values[:, 4], values[:, 5])
    if ci is not None:
        out["eval_nll_loss_ci"] = ci
    return out


def _unwrap(policy):
    while not hasattr(policy, "collate") and hasattr(policy, "module"):
        policy = policy.module
    return policy


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device=None,
) -> list[str]:
    """Answers to ``prompts``: message lists go through the chat template, strings are tokenized as
    they are, token-id sequences are used unchanged. Greedy when ``temperature`` is 0."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            first = chunk[0]
            if isinstance(first, list) and first and isinstance(first[0], dict):
                texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            elif isinstance(first, str):
                enc = tokenizer(list(chunk), return_tensors="pt", padding=True)
            else:  # token ids, used exactly as given
                enc = _left_pad([list(map(int, ids)) for ids in chunk], tokenizer.pad_token_id or 0)
            if device is not None:
                enc = enc.to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return [o.strip() for o in outs]


def _left_pad(seqs: list[list[int]], pad_id: int) -> dict:
    n = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, n - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, n - len(x) :] = 1
    from transformers import BatchEncoding

    return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def evaluate_model(cfg) -> dict:
    """``orpo eval``: the eval_ metrics of ``cfg.model`` on ``cfg.eval_data`` (a TrainConfig); with no
    eval_data, on the built-in held-out set of ``cfg.seed`` (the default job's)."""
    import sys

    from .data.chat_templates import set_chat_template
    from .data.prepare import prepare_pairs
    from .forward import PolicyForward
    from .model import disable_dropout, load_model, load_tokenizer, loading_options, resolve_model
    from .precision import resolve as resolve_precision
    from .support import choose_paths

    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    set_chat_template(tokenizer, cfg.chat_template, say=lambda m: print(m, file=sys.stderr, flush=True))
    builtin = {}
    if cfg.eval_data is None:  # a run on the built-in dataset: its held-out set (config/runs.py)
        from .data.builtin import HELDOUT_LABEL, heldout_pairs

        builtin = {"pairs": heldout_pairs(cfg.seed), "label": HELDOUT_LABEL}
    pairs, stats, report = prepare_pairs(
        cfg.eval_data, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.eval_max_rows, cfg.strict, **builtin,
        columns=cfg.columns, num_proc=cfg.dataset_num_proc, max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode,
    )
    print(report, file=sys.stderr, flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # an adapter stays unmerged: the model computes as it did when its run evaluated it
    model = load_model(folder, cfg.trust_remote_code, cfg.allow_pickle, device=device, merge=False,
                       **loading_options(cfg))
    disable_dropout(model)
    cfg.precision, why = resolve_precision(cfg.precision, device.type)  # (a run folder's config gives its own)
    if why:
        print(why, file=sys.stderr, flush=True)
    paths = choose_paths(model, cfg, device, lambda msg: print(msg, file=sys.stderr, flush=True))
    policy = PolicyForward(model, paths, cfg.logits_chunk)
    bf16 = cfg.precision == "bf16"
    metrics = evaluate_pairs(
        policy, pairs, cfg.beta, cfg.prompt_in_nll, batch_size=cfg.resolved_eval_batch_size(),
        pad_id=tokenizer.pad_token_id or 0, device=device,
        autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
    )
    metrics["eval_truncated_prompts"] = stats.prompt_truncated
    metrics["eval_skipped"] = stats.skips.total
    return metrics


def write_pair_values(path, step: int, pairs, values) -> None:
    """Append one evaluation's per-pair values to ``OUT/eval_pairs.jsonl``: one JSON object with the
    step, each pair's ``where`` (its source, the key that matches pairs across runs) and the columns
    of ``values`` (rows in the order of ``pairs``). A resumed run may write a step twice; readers keep
    the later row."""
    import json

    row = {"step": int(step), "where": [pairs[i].where for i in range(len(pairs))]}
    for j, name in enumerate(VALUE_COLUMNS[1:], start=1):
        row[name] = [round(float(x), 6) for x in values[:, j]]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
