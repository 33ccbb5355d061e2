"""Many token id sequences held compactly: one int32 array of all tokens and the offsets of each.

Every rank of a run holds the whole tokenised prompt set (:class:`~megatron_renio.training.components.PromptSet`).
As ``list[list[int]]`` a token costs about 41 bytes (an 8-byte pointer and a 32-byte int object for
ids above 256); :class:`TokenSequences` stores it in 4 bytes (``array('i')``, grown by at most
1/16 beyond its length as it is appended to), plus 8 bytes of offset per sequence. Reading one
sequence back gives a fresh ``list[int]``, equal to the ids that were appended, so code written for
lists of ids (rollout, batching, samples) reads it unchanged.
"""

from __future__ import annotations

import hashlib
import operator
from array import array
from collections.abc import Iterable, Iterator, Sequence

_TOKEN_TYPE = "i"  # C int: 4 bytes on every platform the trainer runs on (checked below)
if array(_TOKEN_TYPE).itemsize != 4:  # pragma: no cover
    raise ImportError(f"array({_TOKEN_TYPE!r}) is not 4 bytes here; TokenSequences needs an int32 type code")


class TokenSequences:
    """An append-only sequence of token id sequences (see the module docstring).

    ``len(seqs)`` is the number of sequences; ``seqs[i]`` (a negative ``i`` counts from the end, as
    for a list) is sequence ``i`` as a new ``list[int]``; iterating yields every sequence in order.
    Ids must fit in int32 (``OverflowError`` otherwise).
    """

    __slots__ = ("_tokens", "_offsets")

    def __init__(self, sequences: Iterable[Sequence[int]] = ()):
        """Hold ``sequences`` (any iterable, e.g. a generator tokenising one record at a time)."""
        self._tokens = array(_TOKEN_TYPE)
        self._offsets = array("q", [0])  # sequence i is _tokens[_offsets[i]:_offsets[i + 1]]
        for ids in sequences:
            self.append(ids)

    def append(self, ids: Sequence[int]) -> None:
        """Add one sequence at the end (all of it, or nothing when an id does not fit in int32)."""
        self._tokens.extend(array(_TOKEN_TYPE, ids))
        self._offsets.append(len(self._tokens))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _bounds(self, index) -> tuple[int, int]:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {index} out of range for {n} sequences")
        return self._offsets[i], self._offsets[i + 1]

    def __getitem__(self, index) -> list[int]:
        start, end = self._bounds(index)
        return self._tokens[start:end].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> list[int]:
        """The length of every sequence, in order."""
        offsets = self._offsets
        return [offsets[i + 1] - offsets[i] for i in range(len(self))]

    def select(self, indices: Iterable[int]) -> TokenSequences:
        """A new :class:`TokenSequences` of the sequences at ``indices``, in that order."""
        out = TokenSequences()
        for i in indices:
            start, end = self._bounds(i)
            out._tokens.extend(self._tokens[start:end])  # array to array: a copy of the block
            out._offsets.append(len(out._tokens))
        return out

    def update_hash(self, digest) -> None:
        """Feed every sequence's length and ids, in order, to ``digest`` (a ``hashlib`` object), without a copy."""
        digest.update(self._offsets)
        digest.update(self._tokens)

    @property
    def num_tokens(self) -> int:
        """The number of tokens of all sequences together."""
        return len(self._tokens)


def sha256_of(*stores: TokenSequences) -> str:
    """SHA-256 hex digest of every sequence of ``stores``, in order: equal digests, equal ids (a
    tokenised data set's identity, compared across ranks and with a checkpoint's)."""
    digest = hashlib.sha256()
    for store in stores:
        store.update_hash(digest)
    return digest.hexdigest()
