"""torchrun worker (2 ranks): the rollout under TP=1 (two data-parallel replicas), TP=2, TP=2 with
sequence parallelism and PP=2, all on the same weights (saved at TP=1 with dist_checkpointing and
loaded in each layout). Each rank reports, per layout, the completions of every check; the test
compares them."""

import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig
from megatron_renio.models.builder import build_gpt_model
from megatron_renio.models.presets import get_preset
from megatron_renio.rollout.generate import generate
from megatron_renio.rollout.sampling import SamplingConfig
from tests.torchrun_harness import save_rank_result

VOCAB = 250  # padded to 256: rows 250..255 are padding
PRESET = get_preset("tiny-qwen3").replace(vocab_size=VOCAB)
INIT_STD = 0.2  # peaked logits: clear argmax gaps, varied greedy tokens
PROMPTS = [[5, 17, 42, 8, 99], [7, 3, 200], [10, 11, 12, 13, 14, 15, 16, 17], [64, 1, 2, 3]]
MAX_NEW = 12
MAX_SEQ = 64
ROW_LIMITS = [1, 5, 2, 40]  # per prompt; the last is above MAX_NEW, which still applies
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW, greedy=True)
SAMPLED = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, top_p=0.9)
HOT = SamplingConfig(max_new_tokens=MAX_NEW, temperature=5.0)
EOS = VOCAB - 1  # an ordinary token id; the EOS checks pick a token the model actually generates


def sequence_parallel_flags(model):
    return [model.config.sequence_parallel] + [
        m.sequence_parallel for m in model.modules() if hasattr(m, "sequence_parallel")
    ]


def run(model, prompts=PROMPTS, cfg=GREEDY, eos=EOS, seed=0, max_seq=MAX_SEQ, kv=True, limits=None, max_batch=None):
    return generate(
        model, prompts, cfg, eos_id=eos, true_vocab_size=VOCAB, seed=seed,
        max_sequence_length=max_seq, use_kv_cache=kv, limits=limits, max_batch=max_batch,
    )


def boost_padded_rows(model):
    """Make the padded vocabulary rows of the output layer dominate the logits (PP=1, tied)."""
    emb = model.embedding.word_embeddings
    lo, hi = emb.vocab_start_index, emb.vocab_end_index
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for row in range(max(lo, VOCAB), hi):
            emb.weight[row - lo] = 50.0 * torch.randn(emb.weight.size(1), generator=g)


def nan_padded_rows(model):
    """Make the padded vocabulary columns of the logits NaN (PP=1, tied: the padded embedding rows)."""
    emb = model.embedding.word_embeddings
    lo, hi = emb.vocab_start_index, emb.vocab_end_index
    with torch.no_grad():
        emb.weight[max(lo, VOCAB) - lo : hi - lo] = float("nan")


def nan_model_flags(model):
    """``nonfinite`` of greedy / sampled / full-recompute runs with a NaN in the last stage's final norm
    (every logit NaN), and the completions of a greedy run; the weight is restored afterwards."""
    norm = getattr(model.decoder, "final_layernorm", None)
    saved = None if norm is None else norm.weight.detach().clone()
    if norm is not None:
        with torch.no_grad():
            norm.weight[3] = float("nan")
    try:
        runs = [run(model), run(model, cfg=SAMPLED, seed=11), run(model, kv=False)]
    finally:
        if norm is not None:
            with torch.no_grad():
                norm.weight.copy_(saved)
    return [r.nonfinite for r in runs], [len(c) for c in runs[0].completions]


def transient_nan_flags(model):
    """``nonfinite`` when one logits row is NaN at the first step only: row 1 (the shortest prompt, its
    first drawn token: the flag must stay set through the finite steps after it) and row 0 (still
    in its prompt at that step: no token is drawn from it, so no flag)."""
    from megatron_renio.rollout import generate as rollout

    real = rollout._stage_forward
    flags = []
    for row in (1, 0):
        calls = []

        def first_step_nan(*args):
            logits = real(*args)
            if logits is not None and not calls:
                logits = logits.clone()
                logits[row] = float("nan")
            calls.append(None)
            return logits

        rollout._stage_forward = first_step_nan
        try:
            flags.append(run(model).nonfinite)
        finally:
            rollout._stage_forward = real
    return flags


def unmasked_argmax(model, prompt):
    """Argmax over the full padded vocabulary at the prompt's last position (PP=1)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], attention_mask=None)
        full = gather_from_tensor_model_parallel_region(logits[:, -1].contiguous())
    model.train()
    return int(full.argmax())


def whole_batch_and_compactions(model):
    """(greedy completions when ended samples never leave the batch, the batch sizes that the default
    greedy run compacted to)."""
    from megatron_renio.rollout import generate as rollout

    sizes = []
    keep_rows, compact_below = rollout._keep_cache_rows, rollout._COMPACT_BELOW

    def counting(context, keep, length):
        sizes.append(len(keep))
        keep_rows(context, keep, length)

    rollout._keep_cache_rows = counting
    try:
        run(model)
    finally:
        rollout._keep_cache_rows = keep_rows
    rollout._COMPACT_BELOW = 0.0
    try:
        whole = run(model).completions
    finally:
        rollout._COMPACT_BELOW = compact_below
    return whole, sizes


def greedy_with_a_disagreeing_rank(model):
    """Greedy completions when TP rank 1's sampler picks another token than rank 0's (the argmax
    plus one): TP rank 0's tokens must be what every rank returns."""
    from megatron_renio.rollout import generate as rollout

    original = rollout.sample_next

    def disagreeing(logits, cfg, generator=None, uniforms=None):
        return (original(logits, cfg, generator, uniforms) + 1) % logits.size(-1)

    if parallel_state.get_tensor_model_parallel_rank() == 1:
        rollout.sample_next = disagreeing
    try:
        return run(model).completions
    finally:
        rollout.sample_next = original


