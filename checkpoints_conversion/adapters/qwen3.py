"""Qwen3 (``Qwen3ForCausalLM``): GQA attention with RMSNorm on each query and key head (QK-norm),
no biases, SwiGLU MLP; the small sizes tie the output layer to the embedding."""

from checkpoints_conversion.common import ATTENTION, MLP, QK_NORM, Adapter


class Qwen3Adapter(Adapter):
    architecture = "Qwen3ForCausalLM"
    layer_rules = (*ATTENTION, *QK_NORM, *MLP)
