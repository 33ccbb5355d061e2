"""torchrun worker (2 ranks): load converted checkpoints at TP=2, PP=2 and TP=1 (x DP=2) in ONE
launch and report per-token log-probs; re-save checkpoints at TP=2 and PP=2 and load those at the
later layouts; report how a broken checkpoint fails.

Usage: ``conversion_parity.py OUT_DIR CASES.json``. CASES.json: ``{"models": {name: {"checkpoint":
DIR, "tokens": FILE.pt}}, "resave": {layout: [name, DIR]}, "broken": DIR, "mismatch": [name,
DIR], "rope_mismatch": DIR}``. Every model is built in fp32 (whatever dtype its checkpoint holds)
from the checkpoint's preset. A model re-saved at ``layout`` is reloaded by the later layouts as
``{name}_from_{layout}``. Each rank saves ``{"logprobs": {(layout, name): tensor [b, s-1] or None},
"errors": {case: message or None}}``; log-probs are reported by the last stage only. Error cases:
loading the ``broken`` checkpoint, loading the ``mismatch`` checkpoint (of model ``name``) into
another model, loading the ``rope_mismatch`` checkpoint (llama3 RoPE scaling) into its model with 4
times its scaling factor (``rope_factor``) and with no scaling (``rope_unscaled``), saving again into
a re-save folder.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from megatron_renio.distributed import ParallelConfig, destroy, initialize
from megatron_renio.errors import UserInputError
from megatron_renio.models.builder import build_gpt_model
from megatron_renio.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata, save_model_checkpoint
from tests.torchrun_harness import save_rank_result

LAYOUTS = {"tp2": ParallelConfig(tensor_model_parallel_size=2), "pp2": ParallelConfig(pipeline_model_parallel_size=2),
           "tp1": ParallelConfig()}


def last_stage_logits(model, tokens, ctx, hidden_size):
    """Full-vocabulary logits [b, s, V_padded] on the last stage (None elsewhere)."""
    from megatron.core import parallel_state

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    if not ctx.is_first_stage:
        hidden = torch.empty(seq, batch, hidden_size)
        torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, attention_mask=None)
    if not ctx.is_last_stage:
        torch.distributed.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    shards = [torch.empty_like(out) for _ in range(ctx.tp_size)]
    torch.distributed.all_gather(shards, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def token_logprobs(logits, tokens, vocab_size):
    logprobs = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    return logprobs[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def error_of(fn, *args):
    """The message of the UserInputError that ``fn(*args)`` raises (None if it succeeds)."""
    try:
        fn(*args)
    except UserInputError as e:
        return str(e)
    return None


def main(out_dir: str, cases_file: str) -> None:
    cases = json.loads(Path(cases_file).read_text())
    models = dict(cases["models"])  # grows by the checkpoints re-saved at TP=2 and PP=2
    result = {"logprobs": {}, "errors": {}}
    for layout, parallel in LAYOUTS.items():
        ctx = initialize(parallel, seed=0)
        built = {}
        for name, case in models.items():
            preset = read_checkpoint_metadata(case["checkpoint"]).preset
            model, info = build_gpt_model(preset, parallel, "fp32")
            model.eval()
            load_model_checkpoint(model, case["checkpoint"])
            built[name] = (model, info)
            tokens = torch.load(case["tokens"])
            with torch.no_grad():
                logits = last_stage_logits(model, tokens, ctx, preset.hidden_size)
            result["logprobs"][(layout, name)] = (
                None if logits is None else token_logprobs(logits, tokens, preset.vocab_size)
            )
        if layout in cases["resave"]:
            name, directory = cases["resave"][layout]
            save_model_checkpoint(*built[name], directory)
            models[f"{name}_from_{layout}"] = {**models[name], "checkpoint": directory}
            result["errors"][f"save_into_non_empty_{layout}"] = error_of(save_model_checkpoint, *built[name], directory)
        if layout == "tp2":
            model, _ = build_gpt_model(read_checkpoint_metadata(cases["broken"]).preset, parallel, "fp32")
            result["errors"]["broken"] = error_of(load_model_checkpoint, model, cases["broken"])
            other = next(name for name in models if name != cases["mismatch"][0])
            result["errors"]["mismatch"] = error_of(load_model_checkpoint, built[other][0], cases["mismatch"][1])
            scaled = read_checkpoint_metadata(cases["rope_mismatch"]).preset
            factor = dataclasses.replace(scaled.rope_scaling, factor=4 * scaled.rope_scaling.factor)
            for case, preset in (("rope_factor", scaled.replace(rope_scaling=factor)),
                                 ("rope_unscaled", scaled.replace(rope_scaling=None))):
                model, _ = build_gpt_model(preset, parallel, "fp32")
                result["errors"][case] = error_of(load_model_checkpoint, model, cases["rope_mismatch"])
    save_rank_result(out_dir, result)
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:3])
