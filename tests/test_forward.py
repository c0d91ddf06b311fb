"""The fast forward (prefix sharing, packing, block attention, chunked lm-head) against the obvious one."""

import pytest
import torch

from orpo.data.batching import KIND_CHOSEN, collate, nll_tokens
from orpo.data.readers import Pair
from orpo.data.templates import tokenize_pairs
from orpo.forward import PolicyForward
from orpo.loss import orpo_loss

from conftest import CONV_ROWS, PLAIN_ROWS
from orpo.data.readers import normalize_row


def reference_logps(model, pairs, prompt_in_nll):
    """Every pair as two separate unpadded sequences through the stock model with full logits, in the
    order collate emits scored tokens: [prompt (if in NLL), chosen, rejected] per pair."""
    out = []
    for p in pairs:
        for k, comp in enumerate((p.chosen, p.rejected)):
            seq = torch.tensor(list(p.prompt) + list(comp))[None]
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            tok = logp[:-1].gather(1, seq[0, 1:, None]).squeeze(1)
            n_p = len(p.prompt)
            if k == 0 and prompt_in_nll:
                out.append(tok[: n_p - 1])
            out.append(tok[n_p - 1 :])
    return torch.cat(out)


@pytest.fixture
def pairs(chatml_tokenizer):
    rows = [normalize_row(r, f"t:{i}") for i, r in enumerate(CONV_ROWS)]
    return tokenize_pairs(rows, chatml_tokenizer, 512)


@pytest.mark.parametrize("mode", ["blocks", "mask"])
@pytest.mark.parametrize("sharing", [True, False])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("prompt_in_nll", [False, True])
def test_token_logps_match_reference(tiny_model, pairs, mode, sharing, packing, prompt_in_nll):
    model = tiny_model.double()
    batch = collate(pairs, sharing, packing, prompt_in_nll)
    got = PolicyForward(model, mode, chunk=5)(batch)
    want = reference_logps(model, pairs, prompt_in_nll)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)


def test_prefix_sharing_computes_fewer_tokens(pairs):
    shared = collate(pairs, True, True)
    separate = collate(pairs, False, False)
    assert shared.pair_tokens == separate.pair_tokens == sum(p.pair_tokens for p in pairs)
    assert shared.computed_tokens == sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    assert separate.computed_tokens > shared.pair_tokens  # padding on top of the duplicated prompts


@pytest.mark.parametrize("mode", ["blocks", "mask"])
def test_gradients_match_reference(tiny_model, pairs, mode):
    model = tiny_model.double()
    beta, nll_norm = 0.3, float(sum(nll_tokens(p, False) for p in pairs))
    batch = collate(pairs, True, True, False)
    out = orpo_loss(PolicyForward(model, mode)(batch), batch.pair, batch.kind, batch.n_pairs, beta, False, nll_norm, len(pairs))
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_logps(model, pairs, False)
    out2 = orpo_loss(ref, batch.pair, batch.kind, batch.n_pairs, beta, False, nll_norm, len(pairs))
    out2.loss.backward()
    assert out.loss.item() == pytest.approx(out2.loss.item(), rel=1e-10)
    # HF's RMSNorm computes in fp32 even for fp64 weights, so shared-prompt gradients (summed inside the
    # norm's backward) agree to fp32 precision, not fp64.
    for n, p in model.named_parameters():
        assert torch.allclose(fast[n], p.grad, rtol=1e-6, atol=1e-7), n


