"""Independent reference of DESIGN.md section 2 for the tests: plain PyTorch on full-vocabulary tensors.

Written from the formulas, sharing no code with ``megatron_renio``: the padded vocabulary is sliced
off, everything runs in float64 with probabilities formed explicitly (p, q, m = beta p + (1-beta) q,
log(p / m)), the ReNIO weights are Python loops over samples and tokens, and every normalisation mode
is the reference's local (per micro-batch) rule. Logits are [b, t, V_padded]; only the first
``true_vocab`` columns are the real vocabulary.
"""

from __future__ import annotations

import math

import torch

# ReNIO parameters of the reference (c, tau, gamma): used for the raw weights reported when ReNIO is off.
RENIO_DEFAULTS = dict(clip=2.5, threshold=0.8, gamma=1.0)


def log_probs(logits: torch.Tensor, true_vocab: int, temperature: float) -> torch.Tensor:
    """log softmax(z / T) over the real vocabulary, float64 [b, t, true_vocab]."""
    return torch.log_softmax(logits[..., :true_vocab].double() / temperature, dim=-1)


def sampled_logprobs(logits, tokens, mask, true_vocab, temperature) -> torch.Tensor:
    """log softmax(z / T)[x] on valid tokens, 0 elsewhere (invalid positions may hold any id)."""
    lp = log_probs(logits, true_vocab, temperature)
    b, t = tokens.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                out[i, j] = lp[i, j, int(tokens[i, j])]
    return out


def divergence_elements(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """d_v from probabilities: forward KL p log(p/q), reverse KL q log(q/p), JSD(beta) with m = beta p + (1-beta) q."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return p * torch.log(p / q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return q * torch.log(q / p)
    m = beta * p + (1 - beta) * q
    return beta * p * torch.log(p / m) + (1 - beta) * q * torch.log(q / m)


def token_divergence(student_logits, teacher_logits, true_vocab, kind, beta, temperature, token_clip, top_k):
    """D_t = sum_v clamp(d_v, 0, k) [b, t] (no clamp for k None); top-k: renormalise over the teacher's top k."""
    zs = student_logits[..., :true_vocab].double()
    zt = teacher_logits[..., :true_vocab].double()
    if top_k is not None:
        idx = torch.topk(zt, top_k, dim=-1).indices
        zs, zt = zs.gather(-1, idx), zt.gather(-1, idx)
    q = torch.softmax(zs / temperature, dim=-1)
    p = torch.softmax(zt / temperature, dim=-1)
    d = divergence_elements(p, q, kind, beta)
    if token_clip is not None:
        d = torch.clamp(d, 0.0, token_clip)
    return d.sum(dim=-1)


def renio_weights(s, u, mask, clip, threshold, gamma):
    """w_i = exp(a_i / gamma), a_i = mean of r = min(s - u, c) over valid tokens with r >= tau (0 if none)."""
    weights = []
    for i in range(s.shape[0]):
        chosen = []
        for j in range(s.shape[1]):
            if mask[i, j]:
                r = min(float(s[i, j]) - float(u[i, j]), clip)
                if r >= threshold:
                    chosen.append(r)
        a = sum(chosen) / len(chosen) if chosen else 0.0
        weights.append(math.exp(a / gamma))
    return torch.tensor(weights, dtype=torch.float64)


class Normaliser:
    """The reference's per-micro-batch normalisation; holds the EMA for mode 'ema'."""

    def __init__(self, mode, max_weight=10.0, alpha=0.1, clamp_min=0.1, clamp_max=10.0):
        self.mode, self.max_weight, self.alpha = mode, max_weight, alpha
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.ema = None

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return w
        if self.mode == "batch_mean":
            return torch.minimum(w / w.mean(), torch.tensor(self.max_weight, dtype=w.dtype))
        if self.mode == "ema":
            mean = float(w.mean())
            self.ema = mean if self.ema is None else (1 - self.alpha) * self.ema + self.alpha * mean
            return torch.minimum(w / self.ema, torch.tensor(self.max_weight, dtype=w.dtype))
        if self.mode == "clamp":
            c = torch.clamp(w, self.clamp_min, self.clamp_max)
            return c / c.mean()
        raise ValueError(self.mode)


def micro_batch(student_logits, teacher_logits, tokens, mask, true_vocab, *, kind, beta, temperature, token_clip,
                top_k, loss_kind, renio, normaliser):
    """One micro-batch of the reference loss.

    renio: None (disabled) or dict(clip, threshold, gamma); normaliser: a :class:`Normaliser` (used when
    renio is set). Raw weights are always reported (with RENIO_DEFAULTS when disabled). Returns a dict:
    loss (differentiable w.r.t. student_logits), per_sample (differentiable L_i), weights (applied,
    normalised), raw_weights, s, u, divergence [b, t].
    """
    mask = mask.bool()
    s = sampled_logprobs(student_logits, tokens, mask, true_vocab, temperature)
    u = sampled_logprobs(teacher_logits, tokens, mask, true_vocab, temperature)
    divergence = token_divergence(student_logits, teacher_logits, true_vocab, kind, beta, temperature, token_clip, top_k)
    if loss_kind == "divergence":
        token_loss = divergence
    else:
        advantage = (u - s).detach()
        token_loss = -advantage * s
    token_loss = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    n = mask.sum(dim=-1).double()
    per_sample = token_loss.sum(dim=-1) / torch.clamp(n, min=1.0)
    params = renio or RENIO_DEFAULTS
    raw = renio_weights(s.detach(), u, mask, params["clip"], params["threshold"], params["gamma"])
    if renio is None:
        weights = torch.ones_like(raw)
        if loss_kind == "sampled_rkl":
            loss = token_loss.sum() / max(float(n.sum()), 1.0)
        else:
            loss = per_sample.mean()
    else:
        weights = normaliser(raw)
        loss = (weights * per_sample).mean()
    return dict(loss=loss, per_sample=per_sample, weights=weights, raw_weights=raw, s=s, u=u, divergence=divergence)

