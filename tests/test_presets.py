"""Model presets: HF config round trip, parameter counts against transformers, padding, errors."""

import json

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.models.builder import padded_vocab_size
from megatron_renio.models.presets import PRESETS, ModelPreset, get_preset, hf_config_dict, preset_from_hf_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    preset = PRESETS[name]
    assert preset_from_hf_config(hf_config_dict(preset)) == preset


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-untied", "tiny-qwen2", "tiny-llama3", "tiny-qwen3-wide"])
def test_parameter_count_matches_transformers(name):
    import transformers

    preset = PRESETS[name]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config_dict(preset, "float32").items() if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(config)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == preset.num_parameters()
    assert type(model).__name__ == preset.architecture


def test_real_family_shapes():
    assert get_preset("Qwen3-1.7B").tie_word_embeddings and get_preset("qwen3-1.7b").qk_layernorm
    assert not get_preset("qwen3-8b").tie_word_embeddings
    assert get_preset("deepseek-r1-distill-qwen-7b").add_qkv_bias
    assert get_preset("llama-3.1-8b").rope_scaling.factor == 8.0
    assert 7.5e9 < get_preset("qwen3-8b").num_parameters() < 8.5e9
    assert 1.5e9 < get_preset("qwen3-1.7b").num_parameters() < 2.1e9


def test_transformers_configs_are_read():
    import transformers

    cfg = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False,
    ).to_dict()
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    preset = preset_from_hf_config(cfg)
    assert (preset.head_dim, preset.num_query_groups, preset.add_qkv_bias, preset.vocab_size) == (16, 2, True, 300)


@pytest.mark.parametrize("architecture, config_class", [
    ("Qwen3ForCausalLM", "Qwen3Config"), ("Qwen2ForCausalLM", "Qwen2Config"), ("LlamaForCausalLM", "LlamaConfig"),
])
def test_head_dim_defaults_as_transformers_reads_it(architecture, config_class):
    """A config.json without head_dim: the head size transformers' attention gets from it (Qwen3Config's
    default of 128; hidden_size / num_attention_heads for Qwen2 and Llama)."""
    import transformers

    config = dict(architectures=[architecture], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**config))
    expected = model.model.layers[0].self_attn.head_dim
    assert preset_from_hf_config(config).head_dim == expected == (128 if architecture == "Qwen3ForCausalLM" else 16)


def test_a_list_of_eos_ids_is_kept():
    """Llama-3.1-Instruct's three EOS ids survive config.json -> preset -> checkpoint metadata (JSON) -> config.json;
    one id stays an int (metadata of older checkpoints holds one), and a bad value is a one-line error."""
    config = hf_config_dict(get_preset("llama-3.1-8b"))
    config["eos_token_id"] = [128001, 128008, 128009]
    preset = preset_from_hf_config(config)
    assert preset.eos_token_id == (128001, 128008, 128009) and preset.bos_token_id == 128000
    assert ModelPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    assert hash(preset) == hash(ModelPreset.from_dict(preset.to_dict()))
    assert hf_config_dict(preset)["eos_token_id"] == [128001, 128008, 128009]
    single = ModelPreset.from_dict(json.loads(json.dumps(get_preset("llama-3.1-8b").to_dict())))
    assert single.eos_token_id == 128009 and hf_config_dict(single)["eos_token_id"] == 128009
    for bad in ([128001, "<|eot_id|>"], -1):
        config["eos_token_id"] = bad
        with pytest.raises(UserInputError, match=r"^/m/config.json: eos_token_id must be a token id or a list of "):
            preset_from_hf_config(config, source="/m/config.json")


