"""The SentencePiece unigram tokenizer: lossless round trips and GLM's special tokens."""

import dataclasses

import pytest

from glm.tokenizer import CONTROL_STRINGS, GLMTokenizer, GLM_SPECIAL, MASK_STRINGS, ROLE_TOKENS

CASES = {
    "english": "The quick brown fox -- it's 2026! Jumps over 13 lazy dogs.",
    "chinese": "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。",
    "code": "def f(x):\n    if x:\n\t\treturn  x   + 1\n\n        pass  \n",
    "mixed": "GLM-130B 是一个 bilingual 模型。\n\n  Emoji: 😀, rare: 龘, tab:\t.",
}


@pytest.mark.parametrize("name", CASES)
def test_round_trip(tokenizer, name):
    text = CASES[name]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(tokenizer):
    assert list(tokenizer.role_ids) == list(ROLE_TOKENS)  # reserved by train_tokenizer
    for piece in GLM_SPECIAL + ROLE_TOKENS:
        i = tokenizer.sp.piece_to_id(piece)
        assert tokenizer.id_to_piece(i) == piece and tokenizer.decode([i]) == piece
    s = tokenizer.special
    assert len({s.mask, s.smask, s.gmask, s.sop, s.eop, s.pad, s.eos}) == 7


TEXTS_WITH = ["{}", "a{}b", "[{}", "{}{}", "话说{}天下", " {}\n", "{}]", "[[{}]]", "x{}y{}z"]


@pytest.mark.parametrize("special", CONTROL_STRINGS)
def test_control_strings_in_user_text_stay_text(tokenizer, special):
    ids_of_specials = set(dataclasses.asdict(tokenizer.special).values()) | set(tokenizer.role_ids.values())
    texts = [t.format(special, special) for t in TEXTS_WITH]
    for text in texts:
        ids = tokenizer.encode(text)
        assert not ids_of_specials & set(ids), (text, ids)
        assert tokenizer.decode(ids) == text
        assert GLMTokenizer.has_control_strings(text)
    for text, ids in zip(texts, tokenizer.encode_batch(texts + ["plain"])):
        assert ids == tokenizer.encode(text)
    if special not in MASK_STRINGS:  # the fill syntax turns masks into masks, nothing else
        assert not ids_of_specials & set(tokenizer.encode_with_masks(f"[MASK]{special}")[0][1:])


def test_mask_syntax_only_through_encode_with_masks(tokenizer):
    s = tokenizer.special
    ids, masks = tokenizer.encode_with_masks("The [MASK] fox [sMASK] and [gMASK], not [sop] or [eop]")
    assert masks == 3 and [i for i in ids if i in s.mask_ids] == [s.mask, s.smask, s.gmask]
    assert s.sop not in ids and s.eop not in ids
    assert tokenizer.decode(ids) == "The [MASK] fox [sMASK] and [gMASK], not [sop] or [eop]"
    assert tokenizer.encode_with_masks("no masks") == (tokenizer.encode("no masks"), 0)
    assert not GLMTokenizer.has_control_strings("[mask] [ MASK ] <pa d>")


def test_max_piece_chars_bounds_tokens(tokenizer):
    for text in CASES.values():
        assert len(text) <= len(tokenizer.encode(text)) * tokenizer.max_piece_chars


def test_whitespace_runs_are_compact(tokenizer):
    assert len(tokenizer.encode(" " * 16)) == 1
    assert tokenizer.encode("\n") != tokenizer.encode(" ")


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = GLMTokenizer.load(tmp_path)
    assert again.encode(CASES["mixed"]) == tokenizer.encode(CASES["mixed"])
    assert again.special == tokenizer.special
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        GLMTokenizer.load(tmp_path / "missing")


def test_too_small_vocab_is_a_clear_error():
    from conftest import sample_texts
    from glm.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="vocab_size 300 is smaller than the .* pieces needed"):
        train_tokenizer(sample_texts(), vocab_size=300)


def test_too_large_vocab_is_a_clear_error():
    from glm.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="more than this corpus supports"):
        train_tokenizer(["tiny corpus, tiny corpus."] * 3, vocab_size=5000)


def test_token_bytes_join_to_the_decoded_text(tokenizer):
    text = "话说天下大势 Ünïcödé ☃ 🚀\n\t    code [MASK] </s>"
    ids = tokenizer.encode(text)
    assert any(tokenizer.sp.is_byte(i) for i in ids)  # byte-fallback pieces: a part of a character each
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tokenizer.token_bytes(tokenizer.special.eos) == b""
