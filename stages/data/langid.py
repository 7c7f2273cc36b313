"""Language identification with py3langid (no Ray here).

py3langid (a maintained fork of langid.py, Lui & Baldwin 2012: a naive Bayes model over byte
n-grams for 97 languages) ships its model inside the wheel: nothing is downloaded at run time.
The model is loaded once per process, on first use (~1-3 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glm.config import ConfigError

_IDENTIFIER = None


@dataclass
class LanguageConfig:
    """Language identification: a document whose detected language is not its source's."""

    enabled: bool = True
    """Detect each document's language (off: no check, no per-language counts)."""
    mismatch: Literal["drop", "route", "keep"] = "drop"
    """drop: rejected as language; route: moved to the first source of the detected language
    (dropped when there is none); keep: only counted."""
    min_confidence: float = 0.5
    """A mismatch counts only when the detector's probability reaches this (short or mixed
    documents are often uncertain: they stay with their source)."""
    max_chars: int = 2000
    """Only the first this many characters are classified (speed)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"language.min_confidence must be in [0, 1], got {self.min_confidence}")


def identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of a text's language."""
    lang, prob = identifier().classify(text[:max_chars])
    return str(lang), float(prob)


# detected varieties that count as the macro-language of a source (langid.py tells Wu Chinese,
# which classical Chinese poetry is often taken for, from Mandarin)
ALIASES = {"wuu": "zh", "yue": "zh", "cmn": "zh", "lzh": "zh", "nb": "no", "nn": "no"}


def family(code: str) -> str:
    """The language a detected code counts as when compared with a source's tag."""
    return ALIASES.get(code, code)


def base(code: str) -> str:
    """The language part of a tag: zh-Hans -> zh, en_US -> en."""
    return code.replace("_", "-").split("-")[0].lower()


def expected(tag: str) -> list[str]:
    """A source's language tag as the codes it accepts: "en", "zh-Hans", "en,zh" (either);
    "", "any", "mixed" or "multi" accept every language (no check)."""
    codes = [base(t.strip()) for t in tag.split(",") if t.strip()]
    return [] if not codes or set(codes) & {"any", "mixed", "multi"} else codes
