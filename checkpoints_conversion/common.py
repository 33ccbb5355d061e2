"""What the architecture adapters share: tensor layouts, the rule format and the adapter base.

A :class:`Rule` says how ONE Megatron parameter is made from one or more Hugging Face tensors and
back. Names are templates: ``{i}`` is the layer index. Megatron names are the *checkpoint* names
(``self_attention.linear_qkv.layer_norm_weight``, not the local spec's ``input_layernorm.weight``):
:func:`megatron_parameters` applies each layer's ``sharded_state_dict_keys_map`` the way
Megatron's ``TransformerLayer.sharded_state_dict`` does, so the Transformer Engine and local layer
specs map to the same names.

Layouts (the facts of Megatron-Core's GPT layers):

* fused QKV: ``linear_qkv`` rows are grouped per query group; each group holds the
  ``heads / groups`` query heads of the group, then its key head, then its value head
  (``head_dim`` rows per head); the QKV bias (Qwen2) follows the same order;
* SwiGLU: ``linear_fc1`` is ``[gate_proj; up_proj]`` stacked along the output dimension;
* vocabulary: Megatron's embedding and output layer have ``padded_vocab_size`` rows; the rows past
  the true vocabulary are zero on import and dropped on export;
* tied embeddings: a single-stage model has only ``embedding.word_embeddings.weight``; an
  ``lm_head.weight`` in the HF files is accepted when it equals the embedding (HF's own
  ``save_pretrained`` omits it).

An :class:`Adapter` (one small subclass per architecture under ``adapters/``) picks the per-layer
rules of its architecture; :meth:`Adapter.mappings` expands them for a concrete preset.

Both commands also share the single-process Megatron world (:func:`build_single_process_model`),
the check that every tensor they write is finite in the output dtype
(:func:`~megatron_renio.models.checkpoint.all_finite`, :func:`nonfinite_error`), the check of the tokenizer
they copy (:func:`check_tokenizer`), the line a finished conversion prints (:func:`print_summary`) and the
command-line wrapper (:func:`make_parser`, :func:`run_cli`).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_renio.config import path_arg
from megatron_renio.data.tokenizer import load_tokenizer
from megatron_renio.errors import UserInputError
from megatron_renio.models.checkpoint import all_finite
from megatron_renio.models.presets import ModelPreset

Shape = tuple[int, ...]


class Layout:
    """Where each HF tensor of a rule lives inside the Megatron tensor.

    :meth:`views` returns, for a Megatron tensor, one view per HF tensor (in rule order) holding
    exactly that HF tensor's elements in the same element order; a view's shape may group rows
    (fused QKV), so HF data goes in with ``view.copy_(hf.reshape(view.shape))`` (or is read straight
    into a contiguous view) and comes out with ``view.reshape(hf_shape)``. :meth:`padding` is the
    part no HF tensor covers (zero on import). No layout allocates a whole-tensor temporary.
    """

    def hf_shapes(self, preset: ModelPreset, base_shape: Shape) -> list[Shape]:
        """The HF tensors' shapes, given the shape a plain copy would have (``base_shape``)."""
        return [base_shape]

    def views(self, preset: ModelPreset, tensor) -> list:
        return [tensor]

    def padding(self, preset: ModelPreset, tensor):
        return None


COPY = Layout()


class VocabLayout(Layout):
    """Embedding / output layer: the HF rows, then Megatron's padding rows up to the padded size."""

    def views(self, preset, tensor):
        return [tensor[: preset.vocab_size]]

    def padding(self, preset, tensor):
        return tensor[preset.vocab_size :]


class QKVLayout(Layout):
    """q, k, v (weights or biases) inside Megatron's fused ``linear_qkv``, grouped per query group."""

    def hf_shapes(self, preset, base_shape):
        q, kv = preset.num_attention_heads * preset.head_dim, preset.num_query_groups * preset.head_dim
        rest = base_shape[1:]
        return [(q, *rest), (kv, *rest), (kv, *rest)]

    def views(self, preset, tensor):
        heads_per_group = preset.num_attention_heads // preset.num_query_groups
        rows = [heads_per_group * preset.head_dim, preset.head_dim, preset.head_dim]
        per_group = tensor.view(preset.num_query_groups, sum(rows), *tensor.shape[1:])
        return list(per_group.split(rows, dim=1))


class GateUpLayout(Layout):
    """``gate_proj`` and ``up_proj`` inside Megatron's ``linear_fc1`` = [gate; up]."""

    def hf_shapes(self, preset, base_shape):
        return [(preset.ffn_hidden_size, preset.hidden_size)] * 2

    def views(self, preset, tensor):
        return list(tensor.chunk(2, dim=0))


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor from HF tensors. ``shape`` gives the plain-copy HF shape of a preset."""

    megatron: str
    hf: tuple[str, ...]
    shape: Callable[[ModelPreset], Shape]
    layout: Layout = COPY
    optional: bool = False  # only the tied lm_head duplicate: accepted when present, never written


@dataclass(frozen=True)
class Mapping:
    """A rule expanded for one layer of a concrete preset."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    layout: Layout
    optional: bool


