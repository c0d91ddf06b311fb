"""Held-out preference metrics and greedy generations.

``evaluate_pairs`` runs the training forward and loss without gradients over held-out pairs and
returns the same metrics as training with an ``eval_`` prefix: the NLL token-weighted over the whole
set, everything else averaged over pairs. ``generate`` gives greedy (or sampled) answers for chat or
plain prompts, batched with left padding.
"""

from __future__ import annotations

import torch

from .data.batching import collate, nll_tokens
from .data.templates import TokenizedPair
from .loss import metric_vector, orpo_loss, summarize


@torch.no_grad()
def evaluate_pairs(
    policy,
    pairs: list[TokenizedPair],
    beta: float,
    prompt_in_nll: bool,
    batch_size: int = 8,
    prefix_sharing: bool = True,
    packing: bool = True,
    pad_id: int = 0,
    device=None,
    autocast=None,
    reduce=None,
) -> dict[str, float]:
    """Eval metrics over ``pairs`` (this process's share). ``reduce`` sums a tensor across processes;
    ``autocast`` is a context manager factory for mixed precision."""
    was_training = policy.training
    policy.eval()
    total = None
    nll_norm = float(sum(nll_tokens(p, prompt_in_nll) for p in pairs)) or 1.0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        batch = collate(chunk, prefix_sharing=prefix_sharing, packing=packing, prompt_in_nll=prompt_in_nll, pad_id=pad_id)
        if device is not None:
            batch = batch.to(device)
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            logps = policy(batch)
        part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, beta, prompt_in_nll, nll_norm, len(pairs))
        vec = metric_vector(part, batch.n_pairs)
        total = vec if total is None else total + vec
    if total is None:
        total = torch.zeros(4 + 8, dtype=torch.float64, device=device)
    if reduce is not None:
        total = reduce(total)
    total = total.cpu()
    if was_training:
        policy.train()
    metrics = summarize(total, beta)
    metrics["pairs"] = int(total[3].item())
    return {f"eval_{k}": v for k, v in metrics.items()}


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
    """``orpo eval``: the eval_ metrics of ``cfg.model`` on ``cfg.eval_data`` (a TrainConfig)."""
    import sys

    from .data.chat_templates import set_chat_template
    from .data.prepare import prepare_pairs
    from .forward import PolicyForward, resolve_attention
    from .model import load_model, load_tokenizer, loading_options, resolve_model

    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    set_chat_template(tokenizer, cfg.chat_template, say=lambda m: print(m, file=sys.stderr, flush=True))
    pairs, stats, report = prepare_pairs(
        cfg.eval_data, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.eval_max_rows, cfg.strict,
        columns=cfg.columns, num_proc=cfg.dataset_num_proc, max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode,
    )
    print(report, file=sys.stderr, flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, cfg.trust_remote_code, cfg.allow_pickle, device=device, **loading_options(cfg))
    policy = PolicyForward(model, resolve_attention(cfg.attention, device), cfg.logits_chunk)
    bf16 = cfg.precision == "bf16"
    metrics = evaluate_pairs(
        policy, pairs, cfg.beta, cfg.prompt_in_nll, batch_size=max(2, cfg.batch_size * 4),
        prefix_sharing=cfg.prefix_sharing, packing=cfg.packing, pad_id=tokenizer.pad_token_id or 0, device=device,
        autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
    )
    metrics["eval_truncated_prompts"] = stats.prompt_truncated
    metrics["eval_skipped"] = stats.skips.total
    return metrics