def test_the_pad_id_is_kept_as_written():
    """pad_token_id: an integer, -1 included (LLaMA-1-era configs), or none; written back unchanged; a
    string is a one-line error."""
    config = hf_config_dict(get_preset("llama-3.1-8b"))
    for pad in (None, -1, 128004):
        config["pad_token_id"] = pad
        preset = preset_from_hf_config(config)
        assert preset.pad_token_id == pad and hf_config_dict(preset)["pad_token_id"] == pad
        assert ModelPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    config.pop("pad_token_id")
    assert preset_from_hf_config(config).pad_token_id is None
    config["pad_token_id"] = "<pad>"
    with pytest.raises(UserInputError, match=r"^/m/config.json: pad_token_id must be an integer, got '<pad>'$"):
        preset_from_hf_config(config, source="/m/config.json")


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UserInputError, match=r"unsupported architecture .*MistralForCausalLM.*supported: Qwen3ForCausalLM"):
        preset_from_hf_config({"architectures": ["MistralForCausalLM"]})
    with pytest.raises(UserInputError, match="unknown model preset 'gpt5'"):
        get_preset("gpt5")
    bad = hf_config_dict(get_preset("tiny-llama3"))
    bad["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UserInputError, match="rope_scaling type 'yarn' is not supported"):
        preset_from_hf_config(bad)
    bad["rope_scaling"] = {"rope_type": "llama3", "factor": None}
    with pytest.raises(UserInputError, match="rope_scaling has no 'factor'"):
        preset_from_hf_config(bad)
    bad["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    bad["original_max_position_embeddings"] = 64  # transformers reads only the rope block's (it used 8192)
    with pytest.raises(UserInputError, match="^config.json: rope_scaling has no 'original_max_position_embeddings'$"):
        preset_from_hf_config(bad)
    del bad["rope_scaling"]["high_freq_factor"]
    with pytest.raises(UserInputError, match="^config.json: rope_scaling has no 'high_freq_factor', "
                                             "'original_max_position_embeddings'$"):
        preset_from_hf_config(bad)
    # transformers 5 writes the block as rope_parameters: the refusal names the field the file has
    bad["rope_parameters"] = {**bad.pop("rope_scaling"), "rope_theta": 5e5}
    with pytest.raises(UserInputError, match="^config.json: rope_parameters has no 'high_freq_factor', "
                                             "'original_max_position_embeddings'$"):
        preset_from_hf_config(bad)
    bad["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}
    with pytest.raises(UserInputError, match="^config.json: rope_parameters type 'yarn' is not supported"):
        preset_from_hf_config(bad)


@pytest.mark.parametrize("field, value, expected", [
    ("architectures", "LlamaForCausalLM", "architectures must be a list of class names, got 'LlamaForCausalLM'"),
    ("rope_scaling", "linear", "rope_scaling must be a JSON object or null, got 'linear'"),
    ("rope_parameters", [500000.0], "rope_parameters must be a JSON object or null, got [500000.0]"),
])
def test_config_json_fields_of_the_wrong_json_type(field, value, expected):
    """A field that must be a list or an object but is not: one line naming the file and the field."""
    config = hf_config_dict(get_preset("tiny-llama3"))
    config[field] = value
    with pytest.raises(UserInputError) as error:
        preset_from_hf_config(config, source="/m/config.json")
    assert str(error.value) == f"/m/config.json: {expected}"


def test_heads_must_be_a_multiple_of_the_kv_heads():
    """Each query group holds a whole number of heads: a config.json (or a preset, as renio_model.json
    holds it) with 4 heads and 3 key/value heads is one line naming both fields, not a failed reshape in
    the conversion; more key/value heads than heads too."""
    config = hf_config_dict(get_preset("tiny-qwen3"))
    for kv in (3, 8):
        config["num_key_value_heads"] = kv
        with pytest.raises(UserInputError, match=rf"^/m/config.json: num_attention_heads \(4\) must be a multiple "
                                                 rf"of num_key_value_heads \({kv}\)$"):
            preset_from_hf_config(config, source="/m/config.json")
    with pytest.raises(ValueError, match=r"^num_attention_heads \(4\) must be a multiple of num_query_groups \(3\)$"):
        get_preset("tiny-qwen3").replace(num_query_groups=3)


def test_rope_theta_from_rope_parameters_when_the_top_level_key_is_null():
    """transformers 5 nests rope settings in rope_parameters; a config.json that also writes a null
    rope_theta takes the nested one."""
    config = hf_config_dict(get_preset("tiny-qwen3"))
    config.update(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert preset_from_hf_config(config).rope_theta == 5e5


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen2", "qwen3-8b", "deepseek-r1-distill-qwen-7b"])
def test_exported_qwen_configs_say_full_attention_in_every_layer(name):
    """transformers 4.51-4.52 default sliding_window to 4,096 and apply it to every layer, even with
    use_sliding_window false (measured: an export without the field gave other log-probs past 4,096
    tokens): an exported Qwen2/Qwen3 config.json names no window, and transformers reads every layer as
    full attention."""
    import transformers

    preset = get_preset(name)
    config = hf_config_dict(preset)
    assert (config["use_sliding_window"], config["sliding_window"], config["max_window_layers"]) == (
        False, None, preset.num_layers)
    read = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    assert read.sliding_window is None
    assert set(getattr(read, "layer_types", None) or ["full_attention"]) == {"full_attention"}


def test_architecture_differences_leave_out_what_changes_no_weight():
    """What a resume compares (check_resumed_student): not the token ids or the maximum positions, which
    a checkpoint converted again may change (the load-time check and checkpoint_fingerprint skip them)."""
    preset = get_preset("tiny-qwen3")
    same = preset.replace(pad_token_id=7, eos_token_id=(1, 2), bos_token_id=3, max_position_embeddings=64)
    assert preset.architecture_differences(same) == []
    assert preset.architecture_differences(preset.replace(hidden_size=96, rope_theta=5e5)) == [
        f"hidden_size {preset.hidden_size} vs 96", f"rope_theta {preset.rope_theta} vs 500000.0"]


@pytest.mark.parametrize("name, config_class", [("tiny-qwen2", "Qwen2Config"), ("tiny-qwen3", "Qwen3Config")])
def test_sliding_window_attention_is_refused_where_transformers_applies_it(name, config_class):
    """A window is refused exactly when transformers gives some layer one (its config's layer_types), e.g.
    use_sliding_window true with max_window_layers below the layer count; covering every layer is full
    attention and is accepted."""
    import transformers

    preset = get_preset(name)
    last = preset.num_layers - 1
    cases = [  # (config.json fields, the first windowed layer or None)
        (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0), 0),
        (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=1), 1),
        (dict(use_sliding_window=True, sliding_window=4096), None),  # the default 28 covers the tiny model
        (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=preset.num_layers), None),
        (dict(use_sliding_window=True, sliding_window=None, max_window_layers=0), None),
        (dict(use_sliding_window=False, sliding_window=4096, max_window_layers=0), None),
        (dict(use_sliding_window=True, sliding_window=4096,
              layer_types=["full_attention"] * last + ["sliding_attention"]), last),
    ]
    for update, first_windowed in cases:
        config = {key: value for key, value in hf_config_dict(preset).items() if key != "max_window_layers"}
        config.update(update)
        kinds = getattr(transformers, config_class)(**config).layer_types
        assert (first_windowed is None) == ("sliding_attention" not in kinds), update
        if first_windowed is None:
            assert preset_from_hf_config(config, source="/m/config.json") == preset
            continue
        count = kinds.count("sliding_attention")
        with pytest.raises(UserInputError, match=rf"^/m/config.json: use_sliding_window is true and {count} of the "
                                                 rf"layers \(from layer {first_windowed}\) use a sliding window; "
                                                 r"sliding-window attention is not supported$"):
            preset_from_hf_config(config, source="/m/config.json")
    for field, value, message in (("max_window_layers", "2", "max_window_layers must be an integer, got '2'"),
                                  ("layer_types", "full", "layer_types must be a list, got 'full'")):
        config = {**hf_config_dict(preset), "use_sliding_window": True, "sliding_window": 8, field: value}
        with pytest.raises(UserInputError, match=rf"^/m/config.json: {message}$"):
            preset_from_hf_config(config, source="/m/config.json")


@pytest.mark.parametrize("architecture, config_class", [
    ("Qwen3ForCausalLM", "Qwen3Config"), ("Qwen2ForCausalLM", "Qwen2Config"), ("LlamaForCausalLM", "LlamaConfig"),
])
def test_max_position_embeddings_defaults_as_transformers_reads_it(architecture, config_class):
    """A config.json without max_position_embeddings: transformers' default for its architecture (2,048
    for Llama, 32,768 for Qwen2 and Qwen3); it bounds eval's default --seq-length and is exported."""
    import transformers

    config = dict(architectures=[architecture], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    expected = getattr(transformers, config_class)().max_position_embeddings
    assert preset_from_hf_config(config).max_position_embeddings == expected


def test_a_rope_theta_of_zero_is_refused_not_replaced():
    """At the top level or in transformers 5's rope_parameters: an error, not the default of 10,000."""
    config = hf_config_dict(get_preset("tiny-llama3"))
    config["rope_theta"] = 0
    with pytest.raises(UserInputError, match=r"^/m/config.json: rope_theta must be a positive number, got 0$"):
        preset_from_hf_config(config, source="/m/config.json")
    config.update(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 0})
    with pytest.raises(UserInputError,
                       match=r"^/m/config.json: rope_parameters.rope_theta must be a positive number, got 0$"):
        preset_from_hf_config(config, source="/m/config.json")


@pytest.mark.parametrize("vocab, tp, expected", [(151936, 1, 151936), (151936, 2, 152064), (250, 2, 256), (50, 1, 128)])
def test_vocab_padding(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected


def test_llama3_rope_scaling_matches_transformers():
    """The builder's inverse frequencies equal transformers' llama3 rope initialisation."""
    import transformers
    from megatron_renio import distributed
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model

    preset = get_preset("tiny-llama3")
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(preset, "float32").items() if k not in ("architectures", "model_type")})
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        model, _ = build_gpt_model(preset, ParallelConfig())
        torch.testing.assert_close(model.rotary_pos_emb.inv_freq, hf_rope.inv_freq.float(), rtol=1e-6, atol=0)
        assert not torch.allclose(hf_rope.inv_freq, 1.0 / preset.rope_theta ** (torch.arange(0, 16, 2) / 16))
    finally:
        distributed.destroy()