def kv_cache_rows(call):
    """(``call()``, the row count of every KV cache generate made for it)."""
    from megatron.core.inference import contexts

    original, rows = contexts.StaticInferenceContext, []

    class Recorded(original):
        def __init__(self, max_batch_size, *args, **kwargs):
            rows.append(max_batch_size)
            super().__init__(max_batch_size, *args, **kwargs)

    contexts.StaticInferenceContext = Recorded
    try:
        return call(), rows
    finally:
        contexts.StaticInferenceContext = original


def checks(model):
    out = {}
    model.train()
    greedy = run(model)
    out["training_restored"] = model.training
    out["greedy_kv"] = greedy.completions
    out["greedy_kv_generated"] = greedy.num_generated_tokens
    out["greedy_full"] = run(model, kv=False).completions
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        out["rank1_disagrees"] = greedy_with_a_disagreeing_rank(model)
    out["greedy_alone"] = [run(model, prompts=[p]).completions[0] for p in PROMPTS]
    out["greedy_whole_batch"], out["compacted_to"] = whole_batch_and_compactions(model)
    sampled = run(model, cfg=SAMPLED, seed=11)
    out["sampled_a"] = sampled.completions
    out["finite_flags"] = [greedy.nonfinite, sampled.nonfinite]
    out["sampled_a_again"] = run(model, cfg=SAMPLED, seed=11).completions
    out["sampled_b"] = run(model, cfg=SAMPLED, seed=12).completions
    out["sampled_full"] = run(model, cfg=SAMPLED, seed=11, kv=False).completions
    in_turns, cache_rows = kv_cache_rows(lambda: run(model, cfg=SAMPLED, seed=11, max_batch=3))  # 3, then 1
    out["sampled_in_turns"] = (in_turns.completions, in_turns.num_generated_tokens, cache_rows)
    # EOS: a token that prompt 0's greedy completion first produces at step 4 or later
    first = greedy.completions[0]
    eos = next(t for i, t in enumerate(first) if i >= 3 and t not in first[:i])
    out["eos_id"] = eos
    out["eos_kv"] = run(model, eos=eos).completions
    out["eos_among_stop_ids"] = run(model, eos=[EOS, eos]).completions
    out["eos_full"] = run(model, eos=eos, kv=False).completions
    out["short"] = run(model, cfg=SamplingConfig(max_new_tokens=3, greedy=True)).completions
    out["seq_limit"] = run(model, max_seq=10).completions  # longest prompt (8) gets 2 tokens
    out["row_limits"] = run(model, limits=ROW_LIMITS).completions
    out["row_limits_full"] = run(model, limits=ROW_LIMITS, kv=False).completions
    out["row_limits_in_turns"] = run(model, limits=ROW_LIMITS, max_batch=1).completions
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        boost_padded_rows(model)
        out["unmasked_argmax"] = unmasked_argmax(model, PROMPTS[2])  # 8 tokens: splits under SP
        out["pad_greedy"] = run(model).completions
        out["pad_hot"] = run(model, cfg=HOT, seed=3).completions
        nan_padded_rows(model)
        padded_nan = run(model)
        out["pad_nan"] = (padded_nan.completions, padded_nan.nonfinite)
    out["nan_model"] = nan_model_flags(model)
    out["transient_nan"] = transient_nan_flags(model)
    out["after_nan_model"] = run(model).nonfinite  # the flag belongs to one call
    return out


def input_errors(model):
    """The messages of the UserInputErrors that bad arguments raise."""
    from megatron_renio.errors import UserInputError

    bad = [
        dict(prompts=[]),
        dict(prompts=[[1, 2], []]),
        dict(prompts=[list(range(MAX_SEQ))]),
        dict(prompts=[[1, VOCAB]]),
        dict(eos=VOCAB),
        dict(eos=[]),
        dict(cfg=SamplingConfig(max_new_tokens=0)),
    ]
    messages = []
    for kwargs in bad:
        try:
            run(model, **kwargs)
            messages.append(None)
        except UserInputError as e:
            messages.append(str(e))
    for limits in ([1, 1, 0, 1], [1, 1]):  # a caller's error: a bound below 1, or not one per prompt
        try:
            run(model, limits=limits)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


def build(parallel, ckpt):
    model, _ = build_gpt_model(PRESET, parallel, init_method_std=INIT_STD)
    if ckpt is not None:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt))
        model.load_state_dict(state)
    return model


def main(out_dir):
    ckpt = Path(out_dir) / "tp1_weights"
    ckpt.mkdir(parents=True, exist_ok=True)
    result = {}

    tp1 = ParallelConfig()
    distributed.initialize(tp1, seed=5)
    model = build(tp1, None)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    torch.distributed.barrier()
    result["tp1"] = checks(model)
    result["tp1"]["input_errors"] = input_errors(model)

    for name, parallel in (
        ("tp2", ParallelConfig(tensor_model_parallel_size=2)),
        ("tp2_sp", ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)),
        ("pp2", ParallelConfig(pipeline_model_parallel_size=2)),
    ):
        distributed.initialize(parallel, seed=5)
        model = build(parallel, ckpt)
        flags = sequence_parallel_flags(model)
        result[name] = checks(model)
        result[name]["sp_flags"] = (flags, sequence_parallel_flags(model))
    save_rank_result(out_dir, result)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
