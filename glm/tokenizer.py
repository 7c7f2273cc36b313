"""SentencePiece unigram tokenizer with GLM's special tokens (the role of GLM-130B's icetk).

Training: `train_tokenizer(texts, vocab_size)` returns a GLMTokenizer; its serialized model
(`to_bytes`) travels with checkpoints. Encoding is lossless: byte fallback covers any
character, no normalisation or whitespace collapsing, and newlines, tabs and runs of spaces
are their own pieces, so code indentation survives encode -> decode.

ChatGLM-6B's vocabulary (`ice_text.model`, brought in by `glm.chatglm_hf`) is recognised by its
pieces and handled with ChatGLM's own conventions: span tokens `<sop>` / `<eop>`, and whitespace
written as pieces before SentencePiece sees the text ("\n" -> `<n>`, "\t" -> `<|tab|>`, a run of
k spaces -> `<|blank_k|>`), turned back on decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from pathlib import Path
from typing import Iterable, Iterator

from glm.schema import SpecialTokens

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"
MASK, SMASK, GMASK, SOP, EOP = "[MASK]", "[sMASK]", "[gMASK]", "[sop]", "[eop]"
GLM_SPECIAL = (MASK, SMASK, GMASK, SOP, EOP)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
"""The role tokens of the role chat format (`glm.chat_format`), reserved in every tokenizer
`train_tokenizer` makes; a tokenizer without them (ChatGLM-6B's, or one trained before they
were reserved) can only use the ChatGLM-6B chat format."""
MASK_STRINGS = (MASK, SMASK, GMASK)
"""The mask syntax `encode_with_masks` honours (GLM blank filling: /v1/glm/fill, fill_blanks)."""
CONTROL_STRINGS = GLM_SPECIAL + (PAD, UNK, EOS) + ROLE_TOKENS
"""Strings that name a special token; in user text they are only ever text."""
_CONTROL_RE = re.compile("|".join(re.escape(s) for s in sorted(CONTROL_STRINGS, key=len, reverse=True)))
_MASK_RE = re.compile("|".join(re.escape(s) for s in sorted(MASK_STRINGS, key=len, reverse=True)))
# SentencePiece stores spaces as U+2581 internally, so runs of spaces are given in that form.
WHITESPACE_PIECES = ("\n", "\t") + tuple("\u2581" * n for n in (16, 8, 4, 3, 2))

# ChatGLM-6B's ice_text vocabulary: its span tokens, and the pieces its tokenizer writes whitespace as.
CHATGLM_SOP, CHATGLM_EOP = "<sop>", "<eop>"
CHATGLM_NEWLINE, CHATGLM_TAB = "<n>", "<|tab|>"
_CHATGLM_BLANK_RE = re.compile(r"<\|blank_(\d+)\|>")
_BYTE_PIECE_RE = re.compile(r"<0x([0-9A-F]{2})>")


def chatglm_blank(n: int) -> str:
    """ChatGLM's piece for a run of n >= 2 spaces."""
    return f"<|blank_{n}|>"


