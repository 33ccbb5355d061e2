"""Model presets: the architecture of a decoder-only LLM, independent of how it is parallelised.

A :class:`ModelPreset` holds the Hugging Face view of an architecture (the fields of its
``config.json``). Named presets cover Qwen3, Qwen2/Qwen2.5 (DeepSeek-R1-Distill-Qwen) and
Llama-3 shapes plus a ``tiny-*`` family for tests; :func:`preset_from_hf_config` builds one from
any supported ``config.json``. :mod:`megatron_renio.models.builder` turns a preset into a
Megatron-Core ``TransformerConfig`` + layer spec + ``GPTModel``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_renio.errors import UserInputError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
# head_dim of a config.json that names none, as transformers reads it: Qwen3Config defaults it to 128;
# Qwen2 and Llama use hidden_size / num_attention_heads.
_DEFAULT_HEAD_DIM = {"Qwen3ForCausalLM": 128}
# transformers' max_position_embeddings default per architecture (a config.json without the field)
_DEFAULT_MAX_POSITIONS = {"Qwen3ForCausalLM": 32768, "Qwen2ForCausalLM": 32768, "LlamaForCausalLM": 2048}
_SLIDING_WINDOW_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM")  # their configs have use_sliding_window
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id")  # one id or a list of ids in config.json
# Preset fields that change no weight and no result (max_position_embeddings: with RoPE a run builds
# its model for its own --seq-length), as the load-time check and checkpoint_fingerprint read them.
_NOT_ARCHITECTURE = ("max_position_embeddings", *_TOKEN_ID_FIELDS, "pad_token_id")


# What a preset field of each annotated type accepts: (check, the allowed values in words). Ints are not
# bools; floats take ints too.
_FIELD_RULES = {
    int: (lambda v: type(v) is int and v > 0, "a positive integer"),
    float: (lambda v: type(v) in (int, float) and 0 < v < float("inf"), "a positive number"),
    bool: (lambda v: type(v) is bool, "true or false"),
    str: (lambda v: type(v) is str, "a string"),
}


def _check_fields(obj) -> None:
    """ValueError naming the first field of a preset dataclass whose value breaks :data:`_FIELD_RULES`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(f.type, f.type)  # postponed annotations
        if kind in _FIELD_RULES and not _FIELD_RULES[kind][0](value):
            raise ValueError(f"{f.name} must be {_FIELD_RULES[kind][1]}, got {value!r}")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.x RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check_fields(self)


