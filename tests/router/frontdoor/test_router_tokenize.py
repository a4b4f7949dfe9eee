"""The router tokenizes exactly as the workers do: same ids, same blocks, so its hashes match their cache."""
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.wire.openai_api import ChatCompletionRequest, ChatMessage, CompletionRequest
from kvlab.wire.tokenizer import (
    OUTPUT_WORDS,
    SPECIALS,
    BuiltinTokenizer,
    apply_chat_template,
    split_specials,
    token_text,
)
from router.frontdoor.tokenize import MEMO_MIN_CHARS, PromptTokenizer

# Text with special tokens inside it, where segment-wise encoding could go wrong.
text_st = st.lists(st.sampled_from(list("ab Z9.,\n<|>_-") + ["<|eot_id|>", "<|start_header_id|>", " word", "<|eot_id",
                                                            "<|begin_of_text|>", "<|"]),
                   max_size=30).map("".join)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), text_st), min_size=1, max_size=4),
       st.integers(0, 3))
def test_chat_prompts_encode_exactly_as_the_worker_encodes_them(turns, repeat):
    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    long = "Long shared system prompt. " * (MEMO_MIN_CHARS // 20)
    messages = [{"role": "system", "content": long}] + [{"role": r, "content": c} for r, c in turns]
    request = ChatCompletionRequest(model="m", messages=[ChatMessage(**m) for m in messages])
    expected = BuiltinTokenizer().encode(apply_chat_template(messages))
    for _ in range(repeat + 1):   # first encode, then memoized
        prompt = tok.chat(request)
        assert prompt.dtype == np.int32 and prompt.tolist() == expected


def test_a_repeated_long_system_prompt_is_memoized():
    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    system = "You are a careful assistant. " * 100
    for user in ("one", "two", "three"):
        tok.chat(ChatCompletionRequest(model="m", messages=[ChatMessage(role="system", content=system),
                                                            ChatMessage(role="user", content=user)]))
    assert tok.memo.hits == 2


def test_token_id_prompts_pass_through_and_output_words_map_back_to_their_ids():
    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    assert tok.completion(CompletionRequest(model="m", prompt=[5, 6, 7])) == [5, 6, 7]
    ids = list(range(len(OUTPUT_WORDS)))
    assert tok.output_ids("".join(token_text(i) for i in ids)) == ids


def test_route_requests_hash_with_the_salt():
    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    tokens = list(range(1000, 1064))
    plain, salted = tok.route_request(tokens, None, None), tok.route_request(tokens, "s", None)
    assert len(plain.blocks) == 4 and plain.blocks[0] != salted.blocks[0]


@settings(max_examples=300, derandomize=True)
@given(text_st, st.integers(0, 3))
def test_specials_are_cut_out_exactly_where_a_regex_finds_them(text, copies):
    text = text * (1 + copies * 20)   # with copies: more "<" than the find loop takes
    reference = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
    assert split_specials(text) == [part for part in reference.split(text) if part]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab1 \n\t\u3000\u00a0é.<|>")), max_size=300), min_size=1,
                max_size=4), st.integers(0, 40))
def test_the_prompt_size_bound_never_exceeds_the_real_token_count(texts, above):
    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    bound = tok.min_tokens(texts, above)
    assert bound <= sum(len(tok.tokenizer.encode(t)) for t in texts)


def test_the_prompt_size_bound_passes_the_limit_without_reading_a_huge_prompt_whole():
    tok = PromptTokenizer(BuiltinTokenizer(), 16)
    huge = "abcd " * 2_000_000   # 10 MB: 2M tokens
    bound = tok.min_tokens([huge], 8192)
    assert 8192 < bound < 2_000_000   # past the limit, found from the first chunks only
    assert tok.min_tokens(["abcd " * 100], 8192) == 0   # too short to tell: no scan at all


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["word", " Word", "12345", " \t\n ", " " * 40, "é", "日本", ".", "<|eot_id|>", "x"]),
                max_size=40).map("".join))
def test_remembered_piece_ids_are_the_tokenizers_and_long_pieces_are_not_kept(text):
    from router.frontdoor.tokenize import PIECE_CHARS_KEPT, PieceIds, builtin_encoder

    encode = builtin_encoder()
    assert encode(text) == BuiltinTokenizer().encode(text)
    assert encode(text) == BuiltinTokenizer().encode(text)   # from the remembered ids this time
    ids = PieceIds()
    ids[" " * 40]
    ids["word"]
    assert list(ids) == ["word"] and len(" " * 40) > PIECE_CHARS_KEPT   # a client cannot fill it with long runs


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["word", "Wo", "12345", "a", " ", " ", "  ", "\n", "\u00a0", "\x1c", "é", "日本", ".",
                                 "<|eot_id|>", "<", "x" * 30]), max_size=30).map("".join))
def test_texts_split_at_single_spaces_get_the_tokenizers_ids_word_by_word(text):
    from router.frontdoor.tokenize import WORD_CHARS_KEPT, WordIds, builtin_encoder

    encode = builtin_encoder()
    assert encode(text) == BuiltinTokenizer().encode(text)   # words split and looked up, or the regex
    assert encode(text) == BuiltinTokenizer().encode(text)   # from the remembered words this time
    words = WordIds(" ", lambda piece: len(piece))
    assert words["x" * 30] == [5] + [4] * 6 + [2] and words["ab"] == [3]   # " xxxx", "xxxx", ..., " ab"
    assert list(words) == ["ab"] and 30 > WORD_CHARS_KEPT   # a client cannot fill it with long words


def test_only_text_that_is_not_printable_can_hold_whitespace_other_than_the_space():
    """encode_part skips its regex search where str.isprintable holds: every character the regex finds
    (whitespace but the space) must make a text unprintable."""
    from router.frontdoor.tokenize import _OTHER_SPACE

    found = [c for c in map(chr, range(0x110000)) if _OTHER_SPACE.search(c)]
    assert found and " " not in found and "\n" in found and "\u3000" in found
    assert not any(c.isprintable() for c in found)


def test_a_short_text_stays_a_list_and_routes_as_its_array_would():
    text = "word " * 100   # under MEMO_MIN_CHARS: no remembered segment to concatenate
    ids = PromptTokenizer(BuiltinTokenizer(), 16).encode(text)
    assert isinstance(ids, list) and ids == BuiltinTokenizer().encode(text)
    as_list = PromptTokenizer(BuiltinTokenizer(), 16).route_request(ids, "salt", None)
    as_array = PromptTokenizer(BuiltinTokenizer(), 16).route_request(np.array(ids, dtype=np.int32), "salt", None)
    assert len(as_list.blocks) == 101 // 16 and list(as_list.blocks) == list(as_array.blocks)
    long = PromptTokenizer(BuiltinTokenizer(), 16).encode(text * 2)
    assert isinstance(long, np.ndarray) and long.tolist() == BuiltinTokenizer().encode(text * 2)
