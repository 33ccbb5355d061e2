"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen (``Qwen2ForCausalLM``): GQA attention with a bias on
the query, key and value projections (none on the output projection), SwiGLU MLP."""

from checkpoints_conversion.common import ATTENTION, MLP, QKV_BIAS, Adapter


class Qwen2Adapter(Adapter):
    architecture = "Qwen2ForCausalLM"
    layer_rules = (*ATTENTION, QKV_BIAS, *MLP)