def _hidden(p: ModelPreset) -> Shape:
    return (p.hidden_size,)


def _head(p: ModelPreset) -> Shape:
    return (p.head_dim,)


def _qkv_weight(p: ModelPreset) -> Shape:
    return ((p.num_attention_heads + 2 * p.num_query_groups) * p.head_dim, p.hidden_size)


def _qkv_bias(p: ModelPreset) -> Shape:
    return ((p.num_attention_heads + 2 * p.num_query_groups) * p.head_dim,)


def _vocab(p: ModelPreset) -> Shape:
    return (p.vocab_size, p.hidden_size)


_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."

ATTENTION = (
    Rule(_LAYER + "self_attention.linear_qkv.layer_norm_weight", (_HF_LAYER + "input_layernorm.weight",), _hidden),
    Rule(
        _LAYER + "self_attention.linear_qkv.weight",
        tuple(_HF_LAYER + f"self_attn.{x}_proj.weight" for x in "qkv"),
        _qkv_weight,
        QKVLayout(),
    ),
    Rule(
        _LAYER + "self_attention.linear_proj.weight",
        (_HF_LAYER + "self_attn.o_proj.weight",),
        lambda p: (p.hidden_size, p.num_attention_heads * p.head_dim),
    ),
)
QKV_BIAS = Rule(
    _LAYER + "self_attention.linear_qkv.bias",
    tuple(_HF_LAYER + f"self_attn.{x}_proj.bias" for x in "qkv"),
    _qkv_bias,
    QKVLayout(),
)
QK_NORM = (
    Rule(_LAYER + "self_attention.q_layernorm.weight", (_HF_LAYER + "self_attn.q_norm.weight",), _head),
    Rule(_LAYER + "self_attention.k_layernorm.weight", (_HF_LAYER + "self_attn.k_norm.weight",), _head),
)
MLP = (
    Rule(_LAYER + "mlp.linear_fc1.layer_norm_weight", (_HF_LAYER + "post_attention_layernorm.weight",), _hidden),
    Rule(
        _LAYER + "mlp.linear_fc1.weight",
        (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
        lambda p: (2 * p.ffn_hidden_size, p.hidden_size),
        GateUpLayout(),
    ),
    Rule(
        _LAYER + "mlp.linear_fc2.weight",
        (_HF_LAYER + "mlp.down_proj.weight",),
        lambda p: (p.hidden_size, p.ffn_hidden_size),
    ),
)
_EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _vocab, VocabLayout())
_FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _hidden)
_OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), _vocab, VocabLayout())
_TIED_OUTPUT = Rule("embedding.word_embeddings.weight", ("lm_head.weight",), _vocab, VocabLayout(), optional=True)


class Adapter:
    """The HF <-> Megatron mapping of one architecture; subclasses set the two class attributes."""

    architecture: str
    layer_rules: tuple[Rule, ...]

    def check_config(self, config: dict, source: str) -> None:
        """Reject ``config.json`` features this mapping cannot represent (one-line errors)."""
        unsupported = []
        if config.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={config['hidden_act']!r}")
        if config.get("mlp_bias"):
            unsupported.append("mlp_bias=true")
        if config.get("attention_bias") and QKV_BIAS not in self.layer_rules:
            unsupported.append("attention_bias=true")
        rope = config.get("rope_parameters") or {}  # transformers >= 5 nests rope settings here
        for name, value in (("partial_rotary_factor", config.get("partial_rotary_factor")),
                            ("rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor"))):
            if value is not None and value != 1:  # RoPE on part of each head; the model rotates all of it
                unsupported.append(f"{name}={value!r}")
        if unsupported:
            raise UserInputError(f"{source}: {self.architecture} with {', '.join(unsupported)} is not supported")

    def mappings(self, preset: ModelPreset) -> list[Mapping]:
        """Every rule expanded for ``preset``, in HF file order (embedding, layers, norm, head)."""
        rules = [(_EMBEDDING, None)]
        rules += [(rule, i) for i in range(preset.num_layers) for rule in self.layer_rules]
        rules.append((_FINAL_NORM, None))
        rules.append((_TIED_OUTPUT if preset.tie_word_embeddings else _OUTPUT, None))
        result = []
        for rule, i in rules:
            base = rule.shape(preset)
            result.append(
                Mapping(
                    megatron=rule.megatron.format(i=i),
                    hf=tuple(name.format(i=i) for name in rule.hf),
                    hf_shapes=tuple(rule.layout.hf_shapes(preset, base)),
                    layout=rule.layout,
                    optional=rule.optional,
                )
            )
        return result


_LAYER_NAME = re.compile(r"^(decoder\.layers\.\d+\.)(.*)$")


