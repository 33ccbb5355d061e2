"""Benchmark of the on-policy rollout: generated tokens/s with the KV cache vs full recompute.

Builds a randomly initialised model from a preset (single process: it initialises a world of one
itself; TP = PP = 1) and times :func:`megatron_renio.rollout.generate.generate` on random prompts
of ``--prompt-len`` tokens, ``--max-new-tokens`` new tokens each (temperature 1 sampling; with
random weights EOS is rarely drawn, and the table reports the tokens actually made), at each
batch size, with the KV cache (``kv``) and with full-prefix recompute (``full``); ``kv_whole`` is the
KV cache with ended samples kept in the batch to the end (the rollout before it dropped them). Each row
is the median by tokens/s of ``--repeats`` calls (fresh prompts each), timed by ``generate`` itself
(its final ``.tolist()`` waits for the GPU), after a 4-token warm-up call of the same mode and
batch size.

Defaults: on a CUDA machine the Qwen3-0.6B shape in bf16, 64-token prompts, 64 new tokens (35 s
on one H200); on the CPU ``tiny-qwen3`` in fp32, 32 and 32. At these lengths a decoding
step of the 0.6B model is bound by the host launching Megatron's eager kernels (tens of ms per
step on the H200, the GPU mostly idle), so KV cache and recompute run at similar speed; the cache
pays off as the prefix grows (``--prompt-len``), since recompute work rises with the prefix
(measured on the H200: batch 16, 1024-token prompts, 32 new tokens: 279 vs 70 tokens/s).

``--eos-prob Q`` makes completions end at varied lengths, as a trained model's do: a drawn token
becomes EOS when the sample's uniform number for that position is below Q (lengths geometric with
mean 1/Q, cut at ``--max-new-tokens``; the same for a sample whatever batch it is in).

Run ``python tools/bench_rollout.py`` (add ``--preset tiny-qwen3`` to force the tiny model). The
last line is machine-readable: ``BENCH_ROLLOUT <json>`` with one record per (batch, mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_renio import distributed  # noqa: E402
from megatron_renio.distributed import ParallelConfig  # noqa: E402
from megatron_renio.models.builder import build_gpt_model  # noqa: E402
from megatron_renio.config import POSITIVE_INT  # noqa: E402
from megatron_renio.models.presets import PRESETS, get_preset  # noqa: E402
from megatron_renio.rollout import generate as rollout  # noqa: E402
from megatron_renio.rollout.sampling import SamplingConfig  # noqa: E402

MODES = {"kv": True, "full": False, "kv_whole": True}  # mode -> use_kv_cache


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-0.6b" if on_gpu else "tiny-qwen3", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bf16" if on_gpu else "fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch-sizes", type=lambda text: [POSITIVE_INT(b) for b in text.split(",")], default=[1, 16, 64],
                        help="comma-separated")
    parser.add_argument("--prompt-len", type=POSITIVE_INT, default=64 if on_gpu else 32)
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64 if on_gpu else 32)
    parser.add_argument("--modes", default="kv,full", help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--repeats", type=POSITIVE_INT, default=1 if on_gpu else 3,
                        help="timed calls per row, the median is shown (default: 1 on a GPU, 3 on the shared CPU)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eos-prob", type=float, default=0.0, metavar="Q",
                        help="end each completion at a random length: EOS with probability Q per token")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    if not 0.0 <= args.eos_prob < 1.0:
        parser.error(f"--eos-prob {args.eos_prob} must be in [0, 1)")
    return args


def ending_at_random(eos: int, prob: float):
    """``sample_next`` whose token becomes ``eos`` where the row's uniform number is below ``prob``."""
    sample_next = rollout.sample_next

    def sample(logits, cfg, generator=None, uniforms=None):
        return torch.where(uniforms < prob, eos, sample_next(logits, cfg, generator, uniforms))

    return sample


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    preset = get_preset(args.preset)
    ctx = distributed.initialize(ParallelConfig(), seed=args.seed)
    model, _ = build_gpt_model(preset, ParallelConfig(), dtype=args.dtype)
    max_seq = args.prompt_len + args.max_new_tokens
    eos = preset.eos_token_id if preset.eos_token_id is not None else preset.vocab_size - 1
    g = torch.Generator().manual_seed(args.seed)

    if args.eos_prob > 0:
        rollout.sample_next = ending_at_random(eos, args.eos_prob)
    compact_below = rollout._COMPACT_BELOW

    def run(batch: int, mode: str, new_tokens: int = args.max_new_tokens):
        prompts = torch.randint(0, preset.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        rollout._COMPACT_BELOW = 0.0 if mode == "kv_whole" else compact_below
        return rollout.generate(
            model, prompts, SamplingConfig(max_new_tokens=new_tokens), eos_id=eos,
            true_vocab_size=preset.vocab_size, seed=args.seed, max_sequence_length=max_seq,
            use_kv_cache=MODES[mode],
        )

    device = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
    print(f"rollout benchmark: {args.preset} ({args.dtype}) on {device}, prompt {args.prompt_len} tokens, "
          f"up to {args.max_new_tokens} new tokens, temperature 1.0, EOS probability {args.eos_prob}")
    print(f"{'batch':>5} {'mode':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>10} {'kv speedup':>10}")
    records = []
    for batch in args.batch_sizes:
        rates = {}
        for mode in args.modes:
            run(batch, mode, new_tokens=4)  # warm-up at this batch size
            result = sorted((run(batch, mode) for _ in range(args.repeats)), key=lambda r: r.tokens_per_second)[
                args.repeats // 2
            ]
            rates[mode] = result.tokens_per_second
            records.append(dict(batch=batch, mode=mode, tokens=result.num_generated_tokens,
                                seconds=round(result.seconds, 4), tokens_per_s=round(result.tokens_per_second, 1)))
            speedup = f"{rates['kv'] / rates[mode]:.2f}x" if mode != "kv" and "kv" in rates else ""
            print(f"{batch:>5} {mode:>5} {result.num_generated_tokens:>7} {result.seconds:>8.3f} "
                  f"{result.tokens_per_second:>10.1f} {speedup:>10}", flush=True)
    summary = dict(preset=args.preset, dtype=args.dtype, device=device, prompt_len=args.prompt_len,
                   max_new_tokens=args.max_new_tokens, eos_prob=args.eos_prob, results=records)
    print("BENCH_ROLLOUT " + json.dumps(summary))
    distributed.destroy()
    return records


if __name__ == "__main__":
    main()
