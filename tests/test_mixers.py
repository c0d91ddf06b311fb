"""Hybrid models packed where proven (orpo.mixers): LFM2's short convolution reads only its own
sequence in a packed, prefix-shared row; a convolution that leaks across a boundary is rejected by the
start-up check; and on the tiny LFM2, LFM2-MoE and LFM3 models every packed layout gives the stock model's
step-1 metrics and gradients, under LoRA (the default recipe's all-linear) and full fine-tuning, with
every prompt and completion longer than the kernel so that each boundary sits inside a conv window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orpo import mixers, support
from orpo.data.batching import collate
from orpo.data.templates import TokenizedPair
from orpo.forward import Paths, PolicyForward
from orpo.loss import metric_vector, orpo_loss, summarize
from orpo.model import add_lora

from archs import VOCAB, build, stock_logps

BETA = 0.3
HYBRIDS = ["lfm2", "lfm2_moe", "lfm3"]  # every mixer type orpo.mixers tells where sequences start


def _pairs(seed=3, shapes=((6, 5, 7), (4, 9, 4), (5, 4, 6))):
    """Three pairs, every prompt and completion longer than LFM2's kernel (3): in a packed row each
    sequence's first tokens have the previous pair (or, under prefix sharing, the chosen completion)
    inside their window."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, VOCAB, n).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r), f"t:{i}") for i, (p, c, r) in enumerate(shapes)]


def test_predecessors_follow_each_sequence():
    pairs = _pairs(shapes=((3, 2, 2), (2, 2, 3)))
    layout = collate(pairs, prefix_sharing=True, packing=True).layout  # [p0 c0 r0 p1 c1 r1], 14 tokens
    one, two = mixers.predecessor_chain(layout, layout.length, 3, "cpu")
    none = layout.length
    assert one.tolist() == [none, 0, 1, 2, 3, 2, 5, none, 7, 8, 9, 8, 11, 12]
    assert two.tolist() == [none, none, 0, 1, 2, 1, 2, none, none, 7, 8, 7, 8, 11]


def test_sequence_conv_is_conv1d_on_each_sequence_alone():
    """With a bias, over rows FlexAttention pads, for the prompt+chosen and prompt+rejected sequences of
    every pair; the rejected completion's gradient reaches the prompt's last tokens."""
    torch.manual_seed(0)
    pairs = _pairs()
    layout = collate(pairs, prefix_sharing=True, packing=False).layout  # one group per row, right-padded
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, bias=True, padding=3).double()
    t = layout.length + 5
    x = torch.randn(layout.rows, 8, t, dtype=torch.float64, requires_grad=True)  # (R, D, T), as conv1d takes it
    y = mixers.sequence_conv(x.transpose(1, 2), conv, layout).transpose(1, 2)
    for g in layout.groups:
        prompt = list(range(g.start, g.start + g.prompt_len))
        for cs, n in g.completions:
            seq = prompt + list(range(cs, cs + n))
            ref = F.conv1d(x[g.row : g.row + 1, :, seq], conv.weight, conv.bias, padding=3, groups=8)[..., : len(seq)]
            torch.testing.assert_close(y[g.row, :, cs : cs + n], ref[0, :, -n:], rtol=0, atol=1e-12)
        torch.testing.assert_close(y[g.row, :, prompt], ref[0, :, : g.prompt_len], rtol=0, atol=1e-12)
    g = layout.groups[0]
    (cs, n) = g.completions[1]
    (grad,) = torch.autograd.grad(y[g.row, :, cs].sum(), x)
    end = g.start + g.prompt_len
    assert grad[g.row, :, end - 3 : end].abs().min() > 0  # the prompt's last k - 1 tokens
    assert grad[g.row, :, end : cs].abs().max() == 0  # never the chosen completion


