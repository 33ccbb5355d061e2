"""Convert a Hugging Face model folder into a megatron_renio model checkpoint.

    python -m checkpoints_conversion.hf_to_megatron --hf-dir DIR --save DIR
        [--dtype bf16|fp16|fp32] [--tokenizer-dir DIR] [--overwrite] [--debug]

Reads ``config.json`` (Qwen3ForCausalLM, Qwen2ForCausalLM or LlamaForCausalLM), the safetensors
files (with or without ``model.safetensors.index.json``), ``generation_config.json`` and the
tokenizer files (of ``--tokenizer-dir``, else of ``--hf-dir``), and writes the checkpoint of
:mod:`megatron_renio.models.checkpoint`, which loads at any TP/PP layout. The model's
``generation_config.json`` (sampling defaults, every EOS id generation stops on) always goes into the
checkpoint's tokenizer folder, where training reads its stop ids and megatron_to_hf finds it, also
with another ``--tokenizer-dir`` or without tokenizer files (a ``--tokenizer-dir`` whose own
differs gets a note). It runs in one plain process (a world of one, TP=1, PP=1). ``--dtype``
defaults to the ``dtype`` / ``torch_dtype`` of ``config.json`` (bf16 when it names none).

Everything is checked before any weight is read: the architecture and its options, that the files
hold exactly the tensors the config implies (none missing, none unexpected), their shapes and
dtypes, the integrity of every file header. Then the tensors are streamed file by file, one at a
time, straight into their places in the uninitialised Megatron parameters (a QKV part, or a tensor
whose dtype changes, goes through a temporary of its own size), so the peak memory is the Megatron
model plus at most one HF tensor. Each tensor is checked for NaN / inf once it holds its values in
the target dtype, before anything is written: an HF tensor that holds such values is refused, and
so is one whose values do not fit the target dtype (fp16's largest value is 65504: such a model
needs ``--dtype bf16``). Bad input is a one-line ``error: ...`` on stderr with exit status 2, and
leaves nothing behind. A finished conversion prints one line on stdout: the architecture, its
parameter count, the dtype, the number of tensors converted and the checkpoint folder.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from checkpoints_conversion import safetensors_io
from checkpoints_conversion.adapters import get_adapter
from checkpoints_conversion.common import (
    HF_DTYPES,
    Mapping,
    build_single_process_model,
    check_tokenizer,
    make_parser,
    megatron_parameters,
    nonfinite_error,
    print_summary,
    run_cli,
)
from megatron_renio.config import path_arg
from megatron_renio.data.tokenizer import read_generation_config
from megatron_renio.errors import UserInputError
from megatron_renio.models.checkpoint import (METADATA_FILE, all_finite, check_target_directory,
                                              save_model_checkpoint, tokenizer_files)
from megatron_renio.models.presets import ModelPreset, preset_from_hf_config, read_hf_config


def _default_dtype(config: dict) -> str:
    """The checkpoint dtype when --dtype is not given: config.json's ``dtype`` / ``torch_dtype`` when it names
    bf16, fp16 or fp32, else bf16 (no dtype named, or another one such as float64)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return next((short for short, long in HF_DTYPES.items() if long == name), "bf16")


