"""Preset -> Megatron-Core ``TransformerConfig``, layer spec and ``GPTModel`` for this pipeline stage.

The student and the frozen teacher are both built here, with the same TP/PP layout. The
vocabulary is padded to a multiple of ``MAKE_VOCAB_SIZE_DIVISIBLE_BY x TP`` (Megatron's
``make_vocab_size_divisible_by`` rule, default 128); the true size stays in the preset so that
losses mask the padded rows. The Transformer Engine layer spec is used when TE imports and CUDA is
in use, Megatron's local spec otherwise; both save under the same parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_renio.distributed import ParallelConfig
from megatron_renio.errors import UserInputError
from megatron_renio.models.norm import RMSNorm
from megatron_renio.models.presets import ModelPreset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Megatron-LM's --make-vocab-size-divisible-by default: each TP rank's vocabulary shard is a multiple of it.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


def padded_vocab_size(true_vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of ``MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp_size`` that holds ``true_vocab_size``."""
    multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp_size
    return int(math.ceil(true_vocab_size / multiple) * multiple)


def check_divisibility(preset: ModelPreset, parallel: ParallelConfig, role: str = "model") -> None:
    """TP must divide heads, query groups and the FFN size; PP must divide the layers. Errors name the
    model by ``role`` (student, teacher)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    for what, value in (
        ("attention heads", preset.num_attention_heads),
        ("query groups (key/value heads)", preset.num_query_groups),
        ("FFN hidden size", preset.ffn_hidden_size),
    ):
        if value % tp:
            raise UserInputError(
                f"--tensor-model-parallel-size {tp} does not divide the {role}'s {what} ({value})"
            )
    if preset.num_layers % pp:
        raise UserInputError(
            f"--pipeline-model-parallel-size {pp} does not divide the {role}'s {preset.num_layers} layers"
        )


def use_transformer_engine() -> bool:
    """TE layer spec only when TE imports and CUDA is in use (never on the CPU backend)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def fused_softmax_available() -> bool:
    """Megatron's masked-softmax fusion needs its CUDA extension (shipped with TE / apex builds)."""
    if not torch.cuda.is_available():
        return False
    try:
        import scaled_masked_softmax_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(preset: ModelPreset, parallel: ParallelConfig, dtype: str = "fp32", **overrides):
    """The Megatron ``TransformerConfig`` of ``preset`` under ``parallel`` (no dropout, SwiGLU,
    RMSNorm, no linear biases except Qwen2's QKV bias)."""
    from megatron.core.transformer import TransformerConfig

    if dtype not in DTYPES:
        raise UserInputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_divisibility(preset, parallel)
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.rms_norm_eps,
        qk_layernorm=preset.qk_layernorm,
        add_bias_linear=False,
        add_qkv_bias=preset.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=fused_softmax_available(),
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        pipeline_dtype=DTYPES[dtype],
        use_cpu_initialization=on_cpu,
        init_method_std=0.02,
        # as Megatron-LM: a stage's output sent to the next one keeps only a placeholder until its backward
        deallocate_pipeline_outputs=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(preset: ModelPreset, config):
    """Block spec for this pipeline stage: TE spec when available, else local spec + RMSNorm."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=preset.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=preset.qk_layernorm, normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if preset.qk_layernorm:
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )


@dataclass(frozen=True)
class ModelInfo:
    """What the checkpoint code and the logs need to know about a built model: its preset and the
    width its embedding and output layer were built with."""

    preset: ModelPreset
    padded_vocab_size: int


def apply_llama3_rope_scaling(rope, preset: ModelPreset) -> None:
    """Megatron's constructor fixes the llama3 low/high factors and original context to Llama-3.1's
    (1, 4, 8192); recompute the inverse frequencies of ``rope`` (a ``RotaryEmbedding``) with the
    preset's own values."""
    dim = preset.head_dim
    base_inv_freq = 1.0 / (
        preset.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim)
    )
    s = preset.rope_scaling
    rope.inv_freq = rope._apply_scaling(
        base_inv_freq, factor=s.factor, low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position_embeddings,
    )


def build_gpt_model(
    preset: ModelPreset,
    parallel: ParallelConfig,
    dtype: str = "fp32",
    max_sequence_length: int | None = None,
    padded_vocab: int | None = None,
    **config_overrides,
):
    """A ``GPTModel`` holding this rank's TP shard of this pipeline stage's layers.

    Returns ``(model, info)``. Initialisation is seeded by :func:`megatron_renio.distributed.set_seeds`.
    ``padded_vocab``: the embedding / output width (a multiple of the TP size, at least the preset's
    vocabulary); default :func:`padded_vocab_size` of the preset's vocabulary.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(preset, parallel, dtype, **config_overrides)
    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    vocab = padded_vocab or padded_vocab_size(preset.vocab_size, parallel.tensor_model_parallel_size)
    if vocab < preset.vocab_size or vocab % parallel.tensor_model_parallel_size:
        raise ValueError(f"padded vocabulary {vocab} must hold {preset.vocab_size} ids and split over "
                         f"{parallel.tensor_model_parallel_size} TP ranks")
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(preset, config),
        vocab_size=vocab,
        max_sequence_length=max_sequence_length or preset.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=preset.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=preset.rope_theta,
    )
    if preset.rope_scaling is not None:
        apply_llama3_rope_scaling(model.rotary_pos_emb, preset)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, ModelInfo(preset, vocab)


def freeze(model) -> None:
    """A frozen teacher: no gradients, eval mode; it never enters an optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
