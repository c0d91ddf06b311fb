"""The start-up proof covers the run as it will train (docs/proof.md): adapters attached, train mode,
the run's dtypes, windows and chunks of realistic size reached on a miniature, a LoRA head, partitioned
weights, no move to one device when sharded. No GPU, no network."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orpo import miniature, support
from orpo.data.templates import TokenizedPair
from orpo.errors import UserError
from orpo.forward import Paths, PolicyForward
from orpo.model import add_lora

from archs import ARCHS, COMMON, build, stock_logps
from conftest import make_tiny_llama


def _random(model, std=0.3):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return model


def _tiny(model_type, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**COMMON, **kw})
    torch.manual_seed(0)
    return _random(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa"))


def _long_pairs(vocab, seed=3):
    """Pairs of 150-300 tokens, chosen and rejected of different lengths."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r), f"t:{i}")
            for i, (p, c, r) in enumerate([(90, 110, 70), (20, 160, 200)])]




def _logps(model, paths, pairs):
    policy = PolicyForward(model, paths)
    with torch.no_grad():
        return policy(policy.collate(pairs, False))


def _leaky_blocks(monkeypatch, when=lambda: True):
    """Block attention that lets a further completion see all of itself (its later tokens), while
    ``when()``: the blocks go through ``orpo.qblocks.attend`` (the dense mask path does not)."""
    from orpo import qblocks

    real = qblocks.attend

    def leaky(spec, q, k, v, call, *args, **kwargs):
        if spec.offset == 0 or not when():
            return real(spec, q, k, v, call, *args, **kwargs)
        return call(q, k, v, torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device))

    monkeypatch.setattr(qblocks, "attend", leaky)


# --- adapters, train mode -----------------------------------------------------------------------------

def test_the_check_runs_with_the_adapters_in_train_mode_and_dropout_put_back():
    model = add_lora(make_tiny_llama(400), 8, 16, 0.5, "all-linear")
    model.eval()
    seen = []
    real_run = support.run_pairs

    def spy(m, paths, pairs, params, amp=None):
        seen.append((m.training, [p for p in params]))
        return real_run(m, paths, pairs, params, amp)

    support.run_pairs = spy
    try:
        paths = support.decide(model, max_length=64)
    finally:
        support.run_pairs = real_run
    # lora_dropout 0.5 is off for the check (else the two sides draw different masks and nothing matches)
    assert paths.name == "blocks/linear", paths.rejected
    assert all(training for training, _ in seen)
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    real_params = [params for _, params in seen if any(id(p) in lora for p in params)]
    assert real_params and all(id(p) in lora for p in real_params[0])  # the adapters' gradient, not the frozen base
    # put back as they were
    assert not model.training
    drops = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert drops and all(p == 0.5 for p in drops)


def test_router_jitter_is_off_for_the_check_and_put_back():
    """Mixtral's router jitter is random in train mode, like dropout: off for the check, then back."""
    model = _tiny("mixtral", num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1)
    assert support.decide(model, max_length=64).attention == "blocks"
    jitter = [m.jitter_noise for m in model.modules() if hasattr(m, "jitter_noise")]
    assert jitter and all(j == 0.1 for j in jitter)


def test_the_miniature_carries_the_adapters():
    model = add_lora(make_tiny_llama(400), 8, 16, 0.05, "q_proj,v_proj")
    mini = miniature.build(model, "cpu")
    names = [n for n, _ in mini.named_parameters() if "lora_B" in n]
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    assert all(float(p.detach().abs().sum()) > 0 for n, p in mini.named_parameters() if "lora_B" in n)  # they act


# --- dtypes -------------------------------------------------------------------------------------------