def plan(hf_dir: Path) -> tuple[ModelPreset, dict, list[Mapping], dict[str, safetensors_io.TensorEntry]]:
    """Validate an HF folder without reading weights: ``(preset, config, mappings, entries)``."""
    if not hf_dir.is_dir():
        raise UserInputError(f"--hf-dir {hf_dir} is not a folder")
    config = read_hf_config(hf_dir)
    preset = preset_from_hf_config(config, source=str(hf_dir / "config.json"))
    adapter = get_adapter(preset.architecture)
    adapter.check_config(config, str(hf_dir / "config.json"))
    mappings = adapter.mappings(preset)
    entries = safetensors_io.scan(hf_dir)

    expected = {name: shape for m in mappings for name, shape in zip(m.hf, m.hf_shapes)}
    required = [name for m in mappings if not m.optional for name in m.hf]
    unexpected = [name for name in entries if name not in expected]
    if unexpected:
        entry = entries[unexpected[0]]
        raise UserInputError(
            f"{entry.file}: unexpected tensor {entry.name} (not part of a {preset.architecture} with "
            f"this config.json; {len(unexpected)} unexpected in all)"
        )
    missing = [name for name in required if name not in entries]
    if missing:
        raise UserInputError(
            f"{hf_dir}: missing tensor {missing[0]} (a {preset.architecture} with this config.json "
            f"needs it; {len(missing)} missing in all)"
        )
    for entry in entries.values():
        if entry.dtype not in safetensors_io.FLOAT_DTYPES:
            raise UserInputError(
                f"{entry.file}: tensor {entry.name} has dtype {entry.dtype}; only floating-point "
                f"checkpoints ({', '.join(safetensors_io.FLOAT_DTYPES)}) are supported"
            )
        if entry.shape != expected[entry.name]:
            raise UserInputError(
                f"{entry.file}: tensor {entry.name} has shape {list(entry.shape)} but config.json "
                f"implies {list(expected[entry.name])}"
            )
    return preset, config, mappings, entries


def fill_parameters(preset: ModelPreset, mappings: list[Mapping], entries, parameters: dict) -> None:
    """Stream every HF tensor into its place in ``parameters`` (checkpoint name -> parameter).

    Each HF tensor is read straight into its view of the Megatron parameter when that view is a
    contiguous CPU slice of the file's dtype (embeddings, norms, gate/up, projections in the common
    case); otherwise through one temporary of its own size (QKV, a dtype change, a GPU model).
    Vocabulary padding rows are zeroed. A parameter already filled by one rule and named by another
    (the tied ``lm_head.weight``) must be reproduced exactly by the second. Every view is checked for
    NaN / inf once filled, in the target dtype (one pass over it): :class:`UserInputError` names the
    file and HF tensor, and says whether the file holds them or the cast made them (fp16 overflow).
    """
    import torch

    unmatched = set(parameters) ^ {m.megatron for m in mappings}
    if unmatched:
        raise RuntimeError(f"the {preset.architecture} adapter and the Megatron model disagree on {sorted(unmatched)}")
    owner = {name: (m, part) for m in mappings for part, name in enumerate(m.hf)}
    filled_by: dict[str, str] = {}  # Megatron name -> first HF name of the rule that filled it
    parts_done: dict[int, int] = defaultdict(int)
    by_file = defaultdict(list)
    for entry in entries.values():
        by_file[entry.file].append(entry)

    with torch.no_grad():
        for mapping in mappings:
            padding = mapping.layout.padding(preset, parameters[mapping.megatron].detach())
            if padding is not None:
                padding.zero_()
        for path, file_entries in by_file.items():
            with safetensors_io.FileReader(path) as reader:
                for entry in file_entries:
                    mapping, part = owner[entry.name]
                    view = mapping.layout.views(preset, parameters[mapping.megatron].detach())[part]
                    if mapping.megatron in filled_by:
                        source = reader.read(entry).reshape(view.shape)
                        if not torch.equal(view, source.to(view.dtype).to(view.device)):
                            if not all_finite(source):  # (the view was checked when it was filled)
                                raise nonfinite_error(path, entry.name, source, view.dtype)
                            raise UserInputError(
                                f"{path}: {entry.name} differs from {filled_by[mapping.megatron]} although "
                                "config.json sets tie_word_embeddings=true"
                            )
                        continue
                    source = None  # the HF tensor when it goes through a temporary of its own
                    if view.is_contiguous() and view.device.type == "cpu" and view.dtype == _torch_dtype(entry):
                        reader.read(entry, out=view)
                    else:
                        source = reader.read(entry).reshape(view.shape)
                        view.copy_(source)
                    if not all_finite(view):  # one pass, in the target dtype: sees what the cast made too
                        raise nonfinite_error(path, entry.name, view if source is None else source, view.dtype)
                    del source
                    parts_done[id(mapping)] += 1
                    if parts_done[id(mapping)] == len(mapping.hf):
                        filled_by[mapping.megatron] = mapping.hf[0]


