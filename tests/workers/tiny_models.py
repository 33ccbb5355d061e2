"""A tiny student / teacher pair as real converted checkpoints, for the eval and score tests.

:func:`tiny_checkpoints` builds, once per test session (a marker file in ``root`` makes later calls
free), offline:

* a word-level tokenizer (whitespace split) whose vocabulary holds ``\\boxed{0}`` .. ``\\boxed{3}``
  as single tokens, so that a random model's greedy completions end in a gradable box now and then;
* two Hugging Face Qwen3 models from a config (student: hidden 64, tied embeddings; teacher: hidden
  96, untied), 2 layers, weights re-drawn large so that log-probs are far from uniform; their
  vocabularies are the tokenizer's plus 4 ids (student) and plus 260 (teacher), as in real
  checkpoints, whose embedding tables are larger than the tokenizer and may differ within a family;
* both converted by ``checkpoints_conversion.hf_to_megatron`` in one child process (this file is
  its entry script: the checkpoint writer re-imports it).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = (["<unk>", "<s>", "</s>"] + [f"\\boxed{{{i}}}" for i in range(4)]
         + "the cat sat on a mat two plus is four wait so answer".split() + [str(i) for i in range(10)])
EXTRA_IDS = 4
# name -> (seed, hidden, ffn, tied, embedding rows beyond the tokenizer's); the teacher's 260 extra rows pad
# to 384 at TP=1 and 512 at TP=2 against the student's 128 and 256 (a pair like DeepSeek-R1-Distill-Qwen-1.5B
# and -7B)
MODELS = {
    "student": (0, 64, 128, True, EXTRA_IDS),
    "teacher": (1, 96, 160, False, 260),
}


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def _save_hf_model(directory: Path, seed: int, hidden: int, ffn: int, tied: bool, extra_ids: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=len(WORDS) + extra_ids, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param))
    model.save_pretrained(directory)
    _save_tokenizer(directory)


def tiny_checkpoints(root: Path) -> dict[str, Path]:
    """``{"tokenizer", "hf_student", "hf_teacher", "student", "teacher"}`` folders under ``root``."""
    paths = {"tokenizer": root / "tokenizer"}
    paths.update({f"hf_{name}": root / f"hf_{name}" for name in MODELS})
    paths.update({name: root / f"ckpt_{name}" for name in MODELS})
    marker = root / "ready"
    if marker.exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(paths["tokenizer"])
    for name, spec in MODELS.items():
        _save_hf_model(paths[f"hf_{name}"], *spec)
    from tests.python_forkserver import run_python

    proc = run_python([__file__, *[p for name in MODELS for p in (paths[f"hf_{name}"], paths[name])]])
    assert proc.returncode == 0, proc.stderr[-5000:]
    marker.touch()
    return paths


if __name__ == "__main__":  # convert HF_DIR SAVE pairs in one process
    from checkpoints_conversion.hf_to_megatron import convert

    pairs = sys.argv[1:]
    for hf_dir, save in zip(pairs[::2], pairs[1::2]):
        convert(hf_dir, save, dtype="fp32")
