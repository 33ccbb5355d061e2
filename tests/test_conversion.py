"""Checkpoint conversion HF <-> Megatron (checkpoints_conversion/, megatron_renio/models/checkpoint.py).

Tiny real models are built offline by transformers (2 layers, hidden 64, GQA 4 heads / 2 groups)
with weights re-drawn large enough that log-probs are far from uniform and every norm and bias
matters: Qwen3 (tied embeddings, vocabulary 300, QK-norm), Qwen2 (untied, QKV bias, vocabulary 200),
Llama-3 (untied, llama3 RoPE scaling with original context 64, vocabulary 256, a list of EOS ids like
Llama-3.1-Instruct's, saved as several shards with an index), and bf16 copies of Qwen3 and Qwen2.

The expensive work runs in two child processes shared by all tests: one driver process runs every
conversion command (Megatron-Core is imported once), then one 2-rank torchrun launch loads every
converted checkpoint at TP=2, PP=2 and TP=1 and computes per-token log-probs. Bad input is checked
through the real command line (those errors come before any heavy import, so each costs ~0.2 s).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_conversion import safetensors_io
from checkpoints_conversion.common import QKVLayout
from megatron_renio.errors import UserInputError
from megatron_renio.models.checkpoint import read_checkpoint_metadata
from megatron_renio.models.presets import ModelPreset, preset_from_hf_config, read_hf_config
from tests.python_forkserver import run_python
from tests.torchrun_harness import REPO_ROOT, run_torchrun, subprocess_env

WORKERS = Path(__file__).parent / "workers"
TOKENS_SHAPE = (2, 24)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_theta=10000.0)
MODELS = {  # name -> (transformers config class, config kwargs, dtype, max shard size)
    "qwen3": ("Qwen3Config", dict(vocab_size=300, tie_word_embeddings=True), torch.float32, None),
    "qwen2": ("Qwen2Config", dict(vocab_size=200, tie_word_embeddings=False), torch.float32, None),
    "llama": (
        "LlamaConfig",
        dict(vocab_size=256, tie_word_embeddings=False, eos_token_id=[2, 5, 7], pad_token_id=3, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
        torch.float32,
        "150KB",
    ),
    "qwen3_bf16": ("Qwen3Config", dict(vocab_size=300, tie_word_embeddings=True), torch.bfloat16, None),
    "qwen2_bf16": ("Qwen2Config", dict(vocab_size=200, tie_word_embeddings=False), torch.bfloat16, None),
}
LAYOUTS = ("tp1", "tp2", "pp2")
DTYPE_KEYS = ("dtype", "torch_dtype")  # where config.json names the parameter dtype


def _build_hf_model(config_class: str, kwargs: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**COMMON, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_((0.2 if name.endswith("bias") else 0.15) * torch.randn_like(param))
    return model


def _reference_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(tokens).logits
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the cat sat on the mat", "two plus two is four", "a dog ran after the cat"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = {  # a named template: transformers saves it in additional_chat_templates/
        "default": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
        "tool_use": "{% for m in messages %}the {{ m['content'] }} {% endfor %}"}
    wrapped.save_pretrained(directory)
    assert (directory / "additional_chat_templates" / "tool_use.jinja").is_file()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """HF folders (model + tokenizer), token ids and transformers' reference log-probs."""
    root = tmp_path_factory.mktemp("conversion")
    (root / "hf").mkdir()
    _save_tokenizer(root / "tokenizer")
    from transformers import AutoModelForCausalLM

    result = {"root": root, "dirs": {}, "tokens": {}, "reference": {}}
    for seed, (name, (config_class, kwargs, dtype, shard)) in enumerate(MODELS.items()):
        directory = root / "hf" / name
        _build_hf_model(config_class, kwargs, seed).to(dtype).save_pretrained(
            directory, **({"max_shard_size": shard} if shard else {})
        )
        # The reference is what transformers computes from the files (in fp32: a bf16 model's
        # weights upcast exactly, its RoPE frequencies recomputed in fp32).
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        shutil.copytree(root / "tokenizer", directory, dirs_exist_ok=True)
        tokens = torch.randint(0, kwargs["vocab_size"], TOKENS_SHAPE, generator=torch.Generator().manual_seed(seed))
        torch.save(tokens, root / f"tokens_{name}.pt")
        result["dirs"][name] = directory
        result["tokens"][name] = tokens
        result["reference"][name] = _reference_logprobs(model, tokens)
        if name == "llama":
            result["unscaled_rope_reference"] = _unscaled_rope_logprobs(model, config_class, kwargs, tokens)
    return result


def _unscaled_rope_logprobs(model, config_class, kwargs, tokens):
    """The same Llama weights without RoPE scaling: shows the parity check can see the scaling."""
    import transformers

    kwargs = {k: v for k, v in kwargs.items() if k != "rope_scaling"}
    plain = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**COMMON, **kwargs))
    plain.load_state_dict(model.state_dict())
    return _reference_logprobs(plain.eval(), tokens)


