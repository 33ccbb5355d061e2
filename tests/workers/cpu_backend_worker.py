"""torchrun worker (2 ranks): Megatron's GPTModel and schedules on the CPU backend."""

import sys

import torch

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig
from megatron_renio.models.builder import build_gpt_model
from megatron_renio.models.presets import get_preset
from tests.torchrun_harness import save_rank_result

PRESET = get_preset("tiny-qwen3").replace(vocab_size=250)


def batch(seed, b=2, s=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 250, (b, s), generator=g)
    return tokens, torch.arange(s).expand(b, s), torch.roll(tokens, -1, dims=1)


def lm_loss(logits, labels):
    # GPTModel returns [b, s, V/TP]; Megatron's cross entropy takes [s, b, V/TP]
    return vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(), labels.t().contiguous()).mean()


def run_schedule(model, num_microbatches, seq):
    batches = iter([batch(i, s=seq) for i in range(num_microbatches)])

    def forward_step(data_iterator, model):
        tokens, pos, labels = next(data_iterator)
        out = model(tokens, pos, attention_mask=None)  # logits on the last stage, hidden states elsewhere

        def loss_func(logits):
            loss = lm_loss(logits, labels)
            return loss, {"loss": loss.detach()}

        return out, loss_func

    model.config.pipeline_dtype = torch.float32
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model],
        num_microbatches=num_microbatches, seq_length=seq, micro_batch_size=2, forward_only=False,
    )
    return [float(x["loss"]) for x in losses]


def grads_ok(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return len(grads), all(torch.isfinite(g).all() for g in grads)


def main(out_dir):
    result = {}
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    distributed.initialize(tp2, seed=3)
    model, _ = build_gpt_model(PRESET, tp2)
    tokens, pos, labels = batch(0)
    logits = model(tokens, pos, attention_mask=None)
    result["tp_forward_shape"] = tuple(logits.shape)
    lm_loss(logits, labels).backward()
    result["tp_grad_count"], result["tp_grads_finite"] = grads_ok(model)
    result["qkv_shard"] = model.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone()
    model.zero_grad()
    result["no_pipelining_losses"] = run_schedule(model, 3, 16)

    distributed.initialize(tp2, seed=3)
    again, _ = build_gpt_model(PRESET, tp2)
    result["same_seed_same_weights"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    distributed.initialize(tp2, seed=4)
    other, _ = build_gpt_model(PRESET, tp2)
    result["other_seed_other_weights"] = not torch.equal(
        model.decoder.layers[0].mlp.linear_fc1.weight, other.decoder.layers[0].mlp.linear_fc1.weight
    )

    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    distributed.initialize(pp2, seed=3)
    model, _ = build_gpt_model(PRESET, pp2)
    result["pp_losses"] = run_schedule(model, 4, 16)
    result["pp_grad_count"], result["pp_grads_finite"] = grads_ok(model)
    save_rank_result(out_dir, result)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
