"""Llama-3 / 3.1 / 3.2 (``LlamaForCausalLM``): GQA attention without biases, SwiGLU MLP, Llama-3
RoPE frequency scaling (carried by the preset); Llama-3.2 1B/3B tie the output layer."""

from checkpoints_conversion.common import ATTENTION, MLP, Adapter


class LlamaAdapter(Adapter):
    architecture = "LlamaForCausalLM"
    layer_rules = (*ATTENTION, *MLP)
