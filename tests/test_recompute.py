"""Layer checkpointing on a budget (orpo.recompute): measured bytes per token, the fewest layers that fit,
and the same numbers as a run that keeps every activation."""

import json

import torch

import orpo
from archs import build
from conftest import PLAIN_ROWS
from orpo import recompute
from orpo.forward import PolicyForward
from orpo.multimodal import decoder_layers


def test_the_fewest_layers_that_fit():
    # 1,000 tokens, 10 layers of 100 bytes per token over 50 for the rest: 1.05 MB with none checkpointed
    assert recompute.layers_to_checkpoint(1050, 100, 10, 1000, 2_000_000) == 0
    # k layers: 1000 * (1050 - 100 k + 100) <= 600,000  ->  k >= 5.5
    assert recompute.layers_to_checkpoint(1050, 100, 10, 1000, 600_000) == 6
    assert recompute.layers_to_checkpoint(1050, 100, 10, 1000, 1) == 10
    assert recompute.spread(3, 10) == [0, 3, 6] and recompute.spread(12, 10) == list(range(10))


def test_largest_micro_batch_bounds_the_packed_and_the_separate_rows():
    from orpo.support import synthetic_pairs

    pairs = synthetic_pairs(100)  # (8, 7, 5) and (5, 10, 8)
    assert recompute.largest_micro_batch(pairs, 1, True, True) == 23
    assert recompute.largest_micro_batch(pairs, 2, True, True) == 43
    assert recompute.largest_micro_batch(pairs, 2, False, True) == 28 + 28
    assert recompute.largest_micro_batch(pairs, 2, False, False) == 2 * 2 * 15


def test_measured_bytes_predict_what_checkpointing_saves():
    """S and a, measured at two short lengths, predict the bytes a longer forward keeps with and without
    some of the layers checkpointed (within 15%): a wrong slope or a layer that keeps nothing would show."""
    model = build("llama").train()
    policy = PolicyForward(model, "blocks")
    layers = decoder_layers(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    per_token, per_layer = recompute.measure(policy, layers, vocab, None)
    assert per_layer > 0 and per_token > len(layers) * per_layer
    long = recompute._pairs(vocab, 1024)
    tokens = policy.collate(long, False).computed_tokens
    plain = recompute._forward_kept(policy, long, None)
    some = recompute.spread(max(1, len(layers) // 2), len(layers))
    recompute.set_checkpointed(layers, some)
    try:
        half = recompute._forward_kept(policy, long, None)
    finally:
        recompute.set_checkpointed(layers, [])
    assert abs(plain - tokens * per_token) < 0.15 * plain
    assert abs((plain - half) - len(some) * tokens * per_layer) < 0.15 * (plain - half)


def test_a_run_over_its_budget_recomputes_layers_and_keeps_its_numbers(tmp_path, tiny_model_dir, capsys):
    def run(name, budget):
        cfg = orpo.TrainConfig(model=str(tiny_model_dir), data=PLAIN_ROWS * 3, output_dir=str(tmp_path / name),
                               max_steps=3, batch_size=2, precision="fp32", lr=1e-3, save_steps=0, eval_samples=0,
                               activation_memory=budget)
        orpo.train(cfg)
        out = capsys.readouterr()
        rows = [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "tokens_per_s")}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows, out.out + out.err

    kept, said = run("kept", 0)
    assert "recompute in the backward" not in said
    tight, said = run("tight", 1e-6)  # 1 KB: every layer recomputes
    assert "2 of 2 layers recompute in the backward pass" in said, said
    assert json.loads((tmp_path / "tight" / "summary.json").read_text())["paths"]["recomputed_layers"] == 2
    assert tight == kept


def test_the_default_budget_leaves_room_for_gradients_and_states(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * recompute.GIB, 80 * recompute.GIB))
    cuda = torch.device("cuda", 0)
    assert recompute.default_budget(cuda) == 20 * recompute.GIB
    # 1B trained parameters: 12 GB of fp32 gradients and AdamW states come later
    assert recompute.default_budget(cuda, 10**9) == int((40 * recompute.GIB - 12 * 10**9) * 0.5)
    assert recompute.default_budget(cuda, 10**10) == 1  # nothing left: every layer recomputes
    assert 0 < recompute.default_budget(torch.device("cpu")) <= recompute.CPU_BUDGET