def _with_lm_head(src: Path, dst: Path, offset: float) -> None:
    """A copy of a tied HF folder that also stores lm_head.weight = embedding + offset."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + offset
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


MODEL_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 5, 7], "do_sample": True, "temperature": 0.6,
                           "top_p": 0.9}  # a Llama-3-Instruct-like model folder's: EOS ids beyond the tokenizer's
LARGE_WEIGHT = "model.layers.1.mlp.up_proj.weight"


def _generation_config_folders(root: Path, llama: Path) -> None:
    """hf/llama_generation: the Llama folder with MODEL_GENERATION_CONFIG; tokenizer_generation: the
    tokenizer with a generation_config.json of its own (another EOS list and temperature);
    hf/llama_no_tokenizer: hf/llama_generation without its tokenizer files."""
    shutil.copytree(llama, root / "hf" / "llama_generation")
    (root / "hf" / "llama_generation" / "generation_config.json").write_text(json.dumps(MODEL_GENERATION_CONFIG))
    shutil.copytree(root / "tokenizer", root / "tokenizer_generation")
    (root / "tokenizer_generation" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 1.0}))
    shutil.copytree(root / "hf" / "llama_generation", root / "hf" / "llama_no_tokenizer")
    for path in (root / "tokenizer").iterdir():
        target = root / "hf" / "llama_no_tokenizer" / path.name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def _run_driver(root: Path, jobs: list) -> list:
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = run_python([WORKERS / "conversion_driver.py", root / "jobs.json", root / "results.json"])
    assert proc.returncode == 0, proc.stderr[-8000:]
    return json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def converted(hf_models):
    """Every conversion, run in one driver process: ``{job name: {"rc", "stderr"}}``."""
    root = hf_models["root"]
    ckpt, back = root / "ckpt", root / "back"
    (ckpt / "llama").mkdir(parents=True)
    (ckpt / "llama" / "stale.txt").write_text("replaced by --overwrite")
    _with_lm_head(hf_models["dirs"]["qwen3"], root / "hf" / "qwen3_lm_head_equal", 0.0)
    _with_lm_head(hf_models["dirs"]["qwen3"], root / "hf" / "qwen3_lm_head_differs", 1.0)
    names, jobs = [], []

    def add(name, job):
        names.append(name)
        jobs.append(job)

    for name in [*MODELS, "qwen3_lm_head_equal", "qwen3_lm_head_differs"]:
        args = ["--hf-dir", str(root / "hf" / name), "--save", str(ckpt / name)]
        add(f"import:{name}", {"cli": "hf_to_megatron", "args": args + (["--overwrite"] if name == "llama" else [])})
    # Neither the model folder nor the tokenizer folder has a generation_config.json: the export writes its own.
    no_generation_config = root / "hf" / "llama_no_generation_config"
    shutil.copytree(hf_models["dirs"]["llama"], no_generation_config)
    (no_generation_config / "generation_config.json").unlink()
    args = ["--hf-dir", str(no_generation_config), "--save", str(ckpt / "llama_no_generation_config")]
    add("import:llama_no_generation_config", {"cli": "hf_to_megatron", "args": args + [
        "--tokenizer-dir", str(root / "tokenizer")]})
    # The model's generation_config.json (sampling defaults, every EOS id) with another tokenizer folder that
    # has a different one, and without tokenizer files
    _generation_config_folders(root, hf_models["dirs"]["llama"])
    add("import:llama_tokenizer_elsewhere", {"cli": "hf_to_megatron", "args": [
        "--hf-dir", str(root / "hf" / "llama_generation"), "--save", str(ckpt / "llama_tokenizer_elsewhere"),
        "--tokenizer-dir", str(root / "tokenizer_generation")]})
    add("import:llama_no_tokenizer", {"cli": "hf_to_megatron", "args": [
        "--hf-dir", str(root / "hf" / "llama_no_tokenizer"), "--save", str(ckpt / "llama_no_tokenizer")]})
    # A weight beyond fp16's range (fine in fp32): the export to fp16 refuses it
    shutil.copytree(hf_models["dirs"]["qwen2"], root / "hf" / "qwen2_large")
    _rewrite(root / "hf" / "qwen2_large", _set(LARGE_WEIGHT, (3, 5), 1e6))
    add("import:qwen2_large", {"cli": "hf_to_megatron", "args": [
        "--hf-dir", str(root / "hf" / "qwen2_large"), "--save", str(ckpt / "qwen2_large")]})
    add("export:qwen2_large_to_fp16", {"cli": "megatron_to_hf", "args": [
        "--load", str(ckpt / "qwen2_large"), "--save", str(back / "qwen2_large_to_fp16"), "--dtype", "fp16"]})
    add("truncate", {"truncate_shard": [str(ckpt / "qwen2"), str(ckpt / "broken")]})
    for name in [*MODELS, "llama_no_generation_config", "llama_tokenizer_elsewhere", "llama_no_tokenizer", "broken"]:
        args = ["--load", str(ckpt / name), "--save", str(back / name)]
        add(f"export:{name}", {"cli": "megatron_to_hf", "args": args})
    # --dtype both ways, and a config.json that names no dtype (the import defaults to bf16)
    no_dtype = root / "hf" / "qwen2_no_dtype"
    shutil.copytree(hf_models["dirs"]["qwen2"], no_dtype)
    config = json.loads((no_dtype / "config.json").read_text())
    (no_dtype / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in DTYPE_KEYS}))
    add("import:qwen2_no_dtype", {"cli": "hf_to_megatron", "args": [
        "--hf-dir", str(no_dtype), "--save", str(ckpt / "qwen2_no_dtype")]})
    add("import:qwen2_as_bf16", {"cli": "hf_to_megatron", "args": [
        "--hf-dir", str(root / "hf" / "qwen2"), "--save", str(ckpt / "qwen2_as_bf16"), "--dtype", "bf16"]})
    add("export:qwen2_to_bf16", {"cli": "megatron_to_hf", "args": [
        "--load", str(ckpt / "qwen2"), "--save", str(back / "qwen2_to_bf16"), "--dtype", "bf16"]})
    results = dict(zip(names, _run_driver(root, jobs)))
    return {"results": results, "ckpt": ckpt, "back": back}


@pytest.fixture(scope="module")
def parity(hf_models, converted):
    """One torchrun launch (2 ranks): per-rank log-probs of every checkpoint at every layout."""
    root, ckpt = hf_models["root"], converted["ckpt"]
    for name in MODELS:
        assert converted["results"][f"import:{name}"]["rc"] == 0, converted["results"][f"import:{name}"]
    cases = {
        "models": {
            name: {"checkpoint": str(ckpt / name), "tokens": str(root / f"tokens_{name}.pt")} for name in MODELS
        },
        "resave": {"tp2": ["qwen3", str(root / "resaved_tp2")], "pp2": ["llama", str(root / "resaved_pp2")]},
        "broken": str(ckpt / "broken"),
        "mismatch": ["qwen2", str(ckpt / "qwen2")],
        "rope_mismatch": str(ckpt / "llama"),
    }
    (root / "cases.json").write_text(json.dumps(cases))
    return run_torchrun(WORKERS / "conversion_parity.py", 2, root / "parity", str(root / "cases.json"))


# ------------------------------------------------------------------------------------------------
# Logit parity at every layout, from one conversion


def test_reference_is_sensitive(hf_models):
    """The references are far from uniform and the Llama one depends on the RoPE scaling."""
    for name, reference in hf_models["reference"].items():
        assert reference.std() > 0.3, name
    scaling_effect = (hf_models["reference"]["llama"] - hf_models["unscaled_rope_reference"]).abs().max()
    assert scaling_effect > 1e-2


# Checkpoints the parity worker re-saves (save_model_checkpoint at TP=2 / PP=2) and reloads later.
RESAVED = {"qwen3_from_tp2": ("qwen3", ("pp2", "tp1")), "llama_from_pp2": ("llama", ("tp1",))}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logit_parity(hf_models, parity, layout):
    """Per-token log-probs of the converted checkpoint (fp32 model) match transformers within 1e-4,
    and so do those of checkpoints re-saved at TP=2 and PP=2 and reloaded at another layout."""
    cases = {name: name for name in MODELS}
    cases.update({name: source for name, (source, layouts) in RESAVED.items() if layout in layouts})
    for name, reference in cases.items():
        reported = [r["logprobs"][(layout, name)] for r in parity]
        reported = [r for r in reported if r is not None]
        assert len(reported) == (1 if layout == "pp2" else 2), (layout, name)
        for logprobs in reported:
            diff = (logprobs - hf_models["reference"][reference]).abs().max().item()
            assert diff < 1e-4, (layout, name, diff)


def test_checkpoint_api_errors_reach_every_rank(converted, parity):
    """Collective save/load errors are one-line UserInputErrors on every rank, naming the folder; a model
    built with another llama3 RoPE scaling factor, or none, does not load the checkpoint."""
    rope_mismatch = (f"{converted['ckpt'] / 'llama'} does not fit the model: rope_scaling {{'factor': 8.0, "
                     "'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 64} "
                     "(checkpoint) vs other RoPE frequencies (model)")
    for rank_result in parity:
        errors = rank_result["errors"]
        assert str(converted["ckpt"] / "broken") in errors["broken"]
        assert "missing or corrupt files" in errors["broken"]
        assert errors["mismatch"].startswith(f"{converted['ckpt'] / 'qwen2'} does not fit the model: ")
        assert errors["rope_factor"] == errors["rope_unscaled"] == rope_mismatch
        for layout in ("tp2", "pp2"):
            assert "exists and is not empty" in errors[f"save_into_non_empty_{layout}"]


def test_broken_checkpoint_is_a_one_line_error(converted):
    """A truncated shard: megatron_to_hf exits 2 with one error line and writes nothing."""
    result = converted["results"]["export:broken"]
    assert result["rc"] == 2
    assert [line for line in result["stderr"].splitlines() if line.startswith("error: ")], result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert not (converted["back"] / "broken").exists()


def test_a_checkpoint_path_that_is_not_a_folder_says_which(tmp_path):
    a_file = tmp_path / "train.jsonl"
    a_file.write_text("{}\n")
    for path, found in ((a_file, "is a file, not a folder"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(UserInputError, match=f"^model checkpoint folder {path} {found}$"):
            read_checkpoint_metadata(path)


# ------------------------------------------------------------------------------------------------
# Round trip and checkpoint content


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_exact(hf_models, converted, name):
    """HF -> Megatron -> HF gives back every tensor, bit for bit, under the same names and dtypes."""
    assert converted["results"][f"export:{name}"]["rc"] == 0, converted["results"][f"export:{name}"]
    source_dir, back_dir = hf_models["dirs"][name], converted["back"] / name
    source = {k: v for f in sorted(source_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    back = {k: v for f in sorted(back_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(back) == sorted(source)
    for key, tensor in source.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    index = json.loads((back_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source)


@pytest.mark.parametrize("name", ["qwen3", "llama", "qwen2_bf16"])
def test_transformers_loads_the_export(hf_models, converted, name):
    """from_pretrained gives the source's logits; AutoTokenizer encodes like the source tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back_dir = converted["back"] / name
    model = AutoModelForCausalLM.from_pretrained(back_dir, dtype=torch.float32).eval()
    assert torch.equal(_reference_logprobs(model, hf_models["tokens"][name]), hf_models["reference"][name])
    assert model.config.tie_word_embeddings == MODELS[name][1]["tie_word_embeddings"]
    text = "the cat sat on a mat"
    source_ids = AutoTokenizer.from_pretrained(hf_models["dirs"][name])(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(back_dir)(text)["input_ids"] == source_ids
    chat = [{"role": "user", "content": "cat"}]
    source_tool_use = AutoTokenizer.from_pretrained(hf_models["dirs"][name]).apply_chat_template(
        chat, chat_template="tool_use", tokenize=False)
    assert source_tool_use == "the cat "  # a named template (it was lost: the name itself was rendered)
    assert AutoTokenizer.from_pretrained(back_dir).apply_chat_template(chat, chat_template="tool_use",
                                                                        tokenize=False) == source_tool_use
    assert (back_dir / "generation_config.json").is_file()


def test_a_list_of_eos_ids_survives_the_round_trip(converted):
    """config.json's list of EOS ids comes back whole in config.json and in generation_config.json, the
    source's or, when the checkpoint carries none, the one the export writes (transformers stops on each);
    the pad id comes back in config.json (absent in the source: null)."""
    eos = MODELS["llama"][1]["eos_token_id"]
    assert json.loads((converted["back"] / "llama" / "config.json").read_text())["pad_token_id"] == 3
    assert json.loads((converted["back"] / "qwen2" / "config.json").read_text())["pad_token_id"] is None
    assert not (converted["ckpt"] / "llama_no_generation_config" / "tokenizer" / "generation_config.json").exists()
    for name in ("llama", "llama_no_generation_config"):
        assert converted["results"][f"export:{name}"]["rc"] == 0, converted["results"][f"export:{name}"]
        for file in ("config.json", "generation_config.json"):
            assert json.loads((converted["back"] / name / file).read_text())["eos_token_id"] == eos, (name, file)


def test_the_model_generation_config_travels_with_the_checkpoint(converted):
    """hf_to_megatron keeps the HF folder's generation_config.json (sampling defaults, every EOS id) in
    the checkpoint's tokenizer folder also with a --tokenizer-dir that has another one (one note names
    both files) and without tokenizer files; a run's stop ids then hold the model's extra EOS ids, and
    megatron_to_hf writes it back."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.components import load_run_tokenizer, resolve_model

    ckpt, root = converted["ckpt"], converted["ckpt"].parent
    result = converted["results"]["import:llama_tokenizer_elsewhere"]
    assert result["rc"] == 0, result
    notes = [line for line in result["stderr"].splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {root / 'tokenizer_generation' / 'generation_config.json'} differs from the model's "
                     f"{root / 'hf' / 'llama_generation' / 'generation_config.json'}; the checkpoint keeps the model's"]
    assert "note: " not in converted["results"]["import:llama"]["stderr"]  # its tokenizer folder is the model's
    checkpoint = read_checkpoint_metadata(ckpt / "llama_tokenizer_elsewhere")
    assert json.loads(checkpoint.generation_config.read_text()) == MODEL_GENERATION_CONFIG
    student = resolve_model(str(ckpt / "llama_tokenizer_elsewhere"), None, "--student-load")
    tokenizer = load_run_tokenizer(TrainConfig(), student, None)
    assert tokenizer.eos_id == 2 and tokenizer.stop_ids == (2, 5, 7)

    assert converted["results"]["import:llama_no_tokenizer"]["rc"] == 0
    bare = read_checkpoint_metadata(ckpt / "llama_no_tokenizer")
    assert bare.tokenizer_dir is None
    assert json.loads(bare.generation_config.read_text()) == MODEL_GENERATION_CONFIG
    for name in ("llama_tokenizer_elsewhere", "llama_no_tokenizer"):
        assert converted["results"][f"export:{name}"]["rc"] == 0, converted["results"][f"export:{name}"]
        exported = json.loads((converted["back"] / name / "generation_config.json").read_text())
        assert exported == MODEL_GENERATION_CONFIG, name


def test_megatron_to_hf_refuses_an_fp16_overflow(converted):
    """megatron_to_hf --dtype fp16 of a checkpoint holding a weight beyond fp16's range: the one line
    hf_to_megatron gives for the same cast (naming the checkpoint and the HF tensor, suggesting
    --dtype bf16), before anything is published; its staging folder is removed."""
    assert converted["results"]["import:qwen2_large"]["rc"] == 0, converted["results"]["import:qwen2_large"]
    result = converted["results"]["export:qwen2_large_to_fp16"]
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] == 2 and len(lines) == 1, result
    assert lines[0] == (f"error: {converted['ckpt'] / 'qwen2_large'}: tensor {LARGE_WEIGHT} holds values that "
                        f"overflow fp16 (largest magnitude 1e+06 > 65504, fp16's largest value) and become inf; "
                        "convert with --dtype bf16 (same range as fp32) or fp32")
    assert not (converted["back"] / "qwen2_large_to_fp16").exists()
    assert not [p for p in converted["back"].iterdir() if p.name.startswith(".")]


def test_checkpoint_metadata(hf_models, converted):
    """renio_model.json: the HF config's preset (true vocabulary), dtype, tokenizer copy, source."""
    metadata = read_checkpoint_metadata(converted["ckpt"] / "qwen3")
    assert metadata.preset == preset_from_hf_config(read_hf_config(hf_models["dirs"]["qwen3"]))
    assert metadata.preset.vocab_size == 300 and metadata.padded_vocab_size == 384
    assert metadata.dtype == "fp32" and read_checkpoint_metadata(converted["ckpt"] / "qwen3_bf16").dtype == "bf16"
    assert (metadata.tokenizer_dir / "tokenizer.json").is_file()
    assert metadata.source == str(hf_models["dirs"]["qwen3"].resolve())
    assert ModelPreset.from_dict(metadata.preset.to_dict()) == metadata.preset


def _hf_tensors(directory: Path) -> dict:
    """Every tensor of a Hugging Face model folder, by name."""
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _checkpoint_tensors(checkpoint: Path) -> dict:
    """Every tensor of a model checkpoint's dist checkpoint, read in this (single) process."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    from tests.torchrun_harness import free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return load_plain_tensors(str(checkpoint / "model"))
    finally:
        torch.distributed.destroy_process_group()


VOCAB_TENSORS = {  # Megatron tensor with vocabulary rows -> its HF source tensor
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
}


IMPORTED = {  # checkpoint -> (source HF folder, dtype it must hold)
    "qwen3": ("qwen3", torch.float32), "qwen2": ("qwen2", torch.float32),
    "qwen3_bf16": ("qwen3_bf16", torch.bfloat16), "qwen2_bf16": ("qwen2_bf16", torch.bfloat16),
    "qwen2_as_bf16": ("qwen2", torch.bfloat16),  # the fp32 folder imported with --dtype bf16
    "qwen2_no_dtype": ("qwen2", torch.bfloat16),  # the fp32 folder whose config.json names no dtype
}


@pytest.mark.parametrize("name", list(IMPORTED))
def test_import_holds_the_source_in_its_dtype_and_zero_padding(hf_models, converted, name):
    """The saved checkpoint's vocabulary tensors hold the source rows cast to the checkpoint's dtype
    (the source's, or --dtype) and exactly zero in the padding rows past the true vocabulary (tied
    Qwen3: 300 of 384 rows; untied Qwen2: 200 of 256, embedding and output layer); every tensor has
    that dtype and the metadata names it."""
    source_name, dtype = IMPORTED[name]
    assert converted["results"][f"import:{name}"]["rc"] == 0, converted["results"][f"import:{name}"]
    metadata = read_checkpoint_metadata(converted["ckpt"] / name)
    assert metadata.dtype == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    source = _hf_tensors(hf_models["dirs"][source_name])
    saved = _checkpoint_tensors(converted["ckpt"] / name)
    assert all(t.dtype == dtype for t in saved.values() if t.is_floating_point())
    vocab = metadata.preset.vocab_size
    checked = [key for key in VOCAB_TENSORS if key in saved]
    assert len(checked) == (1 if metadata.preset.tie_word_embeddings else 2), sorted(saved)
    for key in checked:
        tensor = saved[key]
        assert tensor.shape[0] == metadata.padded_vocab_size > vocab, key
        assert torch.equal(tensor[:vocab], source[VOCAB_TENSORS[key]].to(dtype)), key
        assert torch.count_nonzero(tensor[vocab:]) == 0, key
    assert torch.equal(saved["decoder.final_layernorm.weight"], source["model.norm.weight"].to(dtype))


def test_import_without_a_dtype_in_config_json_is_bf16(hf_models, converted):
    """hf_to_megatron: --dtype defaults to config.json's dtype / torch_dtype, and to bf16 when it
    names none (an fp32 folder then gives a bf16 checkpoint)."""
    source_dir = converted["ckpt"].parent / "hf" / "qwen2_no_dtype"
    assert not set(DTYPE_KEYS) & set(json.loads((source_dir / "config.json").read_text()))
    assert all(t.dtype == torch.float32 for t in _hf_tensors(source_dir).values())
    result = converted["results"]["import:qwen2_no_dtype"]
    assert result["rc"] == 0, result
    assert read_checkpoint_metadata(converted["ckpt"] / "qwen2_no_dtype").dtype == "bf16"
    # with the dtype named, the fp32 folder gives an fp32 checkpoint
    assert read_checkpoint_metadata(converted["ckpt"] / "qwen2").dtype == "fp32"


def test_export_honours_dtype_and_names_it_in_config_json(hf_models, converted):
    """megatron_to_hf writes its tensors in --dtype (default: the checkpoint's) and config.json's
    torch_dtype names that dtype, as transformers expects."""
    cases = {  # export -> (source HF folder, dtype of the written tensors)
        "qwen3": ("qwen3", torch.float32), "qwen3_bf16": ("qwen3_bf16", torch.bfloat16),
        "qwen2_to_bf16": ("qwen2", torch.bfloat16),  # an fp32 checkpoint exported with --dtype bf16
    }
    for name, (source_name, dtype) in cases.items():
        assert converted["results"][f"export:{name}"]["rc"] == 0, converted["results"][f"export:{name}"]
        back_dir = converted["back"] / name
        config = json.loads((back_dir / "config.json").read_text())
        assert config["torch_dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], name
        source, back = _hf_tensors(hf_models["dirs"][source_name]), _hf_tensors(back_dir)
        assert sorted(back) == sorted(source)
        for key, tensor in source.items():
            assert back[key].dtype == dtype and torch.equal(back[key], tensor.to(dtype)), (name, key)
    assert _hf_tensors(hf_models["dirs"]["qwen2"])["lm_head.weight"].dtype == torch.float32


def _total_size(directory: Path) -> int:
    return json.loads((directory / safetensors_io.INDEX_FILE).read_text())["metadata"]["total_size"]


def test_index_total_size_counts_every_byte(converted, tmp_path):
    """model.safetensors.index.json's metadata.total_size is the bytes of all tensors (numel times
    element size), over every shard, in the written dtype."""
    for name in ("llama", "qwen2_bf16", "qwen2_to_bf16"):
        tensors = _hf_tensors(converted["back"] / name)
        assert _total_size(converted["back"] / name) == sum(t.numel() * t.element_size() for t in tensors.values())
    tensors = {"a": torch.randn(10, 10), "b": torch.randn(300).to(torch.bfloat16), "c": torch.randn(7).half()}
    pending = [safetensors_io.PendingTensor(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()]
    assert len(safetensors_io.write_sharded(tmp_path, pending, max_shard_bytes=500)) == 3
    assert _total_size(tmp_path) == 10 * 10 * 4 + 300 * 2 + 7 * 2


def test_overwrite_replaces_a_non_empty_folder(converted):
    assert converted["results"]["import:llama"]["rc"] == 0
    assert not (converted["ckpt"] / "llama" / "stale.txt").exists()
    assert (converted["ckpt"] / "llama" / "renio_model.json").is_file()


def test_tied_lm_head_duplicate(converted):
    """A tied checkpoint may also store lm_head.weight, but only equal to the embedding."""
    results = converted["results"]
    assert results["import:qwen3_lm_head_equal"]["rc"] == 0
    failed = results["import:qwen3_lm_head_differs"]
    assert failed["rc"] == 2 and "tie_word_embeddings" in failed["stderr"], failed
    assert not (converted["ckpt"] / "qwen3_lm_head_differs").exists()
    assert not [p for p in converted["ckpt"].iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# Bad input through the real command line: exit 2, one line, nothing written


def _rewrite(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_header(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32
    path.write_bytes(bytes(data))


HF_BAD_INPUTS = {
    "no_config": (lambda d: (d / "config.json").unlink(), "no config.json in"),
    "unsupported_architecture": (
        lambda d: _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral"),
        "supported: Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM",
    ),
    "unsupported_option": (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    "partial_rotary_factor": (
        lambda d: _edit_config(d, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
        "Qwen2ForCausalLM with rope_parameters.partial_rotary_factor=0.5 is not supported",
    ),
    "missing_tensor": (
        lambda d: _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "missing tensor model.layers.1.mlp.up_proj.weight",
    ),
    "unexpected_tensor": (
        lambda d: _rewrite(d, lambda t: t.update({"model.extra.weight": torch.zeros(3)})),
        "unexpected tensor model.extra.weight",
    ),
    "shape_mismatch": (lambda d: _edit_config(d, intermediate_size=96), "but config.json implies [64, 96]"),
    "string_field": (lambda d: _edit_config(d, num_hidden_layers="two"), "num_hidden_layers must be a positive integer, "
                                                                          "got 'two'"),
    "fractional_field": (lambda d: _edit_config(d, num_hidden_layers=2.7), "num_hidden_layers must be a positive "
                                                                            "integer, got 2.7"),
    "list_field": (lambda d: _edit_config(d, hidden_size=[64]), "hidden_size must be a positive integer, got [64]"),
    "string_flag": (lambda d: _edit_config(d, tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    "truncated_file": (_truncate, "truncated safetensors file"),
    "corrupt_file": (_corrupt_header, "corrupt"),
    "no_safetensors": (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors files"),
    # config.json that is not a JSON object of the expected shape: one line naming it, read once
    "config_not_an_object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                             "config.json: expected a JSON object, got list"),
    "config_not_utf8": (lambda d: (d / "config.json").write_bytes(
        (d / "config.json").read_bytes().replace(b'"silu"', b'"sil\xe9"')), "config.json: not UTF-8 text at line "),
    "rope_scaling_string": (lambda d: _edit_config(d, rope_scaling="linear"),
                            "config.json: rope_scaling must be a JSON object or null, got 'linear'"),
    "architectures_string": (lambda d: _edit_config(d, architectures="Qwen2ForCausalLM"),
                             "config.json: architectures must be a list of class names, got 'Qwen2ForCausalLM'"),
    "heads_not_a_multiple_of_kv_heads": (lambda d: _edit_config(d, num_key_value_heads=3),
                                         "config.json: num_attention_heads (4) must be a multiple of "
                                         "num_key_value_heads (3)"),
}


def _cli(module: str, *args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_python(["-m", f"checkpoints_conversion.{module}", *args], env=env, cwd=cwd, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess, expected: str, save: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert not save.exists() or save.is_dir() and not (save / "config.json").exists()
    assert not [p for p in save.parent.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("case", list(HF_BAD_INPUTS))
def test_hf_to_megatron_bad_input(hf_models, tmp_path, case):
    make_bad, expected = HF_BAD_INPUTS[case]
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models["dirs"]["qwen2"], hf_dir)
    make_bad(hf_dir)
    save = tmp_path / "out"
    _assert_one_line_error(_cli("hf_to_megatron", "--hf-dir", str(hf_dir), "--save", str(save)), expected, save)


def _set(name: str, index: tuple, value: float, also: str | None = None):
    """A _rewrite change: tensor ``name``[index] = value (and, first, ``also`` = a copy of ``name``)."""
    def change(tensors):
        if also:
            tensors[also] = tensors[name].clone()
        tensors[name][index] = value
    return change


FP16_MAX = torch.finfo(torch.float16).max  # 65504
NONFINITE_CASES = {  # case -> (source model, change, --dtype, tensor named, expected fragment or None: converts)
    # fp32 values beyond fp16's range: the file is fine, the cast to fp16 makes inf
    "overflow_fp16": ("qwen2", _set("model.layers.1.mlp.up_proj.weight", (3, 5), 1e6), "fp16",
                      "model.layers.1.mlp.up_proj.weight",
                      f"holds values that overflow fp16 (largest magnitude 1e+06 > {FP16_MAX:.6g}"),
    "fits_bf16": ("qwen2", _set("model.layers.1.mlp.up_proj.weight", (3, 5), 1e6), "bf16", None, None),
    "fits_fp16": ("qwen2", _set("model.layers.1.mlp.up_proj.weight", (3, 5), -6e4), "fp16", None, None),
    # a bf16 file, a q_proj (through a temporary into the fused QKV): -7e4 overflows fp16
    "overflow_fp16_from_bf16_qkv": ("qwen2_bf16", _set("model.layers.0.self_attn.q_proj.weight", (1, 2), -7e4),
                                    "fp16", "model.layers.0.self_attn.q_proj.weight",
                                    "overflow fp16 (largest magnitude 70144 > 65504"),  # -7e4 in bf16: -70144
    # NaN / inf in the file: read straight into the parameter (same dtype), or cast on the way
    "nan_same_dtype": ("qwen2", _set("model.layers.1.mlp.up_proj.weight", (3, 5), float("nan")), "fp32",
                       "model.layers.1.mlp.up_proj.weight", "holds non-finite values (1 NaN or inf of 8192)"),
    "nan_cast_to_fp16": ("qwen2", _set("model.norm.weight", (7,), float("nan")), "fp16", "model.norm.weight",
                         "holds non-finite values (1 NaN or inf of 64)"),
    "inf_in_qkv": ("qwen2", _set("model.layers.0.self_attn.k_proj.bias", (4,), float("-inf")), "bf16",
                   "model.layers.0.self_attn.k_proj.bias", "holds non-finite values (1 NaN or inf of 32)"),
    # tied Qwen3 storing lm_head.weight too (filled first: it comes first in the file): the embedding
    # that must reproduce it holds a NaN
    "nan_in_tied_duplicate": ("qwen3", _set("model.embed_tokens.weight", (11, 3), float("nan"), also="lm_head.weight"),
                              "fp32", "model.embed_tokens.weight", "holds non-finite values (1 NaN or inf of 19200)"),
}


def test_the_finite_check_reads_every_slice(monkeypatch):
    """all_finite checks a tensor in slices of its first dim: a NaN in the last slice counts too; an empty
    tensor is finite."""
    from megatron_renio.models import checkpoint

    monkeypatch.setattr(checkpoint, "_FINITE_CHECK_ELEMENTS", 4)
    tensor = torch.zeros(10, 2)
    assert checkpoint.all_finite(tensor)
    tensor[-1, 1] = float("inf")
    assert not checkpoint.all_finite(tensor)
    assert not checkpoint.all_finite(torch.tensor(float("nan")))
    assert checkpoint.all_finite(torch.zeros(0, 3)) and checkpoint.all_finite(torch.zeros(4, 0))  # nothing to check


def test_hf_to_megatron_refuses_non_finite_weights(hf_models, tmp_path):
    """A weight that is NaN / inf in the HF file, or that the cast to --dtype turns into inf (fp16's range
    ends at 65504), is one line naming the file and tensor and telling the two causes apart (the
    overflow suggests --dtype bf16), before anything is written; the same values convert where they fit."""
    jobs = []
    for case, (source, change, dtype, _, _) in NONFINITE_CASES.items():
        hf_dir = tmp_path / "hf" / case
        shutil.copytree(hf_models["dirs"][source], hf_dir)
        _rewrite(hf_dir, change)
        jobs.append({"cli": "hf_to_megatron", "args": ["--hf-dir", str(hf_dir), "--save", str(tmp_path / "out" / case),
                                                       "--dtype", dtype]})
    (tmp_path / "out").mkdir()
    for case, result in zip(NONFINITE_CASES, _run_driver(tmp_path, jobs)):
        _, _, dtype, tensor, expected = NONFINITE_CASES[case]
        save = tmp_path / "out" / case
        if expected is None:
            assert result["rc"] == 0, (case, result)
            assert read_checkpoint_metadata(save).dtype == dtype
            continue
        lines = result["stderr"].strip().splitlines()
        assert result["rc"] == 2 and len(lines) == 1, (case, result)
        assert lines[0].startswith(f"error: {tmp_path / 'hf' / case / 'model.safetensors'}: tensor {tensor} "), lines
        assert expected in lines[0], (case, lines[0])
        assert ("--dtype bf16" in lines[0]) == case.startswith("overflow"), lines[0]
        assert not save.exists(), case
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fits_bf16", "fits_fp16"]


def test_hf_to_megatron_refuses_a_non_empty_save(hf_models, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    proc = _cli("hf_to_megatron", "--hf-dir", str(hf_models["dirs"]["qwen2"]), "--save", str(save))
    _assert_one_line_error(proc, "exists and is not empty (pass --overwrite", save)
    assert (save / "keep.txt").read_text() == "mine"


def test_hf_to_megatron_checks_the_index_and_tokenizer_dir(hf_models, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models["dirs"]["llama"], hf_dir)
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    save, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    proc = _cli("hf_to_megatron", "--hf-dir", str(hf_dir), "--save", str(save), "--tokenizer-dir", str(empty))
    _assert_one_line_error(proc, f"--tokenizer-dir {empty} holds no tokenizer files", save)
    shard.unlink()
    proc = _cli("hf_to_megatron", "--hf-dir", str(hf_dir), "--save", str(save))
    _assert_one_line_error(proc, f"lists {shard.name}, which does not exist", save)


def test_hf_to_megatron_refuses_what_training_would_refuse_later(hf_models, converted, tmp_path):
    """A tokenizer with more ids than the model's vocabulary, a converted checkpoint as --hf-dir, and a --save
    inside the --hf-dir: each one line before anything is written."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf_dir = hf_models["dirs"]["qwen2"]
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]

    def tokenizer(folder, size):
        words = {f"w{i}": i for i in range(size)}
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")),
                                unk_token="w0", eos_token="w1").save_pretrained(folder)
        return folder

    big, save = tokenizer(tmp_path / "big_tokenizer", vocab + 10), tmp_path / "out"
    proc = _cli("hf_to_megatron", "--hf-dir", str(hf_dir), "--save", str(save), "--tokenizer-dir", str(big))
    _assert_one_line_error(proc, f"the tokenizer in {big} has {vocab + 10} ids, more than the model's vocabulary of "
                                 f"{vocab}", save)
    own = tmp_path / "hf_with_a_big_tokenizer"  # the --hf-dir's own tokenizer is checked too
    shutil.copytree(hf_dir, own)
    tokenizer(own, vocab + 1)  # (the folder's other tokenizer files may add special tokens)
    proc = _cli("hf_to_megatron", "--hf-dir", str(own), "--save", str(save))
    _assert_one_line_error(proc, f"the tokenizer in {own} has ", save)
    assert f"ids, more than the model's vocabulary of {vocab}" in proc.stderr
    exact = tokenizer(tmp_path / "exact_tokenizer", vocab)  # every row of the vocabulary is a token: fine
    assert _cli("hf_to_megatron", "--hf-dir", str(hf_dir), "--save", str(tmp_path / "out_exact"), "--tokenizer-dir",
                str(exact)).returncode == 0
    proc = _cli("hf_to_megatron", "--hf-dir", str(converted["ckpt"] / "qwen2"), "--save", str(save))
    _assert_one_line_error(proc, "is a megatron_renio model checkpoint (it has renio_model.json), converted already",
                           save)
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    proc = _cli("hf_to_megatron", "--hf-dir", str(copy), "--save", str(copy / "sub"))
    _assert_one_line_error(proc, f"--save {copy / 'sub'} lies inside the --hf-dir input {copy}", copy / "sub")