def test_a_leaking_conv_is_rejected_by_the_check(monkeypatch):
    """A short convolution run by plain conv1d over the packed row reads the previous sequence's
    last tokens: the check, not a name list, must refuse every packed path."""

    def leaky(x, conv, layout):  # x (R, T, D)
        k = int(conv.kernel_size[0])
        out = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=k - 1, groups=x.shape[-1])
        return out[..., : x.shape[1]].transpose(1, 2)

    monkeypatch.setattr(mixers, "sequence_conv", leaky)
    model = build("lfm2").eval()
    paths = support.decide(model, max_length=64)
    assert paths.attention == "separate", paths.line()
    assert {"blocks/linear", "mask/linear"} <= set(paths.rejected)
    assert all("log-probs off" in why for name, why in paths.rejected.items() if name.startswith(("blocks", "mask")))
    assert paths.line().startswith("fallback: one sequence per row")


def test_the_checks_pairs_are_longer_than_the_kernel():
    for kernel in (0, 3, 12):
        for span in (None, 16):
            pairs = support.synthetic_pairs(VOCAB, span, kernel=kernel)
            assert min(min(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs) > kernel
    assert support.synthetic_pairs(VOCAB)[0].prompt.tolist() == support.synthetic_pairs(VOCAB, kernel=3)[0].prompt.tolist()


def test_the_patch_leaves_other_calls_alone():
    """Installed on the class, the patched forward is the stock one without orpo's layout (generation,
    the reference forward of the check)."""
    model = build("lfm2").eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    before = model(input_ids=ids, use_cache=False).logits
    assert mixers.install(model)
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, before, rtol=0, atol=0)
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)  # with its cache
    assert out.shape == (1, 12)




def _step(params, logps, batch):
    nll = float((batch.kind == 1).sum())
    part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, BETA, False, nll, batch.n_pairs)
    grads = torch.autograd.grad(part.loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return summarize(metric_vector(part, batch.n_pairs).detach(), BETA), flat


@pytest.fixture(scope="module")
def trained():
    made = {}

    def get(name, lora):
        if (name, lora) not in made:
            model = build(name)
            if lora:
                model = add_lora(model, 16, 32, 0.05, "all-linear")
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if "lora_B" in n:
                            p.normal_(0, 0.3)
            made[name, lora] = model.eval()  # dropout off: both sides deterministic
        return made[name, lora]

    return get


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_packing_gives_the_stock_numbers(trained, name, lora):
    model = trained(name, lora)
    pairs = _pairs()
    params = [p for p in model.parameters() if p.requires_grad]
    ref_batch = collate(pairs, False, False)
    ref_metrics, ref_grad = _step(params, stock_logps(model, pairs), ref_batch)
    auto = support.decide(model, max_length=64)
    assert auto.attention == "blocks" and auto.packing and auto.prefix_sharing, auto.line()
    assert "a short convolution told where each sequence starts" in auto.line()
    for mode in ("blocks", "mask"):
        for share, pack in ((True, True), (False, True), (True, False)):
            policy = PolicyForward(model, Paths(mode, share, pack, auto.head))
            batch = policy.collate(pairs, False)
            metrics, grad = _step(params, policy(batch), batch)
            for k, v in ref_metrics.items():
                assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (mode, share, pack, k)
            rel = float((grad - ref_grad).norm() / ref_grad.norm())
            assert rel < 1e-5, (mode, share, pack, rel)


def test_packed_lfm2_under_activation_checkpointing():
    """The recompute in the backward pass sees the layout too (it rides in the layer's kwargs)."""
    from orpo.model import enable_activation_checkpointing

    model = build("lfm2").train()
    pairs = _pairs()
    params = list(model.parameters())
    ref_metrics, ref_grad = _step(params, stock_logps(model, pairs), collate(pairs, False, False))
    enable_activation_checkpointing(model)
    policy = PolicyForward(model, "blocks")
    batch = policy.collate(pairs, False)
    metrics, grad = _step(params, policy(batch), batch)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-5
