"""Next-token selection for the on-policy rollout: temperature, top-k, top-p (nucleus), greedy.

:func:`sample_next` turns one row of logits per sample into one token per sample. It sees only the
true vocabulary (the caller drops Megatron's padded rows first), and all randomness comes from the
``torch.Generator`` it is given, so ranks that hold the same generator state draw the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_renio.errors import UserInputError


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the student samples its completions.

    ``temperature`` divides the logits; ``top_k`` keeps the k most likely tokens and any tied with the k-th,
    as Hugging Face and vLLM do (0 = off);
    ``top_p`` keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (1.0 = off); ``greedy`` takes the argmax and ignores the three others (a temperature of 0 is
    then allowed: it is how vLLM and eval configs ask for greedy decoding); ``max_new_tokens``
    bounds each completion.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int
    greedy: bool = False

    def validate(self) -> None:
        """Raise :class:`UserInputError` naming the flag of the first out-of-range value."""
        if not isinstance(self.temperature, (int, float)) or not (self.temperature > 0
                                                                   or self.greedy and self.temperature == 0):
            raise UserInputError(f"--rollout-temperature must be > 0 (or 0 with greedy decoding), "
                                 f"got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise UserInputError(f"--rollout-top-p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserInputError(f"--rollout-top-k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserInputError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens!r}")


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` ([b, V_true], float32): a LongTensor [b] on the same device.

    Greedy: the argmax (lowest index on ties). Otherwise the logits, less their row maximum, are
    divided by the temperature (a temperature near 0 tends to the argmax; ties share the draw),
    restricted to the top-k, then to the top-p nucleus (the most likely token always stays), and one
    token is drawn by inverse-CDF sampling: row i takes the first token whose cumulative probability
    reaches ``uniforms[i]`` (one number in [0, 1) per row; drawn from ``generator`` when not given).
    One uniform per row and token is what makes sampling reproducible per sample, whatever batch the
    sample sits in. The global RNG is never used.
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    # shifted to a row maximum of 0 before the division (the distribution does not change), by at least float32's
    # smallest normal number: however small the temperature, no score is inf or NaN (the scores overflowed to
    # inf, softmax made NaN of them and the last column was drawn); a tiny one is the argmax's one-hot
    scores = logits.float()
    temperature = max(cfg.temperature, torch.finfo(torch.float32).tiny)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature
    if 0 < cfg.top_k < scores.size(-1):
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # drop a token when the more likely ones before it already reach top_p
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if uniforms is None:
        uniforms = torch.rand(scores.size(0), generator=generator, device=scores.device)
    cdf = scores.softmax(dim=-1).double().cumsum(dim=-1)
    # a target strictly above 0 never lands on a zero-probability entry at the front
    target = uniforms.double().clamp(min=1e-12).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=scores.size(-1) - 1)
