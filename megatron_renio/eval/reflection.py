"""Counting reflection markers ("wait", "let me check", ...) in completions.

Text is lower-cased and split into word tokens with nltk's ``RegexpTokenizer`` (no downloaded
data needed): a token is a run of letters and digits of any script (Unicode word characters but
the underscore: ``café``, ``naïve``, ``ответ``; a script written without spaces, such as Chinese,
gives one token per run), optionally with an apostrophe part (``isn't``, ``let's``); punctuation,
underscores and hyphens separate tokens, so ``double-check``, ``double check`` and
``Double-Check`` are the same two tokens. A phrase is tokenised the same
way and counted at every token position where its whole token sequence starts; matching is on
whole tokens, so ``verify`` does not count ``verified``. Phrases are counted independently of each
other (a token can belong to matches of two different phrases).
"""

from __future__ import annotations

from collections.abc import Sequence

from nltk.tokenize import RegexpTokenizer

#: The markers reported by ``megatron-renio analyze`` unless ``--phrases`` says otherwise.
#: No phrase of this list occurs inside another one, so their counts can be summed.
DEFAULT_PHRASES: tuple[str, ...] = (
    "wait",
    "hmm",
    "however",
    "alternatively",
    "let me check",
    "verify",
    "double check",
    "on second thought",
)

_TOKENIZER = RegexpTokenizer(r"[^\W_]+(?:'[^\W_]+)*")  # [^\W_]: \w without "_"


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (see the module docstring)."""
    return _TOKENIZER.tokenize(text.lower())


def count_phrases(tokens: Sequence[str], phrases: Sequence[str] = DEFAULT_PHRASES) -> dict[str, int]:
    """Occurrences of each phrase (key: the phrase as given) in a token sequence from
    :func:`word_tokens`. A phrase that has no word token is an error (``ValueError``)."""
    starts: dict[str, list[int]] = {}
    for i, token in enumerate(tokens):
        starts.setdefault(token, []).append(i)
    counts = {}
    for phrase in phrases:
        pattern = word_tokens(phrase)
        if not pattern:
            raise ValueError(f"reflection phrase {phrase!r} has no word in it")
        n = len(pattern)
        counts[phrase] = sum(
            1 for i in starts.get(pattern[0], ()) if list(tokens[i : i + n]) == pattern
        )
    return counts
