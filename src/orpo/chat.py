"""``orpo generate`` and ``orpo chat``: try a model by hand.

Both load any model ``orpo`` takes (a Hugging Face folder, a ``.gguf``, an orpo run folder or a LoRA
adapter folder) and answer through :func:`orpo.evaluate.generate`, so prompts are rendered with the
model's chat template exactly as in training and evaluation. Greedy by default; ``temperature > 0``
samples (with ``top_p``), reproducibly when a seed is given. ``chat`` keeps the whole conversation and
renders it through the chat template on every turn; when it outgrows the model's context, the oldest
turns are dropped (a system message is kept).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .errors import UserError
from .evaluate import generate


def load_for_generation(model_arg: str | None, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer, device) ready for generation."""
    import torch

    from .model import load_model, load_tokenizer, resolve_model

    folder = resolve_model(model_arg)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, trust_remote_code, allow_pickle, device=device)
    model.eval()
    return model, tokenizer, device


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)  # seeds every device, CUDA included


def as_prompt(tokenizer, text: str, system: str | None = None, raw: bool = False):
    """Messages for the chat template, or the text as it is (``raw``, or a tokenizer without a template)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        if system:
            raise UserError("--system needs a chat template; this tokenizer has none (or --raw was given)")
        return text
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def generate_text(model, tokenizer, prompts: list[str], system: str | None = None, raw: bool = False,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  device=None) -> list[str]:
    _check_sampling(max_new_tokens, temperature, top_p)
    _seed(seed)
    items = [as_prompt(tokenizer, p, system, raw) for p in prompts]
    if raw or not getattr(tokenizer, "chat_template", None):
        return [generate(model, tokenizer, [p], max_new_tokens, 1, temperature, top_p, device)[0] for p in items]
    return generate(model, tokenizer, items, max_new_tokens, 16, temperature, top_p, device)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy); got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1]; got {top_p}")


@dataclass
class ChatSession:
    """A conversation rendered through the chat template on every turn."""

    model: object
    tokenizer: object
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    device: object = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("orpo chat needs a chat model: this tokenizer has no chat template (try orpo generate --raw)")
        _check_sampling(self.max_new_tokens, self.temperature, self.top_p)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def context_limit(self) -> int:
        cfg = getattr(self.model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or getattr(self.tokenizer, "model_max_length", None) or 2048
        return int(min(n, 1 << 20))

    def _prompt_tokens(self, msgs: list[dict]) -> int:
        ids = self.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    def _fit(self) -> None:
        """Drop the oldest exchanges until the rendered conversation leaves room for the answer."""
        budget = self.context_limit() - self.max_new_tokens
        while len(self.history) > 1 and self._prompt_tokens(self.messages()) > budget:
            # Drop the oldest user message and the assistant reply that followed it.
            cut = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            self.history = self.history[cut:]

    def send(self, text: str) -> str:
        self.history.append({"role": "user", "content": text})
        self._fit()
        answer = generate(self.model, self.tokenizer, [self.messages()], self.max_new_tokens, 1, self.temperature,
                          self.top_p, self.device)[0]
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.history = []


CHAT_HELP = "commands: /exit (or Ctrl-D) ends, /reset forgets the conversation, /history shows it"


def chat_loop(session: ChatSession, stdin=None, stdout=None) -> int:
    """Read a line, answer it, repeat, until EOF or /exit. Prompts are shown only on a terminal."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    tty = stdin.isatty() and stdout.isatty()
    if tty:
        print(CHAT_HELP, file=stdout, flush=True)
    while True:
        if tty:
            try:
                line = input("you> ")
            except EOFError:
                print(file=stdout)
                return 0
        else:
            line = stdin.readline()
            if not line:
                return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if text == "/history":
            for m in session.messages():
                print(f"[{m['role']}] {m['content']}", file=stdout)
            stdout.flush()
            continue
        answer = session.send(text)
        print(f"assistant> {answer}" if tty else answer, file=stdout, flush=True)