def _training_lines(texts: Iterable[str], max_line_bytes: int) -> Iterator[str]:
    """Split documents into lines SentencePiece accepts (it caps sentence length in bytes)."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            data = line.encode("utf-8")
            while len(data) > max_line_bytes:
                cut = max_line_bytes
                while cut > 0 and (data[cut] & 0xC0) == 0x80:  # do not split a UTF-8 character
                    cut -= 1
                yield data[:cut].decode("utf-8")
                data = data[cut:]
            if data:
                yield data.decode("utf-8")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 2,
    seed_sentencepiece_size: int = 1_000_000,
) -> "GLMTokenizer":
    """Train a unigram model on `texts` (an iterable of documents). Deterministic for a given input."""
    import sentencepiece as spm

    max_line_bytes = 8192
    buffer = io.BytesIO()
    try:
        _train(spm, texts, buffer, vocab_size, character_coverage, input_sentence_size, num_threads,
               seed_sentencepiece_size, max_line_bytes)
    except RuntimeError as e:
        match = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if match:
            raise ValueError(
                f"tokenizer vocab_size {vocab_size} is smaller than the {match.group(2)} pieces needed to cover "
                f"{character_coverage:.2%} of the corpus's characters (plus special tokens): raise vocab_size "
                f"or lower character_coverage"
            ) from None
        match = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if match:
            raise ValueError(
                f"tokenizer vocab_size {vocab_size} is more than this corpus supports (at most "
                f"{match.group(2)} pieces): lower vocab_size or train on more text"
            ) from None
        raise ValueError(f"SentencePiece training failed: {e}") from None
    return GLMTokenizer(buffer.getvalue())


def _train(spm, texts, buffer, vocab_size, character_coverage, input_sentence_size, num_threads,
           seed_sentencepiece_size, max_line_bytes) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, max_line_bytes),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(GLM_SPECIAL + ROLE_TOKENS + WHITESPACE_PIECES),
        pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
        pad_piece=PAD, unk_piece=UNK, eos_piece=EOS,
        max_sentence_length=max_line_bytes,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        minloglevel=2,
    )


class GLMTokenizer:
    """Encode / decode text; knows the ids of GLM's special tokens.

    Two vocabularies are understood: the project's own (`train_tokenizer`: span tokens `[sop]` /
    `[eop]`, whitespace as plain pieces) and ChatGLM-6B's ice_text (`<sop>` / `<eop>` and no
    `[sop]`; whitespace as `<n>`, `<|tab|>`, `<|blank_k|>`; `convention == "chatglm"`).
    """

    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        chatglm = self._has_piece(CHATGLM_SOP) and self._has_piece(CHATGLM_EOP) and not self._has_piece(SOP)
        self.convention = "chatglm" if chatglm else "glm"
        sop, eop = (CHATGLM_SOP, CHATGLM_EOP) if chatglm else (SOP, EOP)
        ids = {}
        for piece in (PAD, EOS, MASK, SMASK, GMASK, sop, eop):
            if not self._has_piece(piece):
                raise ValueError(f"tokenizer model lacks the special token {piece!r}: not a GLM tokenizer "
                                 f"(nor ChatGLM-6B's ice_text vocabulary)")
            ids[piece] = self.sp.piece_to_id(piece)
        self.special = SpecialTokens(
            mask=ids[MASK], smask=ids[SMASK], gmask=ids[GMASK], sop=ids[sop], eop=ids[eop],
            pad=ids[PAD], eos=ids[EOS],
        )
        self.role_ids = {piece: self.sp.piece_to_id(piece) for piece in ROLE_TOKENS if self._has_piece(piece)}
        """Ids of the role tokens this vocabulary has (all four, or none before they were reserved)."""
        if chatglm:
            self._init_chatglm()

    def _has_piece(self, piece: str) -> bool:
        i = self.sp.piece_to_id(piece)
        return i != self.sp.unk_id() and self.sp.id_to_piece(i) == piece

    def _init_chatglm(self) -> None:
        """Whitespace pieces, and the ids `encode` must spell out as characters (special symbols
        SentencePiece would match in text: the user-defined pieces and GLM's span tokens)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self._proto)
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        self._whitespace: dict[str, str] = {CHATGLM_NEWLINE: "\n", CHATGLM_TAB: "\t"}
        self._max_blank = 1
        for piece in proto.pieces:
            match = _CHATGLM_BLANK_RE.fullmatch(piece.piece)
            if match and int(match.group(1)) >= 2:
                self._whitespace[piece.piece] = " " * int(match.group(1))
                self._max_blank = max(self._max_blank, int(match.group(1)))
        self._escape = {i for i, p in enumerate(proto.pieces) if p.type == user_defined and p.piece not in self._whitespace}
        self._escape |= set(dataclasses.asdict(self.special).values())

    @classmethod
    def load(cls, path: str | Path) -> "GLMTokenizer":
        """Load from a .model file, or a directory holding tokenizer.model."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.MODEL_FILE
        if not path.exists():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / self.MODEL_FILE
        path.write_bytes(self._proto)
        return path

    def to_bytes(self) -> bytes:
        return self._proto

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    @functools.cached_property
    def byte_pieces(self) -> dict[int, int]:
        """Id -> byte value of every byte-fallback piece (`<0xE4>`): the pieces whose text can be
        part of a character (what keeps generated text valid UTF-8, `glm.generation.Utf8Guard`)."""
        return {i: int(m.group(1), 16) for i in range(len(self))
                if self.sp.is_byte(i) and (m := _BYTE_PIECE_RE.fullmatch(self.sp.id_to_piece(i)))}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: never a special id.

        "[MASK]", "[eop]", "</s>" ... typed in the text are encoded as their characters (the
        first character as its own piece, so SentencePiece cannot match the special symbol);
        special tokens enter a sequence only through the code that builds GLM layouts (or
        `encode_with_masks`, the blank-filling syntax). Decoding gives the text back.
        """
        if self.convention == "chatglm":
            return self._encode_chatglm(text)
        if not _CONTROL_RE.search(text):
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in _CONTROL_RE.finditer(text):
            ids += self._plain(text[start:match.start()])
            ids += self._plain(match.group()[0]) + self._plain(match.group()[1:])
            start = match.end()
        return ids + self._plain(text[start:])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (plain text: never a special id)."""
        if self.convention == "chatglm":
            return [self._spell_specials(ids) for ids in self.sp.encode([self._chatglm_text(t) for t in texts])]
        if not any(_CONTROL_RE.search(t) for t in texts):
            return self.sp.encode(texts)
        return [self.encode(t) for t in texts]

    def encode_with_masks(self, text: str) -> tuple[list[int], int]:
        """Blank-filling syntax: "[MASK]", "[sMASK]" and "[gMASK]" in `text` become mask ids,
        everything else is plain text (as `encode`). Returns (ids, number of masks).

        The one place where user text may name a special token: GLM blank filling
        (`glm.generation.fill_blanks`, the serve route /v1/glm/fill)."""
        if self.convention == "chatglm":
            ids = self._encode_chatglm(text, keep=frozenset(self.special.mask_ids))
            masks = sum(i in self.special.mask_ids for i in ids)
            if masks != len(_MASK_RE.findall(text)):
                raise ValueError("this ChatGLM vocabulary does not match the mask strings in the text as single "
                                 "pieces; blank filling needs [MASK], [sMASK] and [gMASK] as user-defined symbols")
            return ids, masks
        ids: list[int] = []
        masks, start = 0, 0
        by_string = {MASK: self.special.mask, SMASK: self.special.smask, GMASK: self.special.gmask}
        for match in _MASK_RE.finditer(text):
            ids += self.encode(text[start:match.start()])
            ids.append(by_string[match.group()])
            masks += 1
            start = match.end()
        return ids + self.encode(text[start:]), masks

    def _plain(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def _chatglm_text(self, text: str) -> str:
        """ChatGLM's preprocessing: whitespace written as its pieces (longest blank runs first)."""
        text = text.replace("\n", CHATGLM_NEWLINE).replace("\t", CHATGLM_TAB)
        if "  " in text:
            for n in range(self._max_blank, 1, -1):
                text = text.replace(" " * n, chatglm_blank(n))
        return text

    def _encode_chatglm(self, text: str, keep: frozenset[int] = frozenset()) -> list[int]:
        return self._spell_specials(self.sp.encode(self._chatglm_text(text)), keep)

    def _spell_specials(self, ids: list[int], keep: frozenset[int] = frozenset()) -> list[int]:
        """Replace special symbols SentencePiece matched in the text by the ids of their characters."""
        if not self._escape.intersection(ids):
            return ids
        out: list[int] = []
        for i in ids:
            out += self._spell(self.sp.id_to_piece(i)) if i in self._escape and i not in keep else [i]
        return out

    def _spell(self, piece: str) -> list[int]:
        """Ids of `piece`'s characters, each a piece of its own (or its UTF-8 bytes)."""
        ids = []
        for char in piece:
            if self._has_piece(char) and not self.sp.is_control(self.sp.piece_to_id(char)):
                ids.append(self.sp.piece_to_id(char))
                continue
            for byte in char.encode("utf-8"):
                if not self._has_piece(f"<0x{byte:02X}>"):
                    raise ValueError(f"the tokenizer cannot write {piece!r} as text: no piece for {char!r} "
                                     f"and no byte fallback")
                ids.append(self.sp.piece_to_id(f"<0x{byte:02X}>"))
        return ids

    @property
    def max_piece_chars(self) -> int:
        """Most characters one token stands for: a text longer than n x this has more than n
        tokens (lets a server refuse an over-long text without encoding it)."""
        if getattr(self, "_max_piece_chars", None) is None:
            pieces = (self.sp.id_to_piece(i) for i in range(len(self)))
            whitespace = getattr(self, "_whitespace", {})  # ChatGLM: <|blank_80|> stands for 80 spaces
            self._max_piece_chars = max(len(whitespace.get(p, p)) for p in pieces)
        return self._max_piece_chars

    @staticmethod
    def has_control_strings(text: str) -> bool:
        """Whether `text` contains a string that names a special token ("[eop]", "</s>", ...)."""
        return _CONTROL_RE.search(text) is not None

    def decode(self, ids: Iterable[int]) -> str:
        text = self.sp.decode([int(i) for i in ids])
        if self.convention == "chatglm" and "<" in text:  # ChatGLM's postprocessing: whitespace pieces back
            for piece in sorted(self._whitespace, key=len, reverse=True):
                text = text.replace(piece, self._whitespace[piece])
        return text

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token `i` adds to decoded text: one byte for a byte-fallback piece
        (possibly part of a character), nothing for a control token (<pad>, </s>). Joined over
        a sequence they are its `decode`, encoded (where `decode` shows a byte that is no valid
        UTF-8 as U+FFFD)."""
        i = int(i)
        if self.sp.is_byte(i):
            return bytes([int(self.sp.id_to_piece(i)[1:-1], 16)])  # "<0xE4>"
        return self.sp.decode([i]).encode("utf-8")
