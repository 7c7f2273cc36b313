"""The SentencePiece unigram tokenizer: lossless round trips and GLM's special tokens."""

import pytest

from glm.tokenizer import GLMTokenizer, GLM_SPECIAL

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
    for piece in GLM_SPECIAL:
        ids = tokenizer.encode(piece)
        assert len(ids) == 1 and tokenizer.id_to_piece(ids[0]) == piece
    s = tokenizer.special
    assert len({s.mask, s.smask, s.gmask, s.sop, s.eop, s.pad, s.eos}) == 7
    assert tokenizer.encode("a[MASK]b").count(s.mask) == 1


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