def _torch_dtype(entry: safetensors_io.TensorEntry):
    import torch

    return getattr(torch, safetensors_io.DTYPES[entry.dtype][0])


def convert(
    hf_dir: str | Path,
    save: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Convert ``hf_dir`` into a model checkpoint at ``save``; returns ``save``.

    ``tokenizer_dir`` defaults to ``hf_dir``; a default folder without tokenizer files gives a
    checkpoint without a tokenizer (with a note on stderr), an explicit one is an error. The checkpoint
    keeps ``hf_dir``'s ``generation_config.json`` when it has one, else ``tokenizer_dir``'s; a note on
    stderr names both when they differ. A tokenizer that does not load, or has more ids than the model's
    vocabulary, is refused before anything is written. Prints one summary line on stdout at the end
    (:func:`~checkpoints_conversion.common.print_summary`).
    """
    hf_dir, save = Path(hf_dir), Path(save)
    inputs = (("--hf-dir", hf_dir),) + ((("--tokenizer-dir", tokenizer_dir),) if tokenizer_dir else ())
    check_target_directory(save, overwrite, label=f"--save {save}", inputs=inputs)
    if (hf_dir / METADATA_FILE).is_file():
        raise UserInputError(f"--hf-dir {hf_dir} is a megatron_renio model checkpoint (it has {METADATA_FILE}), "
                             "converted already: pass it to --student-load / --teacher-load, or export it with "
                             "python -m checkpoints_conversion.megatron_to_hf")
    preset, config, mappings, entries = plan(hf_dir)
    generation_config, generation = read_generation_config(hf_dir)  # the model's, checked: a JSON object
    dtype = dtype or _default_dtype(config)
    if tokenizer_dir is not None and not tokenizer_files(tokenizer_dir):
        raise UserInputError(f"--tokenizer-dir {tokenizer_dir} holds no tokenizer files")
    if tokenizer_dir is None:
        if tokenizer_files(hf_dir):
            tokenizer_dir = hf_dir
        else:
            print(f"note: no tokenizer files in {hf_dir}; the checkpoint will have none", file=sys.stderr)
    if tokenizer_dir is not None:  # checked now: training would refuse it after the conversion
        check_tokenizer(tokenizer_dir, preset, hf_dir / "config.json")
        other, other_generation = read_generation_config(tokenizer_dir)
        if generation_config.is_file() and other.is_file() and other_generation != generation:
            print(f"note: {other} differs from the model's {generation_config}; the checkpoint keeps the model's",
                  file=sys.stderr)

    model, info = build_single_process_model(preset, dtype)
    fill_parameters(preset, mappings, entries, megatron_parameters(model))
    save = save_model_checkpoint(
        model, info, save, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
        generation_config=generation_config if generation_config.is_file() else None,
        extra_metadata={"source": str(hf_dir.resolve()), "converted_by": "checkpoints_conversion.hf_to_megatron"},
    )
    print_summary(preset, dtype, len(entries), f"the model checkpoint {save}")
    return save


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(
        "checkpoints_conversion.hf_to_megatron", __doc__.split("\n\n")[0], "the dtype in config.json, else bf16"
    )
    parser.add_argument("--hf-dir", required=True, type=path_arg, help="Hugging Face model folder")
    parser.add_argument("--tokenizer-dir", type=path_arg, help="tokenizer files to copy (default: --hf-dir; "
                        "the --hf-dir's generation_config.json is kept either way)")
    return run_cli(parser, lambda a: convert(a.hf_dir, a.save, a.dtype, a.overwrite, a.tokenizer_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