def test_gradient_accumulation_equals_one_big_batch(tiny_model, chatml_tokenizer):
    """k micro-batches with step-level normalisers give the big batch's gradient, even with very uneven
    completion lengths (token-weighted NLL, not a mean of micro-batch means)."""
    rows = [normalize_row(r, f"t:{i}") for i, r in enumerate(PLAIN_ROWS)]
    rows.append(Pair("Human: tell me a long story Assistant:", " " + "The quick brown fox jumps over the lazy dog. " * 8, " No.", "t:x"))
    pairs = tokenize_pairs(rows, chatml_tokenizer, 512)
    model = tiny_model.double()
    policy = PolicyForward(model)
    beta = 0.2
    nll_norm = float(sum(nll_tokens(p, True) for p in pairs))

    def grads(split):
        model.zero_grad()
        for part in split:
            b = collate(part, True, True, True)
            orpo_loss(policy(b), b.pair, b.kind, b.n_pairs, beta, True, nll_norm, len(pairs)).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    big = grads([pairs])
    for split in ([pairs[:1], pairs[1:]], [pairs[:2], pairs[2:4], pairs[4:]], [[p] for p in pairs]):
        for a, b in zip(big, grads(split)):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_bf16_autocast_finite(tiny_model, pairs):
    batch = collate(pairs, True, True, False)
    policy = PolicyForward(tiny_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = policy(batch)
    out = orpo_loss(lp, batch.pair, batch.kind, batch.n_pairs, 0.1, False, float((batch.kind == KIND_CHOSEN).sum()), 4.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())
    ref = PolicyForward(tiny_model)(batch)
    assert torch.allclose(lp, ref.detach(), atol=0.15)


def test_gradient_checkpointing_same_gradients(tiny_model, pairs):
    batch = collate(pairs, True, True, False)
    policy = PolicyForward(tiny_model)
    policy(batch).sum().backward()
    g1 = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    from orpo.model import enable_activation_checkpointing

    enable_activation_checkpointing(tiny_model)
    tiny_model.train()
    policy(batch).sum().backward()
    for a, p in zip(g1, tiny_model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["blocks", "flex", "mask"])
def test_cuda_modes_match_reference(chatml_tokenizer, pairs, mode):
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(chatml_tokenizer), hidden=64).cuda()  # FlexAttention needs head_dim >= 16
    batch = collate(pairs, True, True, True).to("cuda")
    got = PolicyForward(model, mode)(batch).double().cpu()
    ref = reference_logps(model.cpu(), pairs, True)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    model.cuda()
    beta = 0.1
    nll = float(sum(nll_tokens(p, True) for p in pairs))
    out = orpo_loss(PolicyForward(model, mode)(batch), batch.pair, batch.kind, batch.n_pairs, beta, True, nll, len(pairs))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_layers_same_logps_and_grads(chatml_tokenizer, pairs):
    from conftest import make_tiny_llama
    from orpo.model import compile_layers

    ref_model = make_tiny_llama(len(chatml_tokenizer))
    model = make_tiny_llama(len(chatml_tokenizer))
    compile_layers(model)
    for share, pack in ((True, True), (False, False)):
        batch = collate(pairs, share, pack, True)
        a = PolicyForward(ref_model)(batch)
        b = PolicyForward(model)(batch)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        a.sum().backward()
        b.sum().backward()
    # Inductor's fused kernels sum in another order, so an element's float32 error follows its tensor's
    # scale, not its own size: an element-wise rtol fails on gradients near zero in a tensor of
    # magnitude 25. A wrong compiled layer moves whole tensors by O(1) of their norm.
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        rel = ((p.grad - q.grad).norm() / p.grad.norm()).item()
        assert rel < 1e-5, (name, rel)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward while ``fn`` runs (each storage once, parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_lean_activations_same_numbers_less_memory(chatml_tokenizer, pairs, autocast, lora, device):
    from conftest import make_tiny_llama
    from orpo.lean import lean_activations
    from orpo.model import add_lora

    models = [make_tiny_llama(len(chatml_tokenizer)).to(device) for _ in range(2)]
    changed = lean_activations(models[1])
    assert changed == 2 * 2 + 2 + 1  # two norms and one MLP per layer (2 layers), the final norm
    if lora:
        wrapped = []
        for m in models:
            torch.manual_seed(0)  # the same adapter initialisation for both
            wrapped.append(add_lora(m, 4, 8, 0.0, "all-linear"))
        models = wrapped
    batch = collate(pairs, True, True, False).to(device)
    nll = float((batch.kind == KIND_CHOSEN).sum())
    results = []
    for model in models:
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            lp, saved = _saved_bytes(lambda: PolicyForward(model)(batch))
        out = orpo_loss(lp, batch.pair, batch.kind, batch.n_pairs, 0.1, False, nll, float(batch.n_pairs))
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((out.loss.detach(), grads, saved))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    # the forward runs the same ops: the loss is bitwise equal. The norm's closed-form backward sums in
    # another order than autograd's chain of ops: gradients agree within fp32 rounding, and under bf16
    # autocast within the bf16 rounding that such a difference can flip in the matmuls downstream
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        if autocast:
            assert float((a - b).norm()) <= 1e-2 * float(a.norm())
        else:
            assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())
    cfg, tokens = models[0].config, batch.input_ids.numel()
    act = cfg.num_hidden_layers * tokens * cfg.intermediate_size * (2 if autocast else 4)  # act(gate) per MLP
    # each norm's normalised fp32 copy is kept only when its weight trains (not under LoRA)
    norms = 0 if lora else (2 * cfg.num_hidden_layers + 1) * tokens * cfg.hidden_size * 4
    assert saved_a - saved_b >= act + norms
    models[1].eval()
    with torch.no_grad():  # evaluation and generation take the module's own forward
        assert torch.equal(PolicyForward(models[0].eval())(batch), PolicyForward(models[1])(batch))


def test_lean_activations_leaves_unknown_mlps_alone(chatml_tokenizer):
    from conftest import make_tiny_llama
    from orpo.lean import lean_activations

    model = make_tiny_llama(len(chatml_tokenizer))
    for layer in model.model.layers:  # a subclass whose forward is not the gated formula: not recomputed by it
        layer.mlp.__class__ = type("OtherMLP", (type(layer.mlp),), {"forward": lambda self, x: self.down_proj(x)})
    assert lean_activations(model) == 2 * 2 + 1