@dataclass(frozen=True)
class ModelPreset:
    """A decoder-only transformer in Hugging Face terms.

    ``vocab_size`` is the TRUE vocabulary size (``config.json``'s ``vocab_size``); the Megatron
    model pads it (see ``builder.padded_vocab_size``) and the padded rows are masked in every loss.
    ``bos_token_id`` / ``eos_token_id`` are what ``config.json`` holds: one id (an int), several ids
    (a tuple here, a list in JSON: Llama-3.1-Instruct stops on any of three) or None;
    ``pad_token_id`` one integer (LLaMA-1-era configs hold -1) or None. All are written back unchanged.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        """ValueError naming the first field of the wrong type (a hand-edited ``renio_model.json``, say), or
        the head counts when ``num_attention_heads`` is not a multiple of ``num_query_groups``."""
        _check_fields(self)
        if self.num_attention_heads % self.num_query_groups:  # each query group holds a whole number of heads
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_query_groups ({self.num_query_groups})")
        if not (self.rope_scaling is None or isinstance(self.rope_scaling, Llama3RopeScaling)):
            raise ValueError(f"rope_scaling must be a llama3 scaling or none, got {self.rope_scaling!r}")
        for name in _TOKEN_ID_FIELDS:
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else (value,)
            if value is not None and not all(type(i) is int and i >= 0 for i in ids):
                raise ValueError(f"{name} must be a token id, a list of token ids or none, got {value!r}")
        if not (self.pad_token_id is None or type(self.pad_token_id) is int):
            raise ValueError(f"pad_token_id must be an integer or none, got {self.pad_token_id!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelPreset":
        """Inverse of :meth:`to_dict`, also after a JSON round trip (which turns tuples into lists)."""
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = Llama3RopeScaling(**data["rope_scaling"])
        for name in _TOKEN_ID_FIELDS:
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)

    def architecture_differences(self, other: "ModelPreset") -> list[str]:
        """``'<field> <self's value> vs <other's>'`` for every field where ``other`` differs, but those
        that change no weight and no result (:data:`_NOT_ARCHITECTURE`): whether the weights of one
        fit the other."""
        return [f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}" for f in dataclasses.fields(self)
                if f.name not in _NOT_ARCHITECTURE and getattr(self, f.name) != getattr(other, f.name)]

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model (embeddings counted once when tied)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_layernorm else 0
        layer = attn + 3 * h * f + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * layer + embed + h


def _qwen3(layers, hidden, ffn, heads, kv, tie) -> ModelPreset:
    return ModelPreset(
        "Qwen3ForCausalLM", layers, hidden, ffn, heads, kv, 128, 151936, 40960, 1_000_000.0,
        1e-6, qk_layernorm=True, tie_word_embeddings=tie, bos_token_id=151643, eos_token_id=151645,
    )


def _qwen2(layers, hidden, ffn, heads, kv, vocab, rope, tie, max_pos=131072) -> ModelPreset:
    return ModelPreset(
        "Qwen2ForCausalLM", layers, hidden, ffn, heads, kv, hidden // heads, vocab, max_pos, rope,
        1e-6, add_qkv_bias=True, tie_word_embeddings=tie, bos_token_id=151643, eos_token_id=151643,
    )


def _llama3(layers, hidden, ffn, heads, kv, head_dim, tie, factor) -> ModelPreset:
    return ModelPreset(
        "LlamaForCausalLM", layers, hidden, ffn, heads, kv, head_dim, 128256, 131072, 500_000.0,
        1e-5, tie_word_embeddings=tie, rope_scaling=Llama3RopeScaling(factor=factor),
        bos_token_id=128000, eos_token_id=128009,
    )


def _tiny(architecture, vocab=256, **kw) -> ModelPreset:
    base = dict(
        architecture=architecture, num_layers=2, hidden_size=64, ffn_hidden_size=128,
        num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=vocab,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
    )
    base.update(kw)
    return ModelPreset(**base)


PRESETS: dict[str, ModelPreset] = {
    "qwen3-0.6b": _qwen3(28, 1024, 3072, 16, 8, tie=True),
    "qwen3-1.7b": _qwen3(28, 2048, 6144, 16, 8, tie=True),
    "qwen3-4b": _qwen3(36, 2560, 9728, 32, 8, tie=True),
    "qwen3-8b": _qwen3(36, 4096, 12288, 32, 8, tie=False),
    "qwen3-14b": _qwen3(40, 5120, 17408, 40, 8, tie=False),
    "qwen3-32b": _qwen3(64, 5120, 25600, 64, 8, tie=False),
    "qwen2.5-1.5b": _qwen2(28, 1536, 8960, 12, 2, 151936, 1_000_000.0, tie=True, max_pos=32768),
    "qwen2.5-7b": _qwen2(28, 3584, 18944, 28, 4, 152064, 1_000_000.0, tie=False, max_pos=32768),
    "deepseek-r1-distill-qwen-1.5b": _qwen2(28, 1536, 8960, 12, 2, 151936, 10000.0, tie=False),
    "deepseek-r1-distill-qwen-7b": _qwen2(28, 3584, 18944, 28, 4, 152064, 10000.0, tie=False),
    "llama-3.1-8b": _llama3(32, 4096, 14336, 32, 8, 128, tie=False, factor=8.0),
    "llama-3.2-1b": _llama3(16, 2048, 8192, 32, 8, 64, tie=True, factor=32.0),
    "llama-3.2-3b": _llama3(28, 3072, 8192, 24, 8, 128, tie=True, factor=32.0),
    # Tiny shapes for tests and the CPU quickstart: same features as the real families.
    "tiny-qwen3": _tiny("Qwen3ForCausalLM", qk_layernorm=True, tie_word_embeddings=True),
    "tiny-qwen3-untied": _tiny("Qwen3ForCausalLM", qk_layernorm=True),
    "tiny-qwen2": _tiny("Qwen2ForCausalLM", add_qkv_bias=True),
    "tiny-llama3": _tiny("LlamaForCausalLM", rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64)),
    "tiny-qwen3-wide": _tiny(
        "Qwen3ForCausalLM", num_layers=3, hidden_size=96, ffn_hidden_size=192, num_attention_heads=6,
        num_query_groups=2, qk_layernorm=True, tie_word_embeddings=True,
    ),
    # The quickstart's teacher and student architecture (megatron_renio.quickstart).
    "quickstart": _tiny(
        "Qwen3ForCausalLM", num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
        num_query_groups=2, head_dim=32, qk_layernorm=True, tie_word_embeddings=True,
    ),
}


def get_preset(name: str) -> ModelPreset:
    """A named preset; unknown names list the known ones."""
    key = name.lower()
    if key not in PRESETS:
        raise UserInputError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def _llama3_scaling(rope_scaling: dict | None, field: str, source: str) -> Llama3RopeScaling | None:
    """The llama3 scaling of ``rope_scaling`` (the config's ``field``: ``rope_scaling``, or transformers
    5's ``rope_parameters``), every one of its values given: a default would not be the model's
    (transformers 4 refuses a block without one, transformers 5 starts the scaling at
    ``max_position_embeddings`` without ``original_max_position_embeddings``)."""
    if not rope_scaling:
        return None
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise UserInputError(f"{source}: {field} type {rope_type!r} is not supported (only 'llama3')")
    names = [f.name for f in dataclasses.fields(Llama3RopeScaling)]
    missing = [name for name in names if rope_scaling.get(name) is None]
    if missing:
        raise UserInputError(f"{source}: {field} has no {', '.join(map(repr, missing))}")
    try:
        return Llama3RopeScaling(**{name: rope_scaling[name] for name in names})
    except ValueError as e:
        raise UserInputError(f"{source}: {field}.{e}") from None


def _token_ids(config: dict, name: str, source: str) -> int | tuple[int, ...] | None:
    """``config[name]`` as a preset holds it: one id stays an int, a list of ids becomes a tuple."""
    value = config.get(name)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(type(i) is int and i >= 0 for i in ids):
        raise UserInputError(f"{source}: {name} must be a token id or a list of token ids, got {value!r}")
    return tuple(value) if isinstance(value, list) else value


def _pad_id(config: dict, source: str) -> int | None:
    """``config['pad_token_id']``: an integer, kept as written (-1 in LLaMA-1-era configs), or None."""
    value = config.get("pad_token_id")
    if not (value is None or type(value) is int):
        raise UserInputError(f"{source}: pad_token_id must be an integer, got {value!r}")
    return value


def _windowed_layers(config: dict, num_layers: int, source: str) -> list[int]:
    """The layers to which transformers gives a sliding window, as Qwen2Config / Qwen3Config decide: none
    unless ``use_sliding_window`` is true and ``sliding_window`` is set; then those ``layer_types`` marks
    ``sliding_attention`` or, without ``layer_types``, every layer from ``max_window_layers`` (default 28) on."""
    if not config.get("use_sliding_window") or config.get("sliding_window", 4096) is None:
        return []
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise UserInputError(f"{source}: layer_types must be a list, got {layer_types!r}")
        return [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    first = config.get("max_window_layers", 28)
    if type(first) is not int:
        raise UserInputError(f"{source}: max_window_layers must be an integer, got {first!r}")
    return list(range(max(first, 0), num_layers))


def preset_from_hf_config(config: dict, source: str = "config.json") -> ModelPreset:
    """Build a preset from the dict of an HF ``config.json``; ``source`` names the file in errors."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise UserInputError(f"{source}: architectures must be a list of class names, got {architectures!r}")
    for name in ("rope_scaling", "rope_parameters"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise UserInputError(f"{source}: {name} must be a JSON object or null, got {config[name]!r}")
    architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise UserInputError(
            f"{source}: unsupported architecture {architectures or config.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def checked(name, value, kind):
        """``value`` of the field ``name`` checked by the ``kind`` rule of a preset field."""
        check, allowed = _FIELD_RULES[kind]
        if not check(value):
            raise UserInputError(f"{source}: {name} must be {allowed}, got {value!r}")
        return kind(value)

    def field(name, default=None, kind=int):
        """config[name] (``default`` when absent or null) checked by the ``kind`` rule of a preset field."""
        value = config.get(name)
        value = default if value is None else value
        if value is None:
            raise UserInputError(f"{source}: missing field {name!r}")
        return checked(name, value, kind)

    heads = field("num_attention_heads")
    kv_heads = field("num_key_value_heads", heads)
    if heads % kv_heads:
        raise UserInputError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                             f"({kv_heads})")
    hidden = field("hidden_size")
    rope = config.get("rope_parameters") or {}  # transformers >= 5 nests rope settings here
    theta_key, rope_theta = next(
        ((key, value) for key, value in (("rope_theta", config.get("rope_theta")),
                                         ("rope_parameters.rope_theta", rope.get("rope_theta"))) if value is not None),
        ("rope_theta", 10000.0),
    )
    scaling_field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    num_layers = field("num_hidden_layers")
    if architecture in _SLIDING_WINDOW_ARCHITECTURES and (windowed := _windowed_layers(config, num_layers, source)):
        raise UserInputError(f"{source}: use_sliding_window is true and {len(windowed)} of the layers (from layer "
                             f"{windowed[0]}) use a sliding window; sliding-window attention is not supported")
    return ModelPreset(
        architecture=architecture,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=field("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=field("head_dim", _DEFAULT_HEAD_DIM.get(architecture, hidden // heads)),
        vocab_size=field("vocab_size"),
        max_position_embeddings=field("max_position_embeddings", _DEFAULT_MAX_POSITIONS[architecture]),
        rope_theta=checked(theta_key, rope_theta, float),
        rms_norm_eps=field("rms_norm_eps", 1e-6, float),
        qk_layernorm=architecture == "Qwen3ForCausalLM",
        add_qkv_bias=architecture == "Qwen2ForCausalLM" or field("attention_bias", False, bool),
        tie_word_embeddings=field("tie_word_embeddings", False, bool),
        rope_scaling=_llama3_scaling(scaling, scaling_field, source),
        bos_token_id=_token_ids(config, "bos_token_id", source),
        eos_token_id=_token_ids(config, "eos_token_id", source),
        pad_token_id=_pad_id(config, source),
    )


def read_hf_config(hf_dir: str | Path) -> dict:
    """The JSON object of ``<hf_dir>/config.json``; one-line errors naming the file when it is missing,
    not UTF-8, not valid JSON or not a JSON object (give the result to :func:`preset_from_hf_config`)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserInputError(f"no config.json in {hf_dir}")
    data = path.read_bytes()
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = 1 + data.count(b"\n", 0, e.start)
        raise UserInputError(f"{path}: not UTF-8 text at line {line} ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def hf_config_dict(preset: ModelPreset, torch_dtype: str = "bfloat16") -> dict:
    """The HF ``config.json`` content for ``preset`` (inverse of :func:`preset_from_hf_config`)."""
    model_type = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
    config = {
        "architectures": [preset.architecture],
        "model_type": model_type[preset.architecture],
        "num_hidden_layers": preset.num_layers,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.ffn_hidden_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_query_groups,
        "head_dim": preset.head_dim,
        "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "rope_theta": preset.rope_theta,
        "rms_norm_eps": preset.rms_norm_eps,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    for name in _TOKEN_ID_FIELDS:
        ids = getattr(preset, name)
        config[name] = list(ids) if isinstance(ids, tuple) else ids
    config["pad_token_id"] = preset.pad_token_id
    if preset.architecture == "LlamaForCausalLM":
        config.update(attention_bias=False, mlp_bias=False)
    if preset.architecture == "Qwen3ForCausalLM":
        config["attention_bias"] = False
    if preset.architecture in _SLIDING_WINDOW_ARCHITECTURES:  # full attention in every layer, in every version:
        # transformers 4.51-4.52 apply a 4,096-token window without sliding_window, even with use_sliding_window false
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=preset.num_layers)
    if preset.rope_scaling is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(preset.rope_scaling)}
    return config
