import numpy as np
import pytest

from orpo.data.readers import Pair
from orpo.data.templates import TokenStats, end_token_ids, tokenize_pairs, truncate

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


def conv_pair(chosen="Paris.", rejected="Lyon, I think."):
    return Pair(MSGS, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}], "t:1")


def test_chatml_prompt_ends_with_generation_prompt_and_single_end_token(chatml_tokenizer):
    tok = chatml_tokenizer
    (tp,) = tokenize_pairs([conv_pair()], tok, 512)
    assert tok.decode(tp.prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(tp.chosen) == "Paris.<|im_end|>"
    assert tok.decode(tp.rejected) == "Lyon, I think.<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert list(tp.chosen).count(im_end) == 1 and tp.chosen[-1] == im_end  # TRL appends a second one
    # the whole sequence is exactly the template's rendering, token for token
    full = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert list(tp.prompt) + list(tp.chosen) == ids[: len(tp.prompt) + len(tp.chosen)]
    assert ids[len(tp.prompt) + len(tp.chosen):] == tok("\n", add_special_tokens=False)["input_ids"]  # only the trailing newline dropped


def test_llama3_template_no_double_bos_and_eot(llama3_tokenizer):
    tok = llama3_tokenizer
    (tp,) = tokenize_pairs([conv_pair()], tok, 512)
    bos = tok.bos_token_id
    assert tp.prompt[0] == bos and tp.prompt[1] != bos
    assert tok.decode(tp.prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.decode(tp.chosen) == "Paris.<|eot_id|>"


def test_plain_strings_bos_added_once_and_eos_appended(llama3_tokenizer, chatml_tokenizer):
    pair = Pair("Human: hi Assistant:", " hello", " go away", "t:1")
    (tp,) = tokenize_pairs([pair], llama3_tokenizer, 512)
    assert tp.prompt[0] == llama3_tokenizer.bos_token_id and tp.prompt[1] != llama3_tokenizer.bos_token_id
    assert tp.chosen[-1] == llama3_tokenizer.eos_token_id and list(tp.chosen).count(llama3_tokenizer.eos_token_id) == 1
    # a BOS typed into the prompt is not doubled
    typed = Pair("<|begin_of_text|>Human: hi Assistant:", " hello", " go away", "t:2")
    (tp2,) = tokenize_pairs([typed], llama3_tokenizer, 512)
    assert list(tp2.prompt) == list(tp.prompt)
    # ChatML tokenizer adds no BOS to plain text: none is invented (TRL prepends <|im_start|>)
    (tp3,) = tokenize_pairs([pair], chatml_tokenizer, 512)
    assert tp3.prompt[0] != chatml_tokenizer.bos_token_id
    assert chatml_tokenizer.decode(list(tp3.prompt) + list(tp3.chosen)) == "Human: hi Assistant: hello<|im_end|>"


def test_boundary_found_on_tokenized_whole_when_bpe_merges(chatml_tokenizer):
    tok = chatml_tokenizer
    # "th" + "e" style merge across the boundary: the prompt ends mid-word
    pair = Pair("The quick brown fox jumps over th", "e lazy dog.", "e sea.", "t:1")
    (tp,) = tokenize_pairs([pair], tok, 512)
    whole_c = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    whole_r = tok("The quick brown fox jumps over the sea.")["input_ids"]
    assert list(tp.prompt) + list(tp.chosen[:-1]) == whole_c
    assert list(tp.prompt) + list(tp.rejected[:-1]) == whole_r
    # the merged token "the" belongs to the completion, so the prompt ends before it
    assert tok.decode(tp.prompt).endswith("over")


def test_end_token_ids(chatml_tokenizer, llama3_tokenizer):
    assert chatml_tokenizer.convert_tokens_to_ids("<|im_end|>") in end_token_ids(chatml_tokenizer)
    assert llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>") in end_token_ids(llama3_tokenizer)


@pytest.mark.parametrize(
    "p,c,r,L,maxp,expect",
    [
        (10, 5, 3, 20, None, (10, 5, 3, False, False)),  # fits
        (30, 5, 3, 20, None, (15, 5, 3, True, False)),  # prompt start cut first
        (30, 15, 3, 20, None, (10, 10, 3, True, True)),  # prompt floor L//2, then completion end cut
        (4, 30, 25, 20, None, (4, 16, 16, False, True)),  # short prompt kept whole
        (30, 5, 3, 20, 8, (8, 5, 3, True, False)),  # hard prompt cap
    ],
)
def test_truncation_rules(p, c, r, L, maxp, expect):
    prompt, chosen, rejected = list(range(100, 100 + p)), list(range(c)), list(range(50, 50 + r))
    P, C, R, pc, cc = truncate(prompt, chosen, rejected, L, maxp, bos=None)
    assert (len(P), len(C), len(R), pc, cc) == expect
    assert P == prompt[len(prompt) - len(P):]  # the latest prompt tokens are kept
    assert C == chosen[: len(C)] and R == rejected[: len(R)]  # completions lose their end
    assert len(P) + max(len(C), len(R)) <= L


def test_truncation_keeps_leading_bos():
    prompt = [1] + list(range(100, 130))
    P, *_ = truncate(prompt, [5] * 5, [6] * 5, 20, None, bos=1)
    assert P[0] == 1 and P[1:] == prompt[-14:] and len(P) == 15


def test_truncated_pairs_counted_and_within_max_length(chatml_tokenizer):
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    pairs = [Pair(long_prompt, " Paris is the capital.", " No.", "t:1"), Pair("Hi", " yes", " no", "t:2")]
    stats = TokenStats()
    out = tokenize_pairs(pairs, chatml_tokenizer, 40, stats=stats)
    assert stats.prompt_truncated == 1 and stats.kept == 2
    full = tokenize_pairs(pairs, chatml_tokenizer, 1 << 30)
    cuts = [sum(len(getattr(f, k)) - len(getattr(t, k)) for k in ("prompt", "chosen", "rejected")) for f, t in zip(full, out)]
    assert cuts[0] > 0 and cuts[1] == 0  # only the long prompt lost tokens
    assert stats.tokens_cut == sum(cuts) and stats.largest_cut == max(cuts)
    assert stats.as_dict()["tokens_cut"] == sum(cuts) and stats.as_dict()["largest_cut"] == max(cuts)
    for tp in out:
        assert len(tp.prompt) + max(len(tp.chosen), len(tp.rejected)) <= 40
        assert tp.prompt.dtype == np.int32


def test_identical_after_tokenization_and_empty_prompt_skipped(chatml_tokenizer):
    stats = TokenStats()
    out = tokenize_pairs([Pair("", " a", " b", "t:1"), Pair("q", " same", " same", "t:2")], chatml_tokenizer, 64, stats=stats)
    assert out == []
    assert stats.skips.counts == {"empty prompt (no token to condition on)": 1, "chosen identical to rejected": 1}


def test_chat_data_without_template_is_a_clear_error(chatml_tokenizer):
    import copy

    from orpo.errors import UserError

    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        tokenize_pairs([conv_pair()], tok, 64)


def test_truncation_never_empties_the_prompt():
    """At max_length 1 the prompt used to be cut to nothing while one completion token was kept; a pair
    with no prompt puts its first target at position -1 of the batch. Now the prompt keeps a token and
    the completions are what is lost, so the pair is dropped (see test_numerics for tokenize_pairs)."""
    p, c, r, p_cut, c_cut = truncate([1, 5, 6, 7], [8, 9], [10], 1, None, 1)
    assert p == [7] and c == [] and r == [] and p_cut and c_cut
    p, c, r, _, _ = truncate([5, 6, 7], [8, 9], [10], 2, None, None)
    assert p == [7] and c == [8] and r == [10]
