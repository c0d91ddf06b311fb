"""orpo generate and orpo chat on the tiny model folder: deterministic greedy output, sampling, chat history."""

import io

import pytest

import orpo.chat as chat
from orpo.cli import main
from orpo.errors import UserError
from orpo.evaluate import generate

QUESTION = "What is the capital of France?"


def run(capsys, *args):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return chat.load_for_generation(str(tiny_model_dir))


def test_generate_is_deterministic_greedy_and_uses_the_chat_template(tiny_model_dir, loaded, capsys):
    args = ["generate", "--model", tiny_model_dir, "--prompt", QUESTION, "--max-new-tokens", 8]
    rc, first, _ = run(capsys, *args)
    assert rc == 0 and first.strip()
    rc, second, _ = run(capsys, *args)
    assert rc == 0 and first == second
    model, tok, device = loaded
    direct = generate(model, tok, [[{"role": "user", "content": QUESTION}]], max_new_tokens=8, device=device)
    assert first.strip() == direct[0]


def test_generate_raw_system_and_several_prompts(tiny_model_dir, loaded, capsys):
    model, tok, device = loaded
    rc, out, _ = run(capsys, "generate", "--model", tiny_model_dir, "--prompt", "The sea is", "--raw", "--max-new-tokens", 6)
    assert rc == 0 and out.strip() == generate(model, tok, ["The sea is"], max_new_tokens=6, device=device)[0]
    rc, out, _ = run(capsys, "generate", "--model", tiny_model_dir, "--prompt", "hello", "--prompt", QUESTION,
                     "--system", "Be brief.", "--max-new-tokens", 5)
    assert rc == 0 and "--- 1: hello" in out and f"--- 2: {QUESTION}" in out
    with_system = generate(model, tok, [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]],
                           max_new_tokens=5, device=device)[0]
    assert out.splitlines()[1] == with_system


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir, capsys):
    args = ["generate", "--model", tiny_model_dir, "--prompt", QUESTION, "--max-new-tokens", 12, "--temperature", 1.5,
            "--top-p", 0.95]
    a = run(capsys, *args, "--seed", 1)[1]
    b = run(capsys, *args, "--seed", 1)[1]
    assert a == b
    others = {run(capsys, *args, "--seed", s)[1] for s in (2, 3, 4)}
    assert len(others | {a}) > 1  # sampling does sample


def test_bad_sampling_options_are_one_line_errors(tiny_model_dir, capsys):
    rc, _, err = run(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x", "--temperature", -1)
    assert rc == 2 and err.strip() == "orpo: error: --temperature must be >= 0 (0 is greedy); got -1.0"
    rc, _, err = run(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x", "--top-p", 0)
    assert rc == 2 and "--top-p" in err


def test_chat_keeps_the_history_through_the_template(loaded, monkeypatch):
    model, tok, device = loaded
    seen = []

    def spy(model, tokenizer, prompts, *a, **k):
        seen.append([dict(m) for m in prompts[0]])
        return generate(model, tokenizer, prompts, *a, **k)

    monkeypatch.setattr(chat, "generate", spy)
    session = chat.ChatSession(model, tok, system="Be brief.", max_new_tokens=6, device=device)
    out = io.StringIO()
    rc = chat.chat_loop(session, io.StringIO(f"hello\n\n{QUESTION}\n/history\n/exit\nnot read\n"), out)
    assert rc == 0 and len(seen) == 2
    first_answer = session.history[1]["content"]
    assert seen[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": first_answer}, {"role": "user", "content": QUESTION}]
    lines = out.getvalue().splitlines()
    assert "[user] hello" in lines and f"[user] {QUESTION}" in lines and "[system] Be brief." in lines
    # a greedy answer in the chat is the same as generating from the same rendered history
    again = generate(model, tok, [seen[1]], max_new_tokens=6, device=device)[0]
    assert session.history[3]["content"] == again
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]


def test_chat_drops_the_oldest_turns_when_the_context_is_full(loaded):
    model, tok, device = loaded
    session = chat.ChatSession(model, tok, max_new_tokens=8, device=device)
    session.context_limit = lambda: 60
    for i in range(6):
        session.send(f"Write about the sea, part {i}.")
        assert session._prompt_tokens(session.messages()[:-1]) <= 60 - 8 or len(session.history) <= 2
    assert session.history[0]["role"] == "user" and len(session.history) < 12
    assert session.history[-2]["content"] == "Write about the sea, part 5."


def test_chat_command_reads_stdin_until_eof(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    rc, out, _ = run(capsys, "chat", "--model", tiny_model_dir, "--max-new-tokens", 4)
    assert rc == 0 and len(out.strip().splitlines()) >= 1


def test_chat_needs_a_chat_template(loaded):
    model, tok, _ = loaded
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(UserError, match="no chat template"):
            chat.ChatSession(model, tok)
    finally:
        tok.chat_template = template
