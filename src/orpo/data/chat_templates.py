"""--chat-template: a Jinja file or a known template by name, set on the tokenizer before tokenizing.

A wrong chat template is the most common cause of bad ORPO results (the model learns turn markers it
will never be prompted with). Each known template here renders the prompt as a prefix of the whole
conversation (``templates.py`` needs that to find the completion) and ends every turn with a marker that
``templates.END_TOKENS`` knows, so that every completion ends with exactly one end token.
"""

from __future__ import annotations

from pathlib import Path

from ..config import suggest
from ..errors import UserError

# name -> (Jinja template, the turn markers it writes, which should be special tokens of the tokenizer)
KNOWN = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        (),
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}",
        (),
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
        "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    "phi-3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        ("<|end|>",),
    ),
}
ALIASES = {"llama3": "llama-3", "phi3": "phi-3", "gemma2": "gemma", "mistral-instruct": "mistral"}


def set_chat_template(tokenizer, value: str | None, say=print) -> None:
    """Give ``tokenizer`` the template named or stored in ``value`` (None: keep its own)."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.is_file():
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--chat-template {path}: cannot read ({e})") from None
        say(f"chat template: {path}")
        return
    name = ALIASES.get(value.lower(), value.lower())
    if name not in KNOWN:
        names = sorted(KNOWN)
        raise UserError(f"--chat-template {value}: no such file, and not a known template ({', '.join(names)})"
                        f"{suggest(name, names)}")
    template, markers = KNOWN[name]
    tokenizer.chat_template = template
    special = set(tokenizer.all_special_tokens) | {t.content if hasattr(t, "content") else str(t)
                                                   for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    plain = [m for m in markers if m not in special]
    say(f"chat template: {name}" + (f" (note: {', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not special "
                                    "tokens of this tokenizer, so they are learnt as ordinary text)" if plain else ""))