def test_empty_path_flags_are_refused(tmp_path):
    """``--save "$OUT"`` with OUT unset passes an empty value, which a plain Path reads as the current
    folder (that --overwrite replaced): every path flag refuses it in one line, and nothing is touched."""
    work, hf_dir, save = tmp_path / "work", str(tmp_path / "hf"), str(tmp_path / "out")
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    for module, args, flag in (
        ("hf_to_megatron", ["--hf-dir", hf_dir, "--save", "", "--overwrite"], "--save"),
        ("hf_to_megatron", ["--hf-dir", "", "--save", save], "--hf-dir"),
        ("hf_to_megatron", ["--hf-dir", hf_dir, "--save", save, "--tokenizer-dir", ""], "--tokenizer-dir"),
        ("megatron_to_hf", ["--load", str(tmp_path / "ckpt"), "--save", "", "--overwrite"], "--save"),
        ("megatron_to_hf", ["--load", "", "--save", save], "--load"),
    ):
        proc = _cli(module, *args, cwd=work)
        assert proc.returncode == 2, (module, args, proc.stderr)
        assert proc.stderr == (f"error: argument {flag}: must be a path, got '' (an unset shell variable?) "
                               "(see --help)\n"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert [p.name for p in work.iterdir()] == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("module", ["hf_to_megatron", "megatron_to_hf"])
def test_abbreviated_flags_are_refused(module, tmp_path, capsys):
    """``--over`` must not pass for ``--overwrite``, nor ``--sa`` for ``--save`` (as the other commands)."""
    import importlib

    main = importlib.import_module(f"checkpoints_conversion.{module}").main
    source = ["--hf-dir", str(tmp_path)] if module == "hf_to_megatron" else ["--load", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*source, "--sa", str(tmp_path / "out"), "--over"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --save (see --help)\n"
    assert sorted(tmp_path.iterdir()) == []


def test_save_never_replaces_the_working_directory_or_the_input(hf_models, converted, tmp_path):
    """--save naming the current working directory or a folder above it is refused also with --overwrite
    (which would move the process's own folder away and delete what it held), and so is a --save that
    holds the --hf-dir; each one line, nothing touched."""
    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    for module, source in (("hf_to_megatron", ["--hf-dir", str(hf_models["dirs"]["qwen2"])]),
                           ("megatron_to_hf", ["--load", str(converted["ckpt"] / "qwen2")])):
        for save, verb in ((".", "is"), (str(work), "is"), ("..", "holds")):
            proc = _cli(module, *source, "--save", save, "--overwrite", cwd=work)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.splitlines() == [f"error: --save {save} {verb} the current working directory "
                                                f"{work.resolve()}, which writing there would replace; choose "
                                                "another folder"], (module, save)
    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["work"]
    assert [p.name for p in work.iterdir()] == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"
    run = tmp_path / "run"
    shutil.copytree(hf_models["dirs"]["qwen2"], run / "hf")
    proc = _cli("hf_to_megatron", "--hf-dir", str(run / "hf"), "--save", str(run), "--overwrite")
    _assert_one_line_error(proc, f"--save {run} holds the --hf-dir input, which writing there would replace", run)
    assert (run / "hf" / "config.json").is_file()


@pytest.mark.parametrize("variable, value, launcher", [("WORLD_SIZE", "8", "torchrun"),
                                                        ("OMPI_COMM_WORLD_SIZE", "2", "mpirun")])
def test_several_launched_conversions_are_one_line_naming_the_variable(hf_models, tmp_path, variable, value,
                                                                       launcher):
    """Under torchrun, srun or mpirun (or a job script's exported WORLD_SIZE) the line says what to do
    for a command of one process; it told mpirun users to launch with torchrun, then torchrun users to
    launch with python."""
    save = tmp_path / "out"
    proc = _cli("hf_to_megatron", "--hf-dir", str(hf_models["dirs"]["qwen2"]), "--save", str(save),
                env={**subprocess_env(), variable: value})
    _assert_one_line_error(proc, f"{variable}={value}: {launcher} started {value} processes, but this command runs in "
                                 "one plain process: run it once with python (unset the variable if a job script "
                                 "exported it)", save)
    assert not save.exists()


def test_a_launchers_leftover_variables_do_not_stop_a_conversion(hf_models, tmp_path):
    """RANK=3 or an unparsable LOCAL_RANK left in the environment: conversion is a world of one anyway."""
    save = tmp_path / "out"
    proc = _cli("hf_to_megatron", "--hf-dir", str(hf_models["dirs"]["qwen2"]), "--save", str(save),
                env={**subprocess_env(), "RANK": "3", "LOCAL_RANK": "abc", "WORLD_SIZE": "1"})
    assert proc.returncode == 0 and (save / "renio_model.json").is_file(), proc.stderr[-3000:]


def test_each_conversion_ends_with_one_summary_line(hf_models, tmp_path):
    """Both commands print one line on stdout when done (nothing on stderr): the architecture, the
    parameter count (the HF model's: every tensor of the untied Qwen2 once), the dtype, the number of
    tensors converted and the absolute output folder."""
    hf_dir = hf_models["dirs"]["qwen2"]
    tensors = _hf_tensors(hf_dir)
    parameters = f"{sum(t.numel() for t in tensors.values()):,} parameters"
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    runs = (("hf_to_megatron", ["--hf-dir", str(hf_dir), "--save", str(ckpt)], "fp32",
             f"the model checkpoint {ckpt}"),
            ("megatron_to_hf", ["--load", str(ckpt), "--save", os.path.relpath(back, REPO_ROOT), "--dtype", "bf16"],
             "bf16", f"the Hugging Face folder {back}"))  # a relative --save is named in full
    for module, args, dtype, target in runs:
        proc = _cli(module, *args)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout == (f"converted {len(tensors)} tensors of a Qwen2ForCausalLM ({parameters}, {dtype}) "
                               f"into {target}\n"), proc.stdout
    assert len(_hf_tensors(back)) == len(tensors)


def test_the_converters_restore_the_sigterm_handler(hf_models, tmp_path):
    """In-process callers (a notebook, a launcher) keep their own SIGTERM handler after a conversion."""
    import signal

    from checkpoints_conversion import hf_to_megatron

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert hf_to_megatron.main(["--hf-dir", str(tmp_path / "missing"), "--save", str(tmp_path / "out")]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_megatron_to_hf_storage_that_fails_to_flush_is_one_line_and_leaves_nothing(converted, tmp_path, monkeypatch,
                                                                                     capsys):
    """The export syncs its files before it renames the folder into place; storage that fails to flush
    one (EIO) is one line naming that file, and neither --save nor a staging folder is left. In-process,
    so that the failing fsync reaches the exporter."""
    from checkpoints_conversion import megatron_to_hf

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    save = tmp_path / "hf"
    assert megatron_to_hf.main(["--load", str(converted["ckpt"] / "qwen2"), "--save", str(save)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"error: {re.escape(str(tmp_path))}/\.hf\.partial-\w+/\S+: cannot write the Hugging Face "
                        rf"folder {re.escape(str(save))} \(Input/output error\)", line), line
    assert list(tmp_path.iterdir()) == []


def test_megatron_to_hf_bad_input(hf_models, converted, tmp_path):
    save = tmp_path / "out"
    proc = _cli("megatron_to_hf", "--load", str(hf_models["dirs"]["qwen2"]), "--save", str(save))
    _assert_one_line_error(proc, "is not a model checkpoint (no renio_model.json): it is a Hugging Face", save)
    proc = _cli("megatron_to_hf", "--load", str(tmp_path / "nowhere"), "--save", str(save))
    _assert_one_line_error(proc, "does not exist", save)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(converted["ckpt"] / "qwen2", corrupt)
    (corrupt / "renio_model.json").write_text("{not json")
    proc = _cli("megatron_to_hf", "--load", str(corrupt), "--save", str(save))
    _assert_one_line_error(proc, "corrupt checkpoint metadata", save)
    metadata = json.loads((converted["ckpt"] / "qwen2" / "renio_model.json").read_text())
    for field, value, expected in (("hidden_size", "64x", "hidden_size must be a positive integer, got '64x'"),
                                   ("vocab_size", "191", "vocab_size must be a positive integer, got '191'"),
                                   ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
                                   ("num_query_groups", 3, "num_attention_heads (4) must be a multiple of "
                                                           "num_query_groups (3)")):
        (corrupt / "renio_model.json").write_text(json.dumps({**metadata, "preset": {**metadata["preset"], field: value}}))
        proc = _cli("megatron_to_hf", "--load", str(corrupt), "--save", str(save))
        _assert_one_line_error(proc, f"corrupt checkpoint metadata (ValueError: {expected})", save)

    for field, value, expected in (("dtype", "float64", "dtype must be one of fp32, bf16, fp16, got 'float64'"),
                                   ("padded_vocab_size", -5, "padded_vocab_size must be an integer of at least the "
                                                             "preset's vocab_size (200), got -5")):
        (corrupt / "renio_model.json").write_text(json.dumps({**metadata, field: value}))
        proc = _cli("megatron_to_hf", "--load", str(corrupt), "--save", str(save))
        _assert_one_line_error(proc, f"{corrupt / 'renio_model.json'}: corrupt checkpoint metadata (ValueError: "
                                     f"{expected})", save)

    # a tokenizer the export would copy but that does not load (tokenizer.json gone, its config left):
    # refused as hf_to_megatron refuses it, before anything is written
    (corrupt / "renio_model.json").write_text(json.dumps(metadata))
    (corrupt / "tokenizer" / "tokenizer.json").unlink()
    assert (corrupt / "tokenizer" / "tokenizer_config.json").is_file()
    proc = _cli("megatron_to_hf", "--load", str(corrupt), "--save", str(save))
    _assert_one_line_error(proc, f"cannot load a tokenizer from folder {corrupt / 'tokenizer'}", save)
    assert not save.exists()

    save.mkdir()
    (save / "keep.txt").write_text("mine")
    proc = _cli("megatron_to_hf", "--load", str(converted["ckpt"] / "qwen2"), "--save", str(save))
    _assert_one_line_error(proc, "exists and is not empty", save)

    # --overwrite never replaces the input: --save the --load folder itself, or a folder holding it
    parent = tmp_path / "run"
    shutil.copytree(converted["ckpt"] / "qwen2", parent / "iter_0000006")
    for target, verb in ((parent / "iter_0000006", "is"), (parent, "holds")):
        proc = _cli("megatron_to_hf", "--load", str(parent / "iter_0000006"), "--save", str(target), "--overwrite")
        _assert_one_line_error(proc, f"--save {target} {verb} the --load input, which writing there would replace",
                               target)
        assert (parent / "iter_0000006" / "renio_model.json").is_file()


# ------------------------------------------------------------------------------------------------
# Layout and file-format units


def test_partial_rotary_factor_is_refused_unless_one():
    """RoPE on part of each head (partial_rotary_factor, at the top level or in rope_parameters) is one line
    naming the field; a factor of 1 is plain RoPE."""
    from checkpoints_conversion.adapters import get_adapter

    adapter = get_adapter("LlamaForCausalLM")
    for fine in ({"partial_rotary_factor": 1.0}, {"rope_parameters": {"partial_rotary_factor": 1}}, {}):
        adapter.check_config(fine, "/m/config.json")
    for bad, field in (({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
                       ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
                        "rope_parameters.partial_rotary_factor=0.25")):
        with pytest.raises(UserInputError) as error:
            adapter.check_config(bad, "/m/config.json")
        assert str(error.value) == f"/m/config.json: LlamaForCausalLM with {field} is not supported"


def test_qkv_layout_is_grouped_per_query_group():
    """Megatron's fused QKV: for each query group, its query heads, then its key, then its value."""
    preset = ModelPreset(
        "Qwen3ForCausalLM", 1, 4, 8, num_attention_heads=4, num_query_groups=2, head_dim=1, vocab_size=8
    )
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = torch.zeros(8, 1)
    for view, hf in zip(QKVLayout().views(preset, fused), (q, k, v)):
        view.copy_(hf.reshape(view.shape))
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    for view, hf in zip(QKVLayout().views(preset, fused), (q, k, v)):
        assert torch.equal(view.reshape(hf.shape), hf)


def test_sharded_writer_round_trip(tmp_path):
    """write_sharded splits at the byte limit (a larger tensor alone), writes a valid index, and
    both this module's reader and the safetensors library read the tensors back."""
    tensors = {
        "a": torch.randn(10, 10), "b": torch.randn(300).to(torch.bfloat16), "c": torch.arange(7, dtype=torch.int64),
        "big": torch.randn(40, 40), "d": torch.randn(2, 3).half(),
    }
    pending = [
        safetensors_io.PendingTensor(name, tuple(t.shape), t.dtype, lambda t=t: t) for name, t in tensors.items()
    ]
    paths = safetensors_io.write_sharded(tmp_path, pending, max_shard_bytes=1000)
    index = json.loads((tmp_path / safetensors_io.INDEX_FILE).read_text())
    shards = [sorted(n for n, f in index["weight_map"].items() if f == p.name) for p in paths]
    assert shards == [["a", "b"], ["c"], ["big"], ["d"]]  # 400 + 600 bytes fit in 1000
    entries = safetensors_io.scan(tmp_path)
    assert list(entries) == list(tensors)
    with safetensors_io.FileReader(entries["big"].file) as reader:
        into = torch.empty(1600)
        assert reader.read(entries["big"], out=into) is into and torch.equal(into.view(40, 40), tensors["big"])
    for path in paths:
        with safetensors_io.FileReader(path) as reader:
            for entry in (e for e in entries.values() if e.file == path):
                assert torch.equal(reader.read(entry), tensors[entry.name])
        for name, tensor in load_file(path).items():
            assert torch.equal(tensor, tensors[name])


def test_a_weights_file_that_cannot_be_read_is_named(tmp_path):
    """Without an index the weights files come from a glob: a dangling link (an HF cache's snapshot copied
    with cp -r) or a folder is named itself, not as an entry of an index the folder does not have."""
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    link = tmp_path / "model-00002-of-00002.safetensors"
    link.symlink_to("../../blobs/0123abcd")
    with pytest.raises(UserInputError, match=f"^{link} is a broken symbolic link \\(to ../../blobs/0123abcd\\)$"):
        safetensors_io.scan(tmp_path)
    link.unlink()
    link.mkdir()
    with pytest.raises(UserInputError, match=f"^{link} is not a file$"):
        safetensors_io.scan(tmp_path)


def test_a_killed_conversion_leaves_nothing_behind(hf_models, tmp_path):
    """SIGTERM while converting: exit 143, its staging folder removed; the full-size leftovers of a
    SIGKILLed one (staging and set-aside folders) go at the next save to the same --save."""
    import signal
    import time

    save = tmp_path / "out"
    cmd = [sys.executable, "-m", "checkpoints_conversion.hf_to_megatron", "--hf-dir", str(hf_models["dirs"]["qwen2"]),
           "--save", str(save)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:  # caught while writing (a fast machine may finish first)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        assert not save.exists() and not list(tmp_path.iterdir())
    else:
        proc.communicate()
    for leftover in (".out.partial-0badf00d", ".out.replaced-0badf00d"):  # what kill -9 leaves
        (tmp_path / leftover / "model").mkdir(parents=True)
    (tmp_path / ".other.partial-0badf00d").mkdir()  # another target's: kept
    assert _cli("hf_to_megatron", "--hf-dir", str(hf_models["dirs"]["qwen2"]), "--save", str(save),
                "--overwrite").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-0badf00d", "out"]