def test_bf16_weights_keep_the_fast_path_where_it_is_exact():
    model = make_tiny_llama(400).to(torch.bfloat16)
    paths = support.decide(model, max_length=64, precision="bf16")
    assert paths.name == "blocks/linear", paths.rejected
    # the fp32 tolerances the check used before would reject it: the gradient is off by bf16 rounding
    low = support._Stage("", model, support.synthetic_pairs(400), support._checked_params(model), torch.bfloat16,
                         tol=support.real_tolerances(model, torch.bfloat16))
    cand = support.run_pairs(model, Paths("blocks", True, True, "linear"), low.pairs, low.params, torch.bfloat16)
    assert support.verdict(cand, low.ref) is not None
    assert support.verdict(cand, low.ref, tol=low.tol) is None


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_weights_still_reject_a_leak(monkeypatch, precision):
    model = make_tiny_llama(400).to(torch.bfloat16)
    _leaky_blocks(monkeypatch)
    paths = support.decide(model, max_length=64, precision=precision)
    assert paths.attention != "blocks"
    assert "log-probs off" in paths.rejected["blocks/linear"]
    with pytest.raises(UserError, match="does not give this model's own log-probs"):
        support.decide(model, attention="blocks", max_length=64, precision=precision)


def test_a_leak_only_at_low_precision_is_caught(monkeypatch):
    """A path that is exact in fp32 and leaks under bf16 autocast: the miniature's bf16 stage sees it."""
    _leaky_blocks(monkeypatch, when=lambda: torch.is_autocast_enabled("cpu"))
    model = make_tiny_llama(400)
    assert support.decide(model, max_length=64).attention == "blocks"
    paths = support.decide(model, max_length=64, precision="bf16")
    assert paths.attention != "blocks"
    assert "bfloat16" in paths.rejected["blocks/linear"] and "own forward at this precision" in \
        paths.rejected["blocks/linear"]


# --- windows and chunks of realistic size ---------------------------------------------------------------

def test_pairs_exceed_the_longest_reachable_window():
    cfg = _tiny("gemma3_text", head_dim=16, sliding_window=64, num_hidden_layers=6,
                layer_types=["sliding_attention"] * 5 + ["full_attention"]).config
    assert miniature.attention_spans(cfg) == {"sliding_attention": 64, "full_attention": None}
    assert miniature.longest_reachable_span(cfg, 512) == 64
    assert miniature.longest_reachable_span(cfg, 64) is None  # a sequence of 64 tokens never exceeds it
    for pair in support.synthetic_pairs(400, 512):
        assert len(pair.prompt) + min(len(pair.chosen), len(pair.rejected)) > 512
    small = miniature.shrink_config(cfg)
    assert small.num_hidden_layers == 6 and small.layer_types == cfg.layer_types  # the whole 5:1 pattern
    assert small.sliding_window == 64 and small.hidden_size <= 64 and small.vocab_size <= miniature.VOCAB


WINDOWED = {
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=64, num_hidden_layers=6,
                                   layer_types=["sliding_attention"] * 5 + ["full_attention"])),
    "mistral": ("mistral", dict(sliding_window=64)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1,
                            layer_types=["full_attention", "sliding_attention"])),
    "gpt_oss": ("gpt_oss", dict(sliding_window=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
}


@pytest.mark.parametrize("name", list(WINDOWED))
def test_a_window_of_64_is_proven_on_pairs_of_150_to_300_tokens(name, monkeypatch):
    kind, kw = WINDOWED[name]
    try:
        model = _tiny(kind, **kw)
    except ValueError:  # no SDPA path in transformers: the model's eager one
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = _random(AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**COMMON, **kw}),
                                                         attn_implementation="eager"))
    model.eval()
    paths = support.decide(model, max_length=512)
    pairs = _long_pairs(COMMON["vocab_size"])
    torch.testing.assert_close(_logps(model, paths, pairs), stock_logps(model, pairs), rtol=1e-4, atol=1e-4)
    # a path that ignores the window is rejected, by the check and not by the short pairs of old
    import orpo.attention as attn

    real_row = attn._row_attention
    monkeypatch.setattr(attn, "_row_attention", lambda q, k, v, groups, layout, window, chunk, attend:
                        real_row(q, k, v, groups, layout, None, None, attend))
    blind = support.decide(model, max_length=512)
    assert blind.attention != "blocks"
    assert "64-token window/chunk reached" in blind.rejected["blocks/linear"]