def megatron_parameters(model) -> dict:
    """The parameters of a single-stage model (PP=1) under their checkpoint names (see the
    module docstring); ``decoder.layers.{i}`` keeps the layer index."""
    keys_maps = {
        index: layer.submodules_config.sharded_state_dict_keys_map
        for index, layer in enumerate(model.decoder.layers)
    }
    result = {}
    for name, param in model.named_parameters():
        match = _LAYER_NAME.match(name)
        if match:
            prefix, rest = match.groups()
            index = int(prefix.split(".")[2])
            for old, new in keys_maps[index].items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = prefix + rest
        result[name] = param
    return result


# ---------------------------------------------------------------------------------------------
# What both conversion commands share: the single-process Megatron world and the CLI wrapper.

HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_single_process_model(preset: ModelPreset, dtype: str):
    """A world of one (TP=1, PP=1) and an uninitialised GPTModel of ``preset`` in ``dtype``.

    Weights are left uninitialised (``perform_initialization=False``): the caller fills every
    parameter, and no memory or time goes into random weights that would be overwritten.
    """
    from megatron_renio.distributed import ParallelConfig, initialize_single_process
    from megatron_renio.models.builder import build_gpt_model

    initialize_single_process(seed=0)
    return build_gpt_model(preset, ParallelConfig(), dtype, perform_initialization=False)


def nonfinite_error(where: str | Path, tensor_name: str, source, dtype) -> UserInputError:
    """The refusal of tensor ``tensor_name`` of ``where`` (the input file or checkpoint folder), whose
    values ``source`` (in the dtype the input holds them) are not all finite in the output ``dtype``:
    either the input holds NaN / inf, or its values exceed what ``dtype`` can hold (the hint names the
    --dtype that fits). Only called on failure: the extra passes cost nothing on a good checkpoint."""
    import torch

    if source.dtype == dtype or not all_finite(source):
        count = int((~torch.isfinite(source)).sum())
        return UserInputError(f"{where}: tensor {tensor_name} holds non-finite values ({count} NaN or inf of "
                              f"{source.numel()}); the checkpoint is broken and cannot be converted")
    largest = float(source.abs().max())
    limit = torch.finfo(dtype).max
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    hint = "--dtype bf16 (same range as fp32) or fp32" if dtype == torch.float16 else "--dtype fp32"
    return UserInputError(f"{where}: tensor {tensor_name} holds values that overflow {name} (largest magnitude "
                          f"{largest:.6g} > {limit:.6g}, {name}'s largest value) and become inf; convert with {hint}")


def check_tokenizer(tokenizer_dir: str | Path, preset: ModelPreset, vocabulary_source: str | Path) -> None:
    """Refuse a tokenizer folder that a conversion would copy but training could not use: one that does
    not load (:func:`~megatron_renio.data.tokenizer.load_tokenizer`'s one line naming it), or one with
    more ids than ``preset``'s vocabulary, which ``vocabulary_source`` (the file that sets it) names."""
    ids = load_tokenizer(str(tokenizer_dir)).vocab_size
    if ids > preset.vocab_size:
        raise UserInputError(f"the tokenizer in {tokenizer_dir} has {ids} ids, more than the model's vocabulary of "
                             f"{preset.vocab_size} ({vocabulary_source}); is it this model's tokenizer?")


def print_summary(preset: ModelPreset, dtype: str, tensors: int, target: str) -> None:
    """The one line on stdout that ends a conversion: the architecture, its parameter count (the
    unpadded model's, as transformers counts it), ``dtype`` (bf16, fp16 or fp32), the number of tensors
    converted and ``target`` (what was written, e.g. ``"the model checkpoint /ckpt/x"``)."""
    print(f"converted {tensors} tensors of a {preset.architecture} ({preset.num_parameters():,} parameters, "
          f"{dtype}) into {target}", flush=True)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (``--over`` must not pass for ``--overwrite``), as the other commands' parser."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(module: str, description: str, dtype_default: str) -> argparse.ArgumentParser:
    """A parser for ``python -m module`` with the flags both commands share: --save, --dtype
    (``dtype_default`` says what it defaults to), --overwrite, --debug. Path flags take
    :func:`~megatron_renio.config.path_arg` as their ``type``."""
    parser = _Parser(prog=f"python -m {module}", description=description)
    parser.add_argument("--save", required=True, type=path_arg, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--dtype", choices=tuple(HF_DTYPES), help=f"parameter dtype of the output (default: {dtype_default})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_cli(parser: argparse.ArgumentParser, run: Callable, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and call ``run(args)``. Bad input: ``error: <one line>`` on stderr, status 2
    (a traceback with ``--debug``). Megatron-Core's and torch.distributed.checkpoint's import-time
    and deprecation warnings are silenced unless ``--debug``. SIGTERM exits with status 143 through
    the writers' clean-up (their staging folders are removed). Tears the single-process world down
    at the end."""
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore", module=r"(megatron|torch\.distributed\.checkpoint)\.")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run(args)
    except UserInputError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if "megatron.core" in sys.modules:
            import torch

            if torch.distributed.is_initialized():
                from megatron_renio.distributed import destroy

                destroy()
    return 0
