"""Token logprobs in OpenAI's two response shapes (chat and completions), streamed or not.

The values are those of the distribution each token was drawn from after penalties and logit
bias, before temperature and top-k / top-p / min-p truncation (`stages.serve.engine`). A token
is shown as the text of its UTF-8 bytes, with a byte that is only part of a character written
as an escape ("\\xe4"), as OpenAI does; `bytes` are the token's bytes; a control token with no
text (</s>) is shown by its name.
"""

from __future__ import annotations

import codecs

from glm.tokenizer import GLMTokenizer
from stages.serve.engine import TokenLogprob


def token_text(tokenizer: GLMTokenizer, token: int) -> tuple[str, list[int]]:
    """(display string, UTF-8 bytes) of one token."""
    data = tokenizer.token_bytes(token)
    return (data.decode("utf-8", "backslashreplace") if data else tokenizer.id_to_piece(token)), list(data)


def chat_logprobs(tokenizer: GLMTokenizer, items: list[TokenLogprob]) -> dict:
    """`choices[i].logprobs` of a chat completion or chunk."""

    def entry(token: int, logprob: float) -> dict:
        text, data = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": data}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in items], "refusal": None}


class TextOffsets:
    """Character offset of each next token in one choice's text (across stream chunks): a
    token that continues an unfinished character starts where that character starts."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0

    def next(self, data: list[int]) -> int:
        offset = self._chars
        self._chars += len(self._decoder.decode(bytes(data)))
        return offset


def completion_logprobs(tokenizer: GLMTokenizer, items: list[TokenLogprob], offsets: TextOffsets) -> dict:
    """`choices[i].logprobs` of a text completion or chunk: tokens, token_logprobs, top_logprobs
    (the top alternatives and, always, the sampled token) and text_offset."""
    tokens, values, tops, text_offset = [], [], [], []
    for lp in items:
        text, data = token_text(tokenizer, lp.token)
        tokens.append(text)
        values.append(lp.logprob)
        text_offset.append(offsets.next(data))
        top = {token_text(tokenizer, t)[0]: v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": text_offset}