def test_llama4_chunked_attention_is_never_silently_wrong():
    model = _tiny("llama4_text", attention_chunk_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                  intermediate_size_mlp=96, num_hidden_layers=4).eval()
    assert miniature.attention_spans(model.config)["chunked_attention"] == 64
    paths = support.decide(model, max_length=512)
    pairs = _long_pairs(COMMON["vocab_size"])
    torch.testing.assert_close(_logps(model, paths, pairs), stock_logps(model, pairs), rtol=1e-4, atol=1e-4)
    for mode in ("blocks", "mask"):
        try:
            forced = support.decide(model, attention=mode, max_length=512)
        except UserError as e:
            assert "64-token window/chunk reached" in str(e) and "\n" not in str(e)
        else:  # a path that handles chunks is accepted only if it gives the stock numbers
            torch.testing.assert_close(_logps(model, forced, pairs), stock_logps(model, pairs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n, (_, mode) in ARCHS.items() if mode != "separate"])
def test_every_packed_architecture_gets_its_miniature(name):
    model = build(name)
    cfg = miniature.shrink_config(model.config)
    assert cfg.num_hidden_layers <= model.config.num_hidden_layers and cfg.vocab_size <= miniature.VOCAB
    paths = support.decide(model, max_length=64)
    assert "no miniature" not in paths.reason, paths.reason


# --- the LoRA head -------------------------------------------------------------------------------------

def test_a_lora_head_trains_and_gives_the_stock_numbers(monkeypatch):
    model = add_lora(make_tiny_llama(400, tied=False), 8, 16, 0.0, "q_proj,v_proj,lm_head")
    paths = support.decide(model, max_length=64)
    assert paths.head != "linear"  # the chunked head would read the base weight and skip the adapter
    pairs = _long_pairs(400)
    lm = model.get_base_model()
    torch.testing.assert_close(_logps(model, paths, pairs), stock_logps(lm, pairs), rtol=1e-5, atol=1e-5)
    head_b = [p for n, p in model.named_parameters() if "lm_head" in n and "lora_B" in n]
    assert head_b and all(float(p.abs().max()) == 0 for p in head_b)
    policy = PolicyForward(model, paths)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        batch = policy.collate(pairs, False)
        support._loss(policy(batch), batch).backward()
        opt.step()
        opt.zero_grad()
    assert all(float(p.abs().max()) > 0 for p in head_b)
    # the proof itself catches a head path that skips the adapter
    monkeypatch.setattr(support, "_head_candidates", lambda lm: ["linear", "model"])
    caught = support.decide(model, max_length=64)
    assert caught.head == "model" and "gradient reaches other weights" in caught.rejected["blocks/linear"]


# --- sharded and partitioned weights ----------------------------------------------------------------------

def test_partitioned_weights_do_not_break_decide():
    """ZeRO-3 (zero.Init): every weight is a 0-size shard with a ds_id; the vocabulary comes from the
    config and the miniature is checked."""
    model = make_tiny_llama(400)
    for p in model.parameters():
        p.data = torch.empty(0)
        p.ds_id = 0
    assert support._vocab(model) == 400
    paths = support.decide(model, max_length=64)
    assert paths.name == "blocks/linear" and "checked on the miniature only" in paths.reason


def test_choose_paths_does_not_move_a_sharded_model():
    model = make_tiny_llama(400)
    moved = []
    model.to = lambda *a, **k: moved.append(a)
    cfg = SimpleNamespace(attention="auto", prefix_sharing=True, packing=True, max_length=64, precision="fp32")
    lines = []
    paths = support.choose_paths(model, cfg, torch.device("cpu", 0), lines.append, sharded=True)
    assert not moved and paths.attention == "blocks" and lines == [paths.line()]
    assert "miniature only" in paths.line()
    support.choose_paths(model, cfg, torch.device("cpu", 0), lines.append, sharded=False)
    assert moved  # unsharded, the engine's device is where the model goes (and the test can fail)


def test_orpo_train_with_a_lora_head_trains_it(tmp_path, tiny_model_dir, plain_file, capsys):
    """Through the entry point: the check runs after LoRA is attached, so the head's adapter is trained."""
    from safetensors.torch import load_file

    from orpo.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(out),
               "--max-steps", "3", "--lora", "--lora-r", "4", "--lora-target", "q_proj,v_proj,lm_head",
               "--lr", "1e-2", "--precision", "bf16"])
    assert rc == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(("attention:", "fallback:")))
    assert "chunked lm-head" not in line, line
    weights = load_file(next((out / "adapter").glob("*.safetensors")))
    head_b = [v for k, v in weights.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and all(float(v.abs().max()) > 0 for v in head_b)
