"""Step-time split of one distillation step, against plain student training in the same run.

    python tools/bench_step.py                         # tiny model on CPU (fp32)
    python tools/bench_step.py --preset qwen3-0.6b     # on a GPU (bf16 by default there)

Measures, on one process and one micro-batch of ``--batch`` sequences of ``--seq`` tokens
(half prompt, half completion):

- ``distill+renio``: one DistillationStep (teacher forward, student forward/backward, the ReNIO-weighted
  loss) as the trainer runs it;
- ``distill``: the same without ReNIO;
- ``student+teacher``: plain student training (forward, vocab-parallel cross entropy, backward) plus a
  separate teacher forward: the cost any distillation must pay.

Prints the median times and two ratios: ReNIO's overhead (goal: under 1 %) and distillation's overhead
over student training plus the teacher forward (goal: under 15 %). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fns: dict, repeats: int) -> dict:
    """Median wall time in ms of each function (CUDA-synchronised), after one warm-up call each.

    The functions are interleaved round by round, so load from other processes hits them alike.
    """
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    from megatron_renio import distributed

    distributed.quiet_megatron_notices()
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_renio.data.batching import pack_pairs
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.losses.divergence import DivergenceConfig
    from megatron_renio.models.builder import build_gpt_model, freeze
    from megatron_renio.config import POSITIVE_INT
    from megatron_renio.models.presets import PRESETS, get_preset
    from megatron_renio.renio.weights import ReNIOConfig, ReNIONormalizer
    from megatron_renio.training.components import wrap_ddp
    from megatron_renio.training.paired import PairedModel
    from megatron_renio.training.step import DistillationStep, LossSettings

    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-0.6b" if gpu else "tiny-qwen3", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=POSITIVE_INT, default=4)
    parser.add_argument("--seq", type=POSITIVE_INT, default=2048 if gpu else 256)
    parser.add_argument("--repeats", type=POSITIVE_INT, default=7)
    args = parser.parse_args(argv)

    distributed.initialize(ParallelConfig(), seed=0)
    preset = get_preset(args.preset)
    student, info = build_gpt_model(preset, ParallelConfig(), args.dtype, max_sequence_length=args.seq)
    teacher, _ = build_gpt_model(preset, ParallelConfig(), args.dtype, max_sequence_length=args.seq)
    freeze(teacher)
    ddp = wrap_ddp(student, use_distributed_optimizer=False)
    paired = PairedModel(ddp, teacher, preset.hidden_size, preset.hidden_size)

    g = torch.Generator().manual_seed(0)
    half = args.seq // 2
    prompts = [torch.randint(0, preset.vocab_size, (half,), generator=g).tolist() for _ in range(args.batch)]
    completions = [torch.randint(0, preset.vocab_size, (half,), generator=g).tolist() for _ in range(args.batch)]
    batch = pack_pairs(prompts, prompts, completions, eos_id=-1, pad_id=0, seq_length=args.seq)

    def distill_step(renio: bool):
        settings = LossSettings(DivergenceConfig("forward_kl", temperature=1.1), ReNIOConfig(enabled=renio), "divergence")
        step = DistillationStep(paired, [ddp], settings, ReNIONormalizer(), preset.vocab_size)

        def run():
            ddp.zero_grad_buffer()
            step.run([batch])

        return run

    device = next(student.parameters()).device
    tokens = batch.student.tokens.to(device)
    positions = batch.student.position_ids.to(device)
    labels = batch.student.labels.to(device)

    def student_and_teacher():
        ddp.zero_grad_buffer()
        with torch.no_grad():
            teacher(tokens, positions, attention_mask=None)
        logits = ddp(tokens, positions, attention_mask=None)
        loss = vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(), labels.t().contiguous()).mean()
        loss.backward()

    results = timed(
        {"distill+renio": distill_step(True), "distill": distill_step(False), "student+teacher": student_and_teacher},
        args.repeats,
    )
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"{args.preset} {args.dtype} batch={args.batch} seq={args.seq} on {device_name}")
    for name, ms in results.items():
        print(f"  {name:<16} {ms:9.2f} ms")
    renio_overhead = results["distill+renio"] / results["distill"] - 1
    distill_overhead = results["distill+renio"] / results["student+teacher"] - 1
    print(f"  ReNIO overhead {renio_overhead:+.2%} (goal < 1%); distillation overhead {distill_overhead:+.2%} (goal < 15%)")
    print(f"renio_overhead={renio_overhead:.4f} distillation_overhead={distill_overhead:.4f}")
    distributed.destroy()
    return results


if __name__ == "__main__":
    main()
