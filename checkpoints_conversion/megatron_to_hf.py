"""Convert a megatron_renio model checkpoint into a Hugging Face model folder.

    python -m checkpoints_conversion.megatron_to_hf --load DIR --save DIR
        [--dtype bf16|fp16|fp32] [--overwrite] [--debug]

Loads the checkpoint (saved at any TP/PP layout) into one process at TP=1, PP=1 and writes
``model-0000K-of-0000N.safetensors`` shards of at most 5 GB with ``model.safetensors.index.json``,
``config.json``, ``generation_config.json`` (the one the checkpoint carries, the source model's after
a conversion, else the BOS and EOS ids of ``config.json``, a list of EOS ids kept whole) and the
tokenizer files, so that ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it. The vocabulary padding is dropped; a tied model is
written with ``model.embed_tokens.weight`` only and ``tie_word_embeddings: true``. ``--dtype`` defaults
to the checkpoint's dtype. The HF tensors are produced one at a time while the shards are written, each
checked for NaN / inf in the output dtype as hf_to_megatron checks its input: a weight beyond fp16's
range (65504) is refused with ``--dtype fp16``, naming the tensor (use ``--dtype bf16``). The checkpoint's
tokenizer is loaded first, as hf_to_megatron checks it: one that does not load, or has more ids than
the model's vocabulary, is refused before anything is written. Everything goes to a hidden sibling
folder that is renamed to ``--save`` at the end, and removed on any error; then one line on stdout names
the architecture, its parameter count, the dtype, the number of tensors written and the folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import partial
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
from megatron_renio.data.tokenizer import GENERATION_CONFIG_FILE
from megatron_renio.models.checkpoint import (
    METADATA_FILE,
    all_finite,
    check_target_directory,
    copy_tokenizer_files,
    load_model_checkpoint,
    publish_directory,
    read_checkpoint_metadata,
    staging_directory,
    tokenizer_files,
)
from megatron_renio.models.presets import ModelPreset, hf_config_dict
from megatron_renio.output_paths import fsync_tree, storage_error


def _hf_tensor(load: Path, preset: ModelPreset, mapping: Mapping, part: int, parameter, dtype):
    """HF tensor ``part`` of ``mapping`` in ``dtype``; a :class:`UserInputError` naming it and ``load``
    when its values are not all finite in ``dtype`` (an fp16 overflow, or a broken checkpoint)."""
    view = mapping.layout.views(preset, parameter.detach())[part]
    tensor = view.reshape(mapping.hf_shapes[part]).to(dtype)
    if not all_finite(tensor):
        raise nonfinite_error(load, mapping.hf[part], view, dtype)
    return tensor


def hf_tensors(load: Path, preset: ModelPreset, parameters: dict, dtype) -> list[safetensors_io.PendingTensor]:
    """Every HF tensor of the model, in HF order, produced lazily from ``parameters`` (loaded from the
    checkpoint ``load``, which errors name); producing one that is not finite in ``dtype`` raises."""
    pending = []
    for mapping in get_adapter(preset.architecture).mappings(preset):
        if mapping.optional:
            continue
        for part, (name, shape) in enumerate(zip(mapping.hf, mapping.hf_shapes)):
            produce = partial(_hf_tensor, load, preset, mapping, part, parameters[mapping.megatron], dtype)
            pending.append(safetensors_io.PendingTensor(name, shape, dtype, produce))
    return pending


def convert(load: str | Path, save: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the HF folder ``save`` from the model checkpoint ``load``; returns ``save``. The
    checkpoint's tokenizer must load and fit its vocabulary (checked before anything is written); prints
    one summary line on stdout at the end (:func:`~checkpoints_conversion.common.print_summary`)."""
    load, save = Path(load), Path(save)
    metadata = read_checkpoint_metadata(load)
    check_target_directory(save, overwrite, label=f"--save {save}", inputs=(("--load", load),))
    preset = metadata.preset
    get_adapter(preset.architecture)  # an unsupported architecture fails here, before heavy imports
    dtype = dtype or metadata.dtype
    if metadata.tokenizer_dir is not None:  # a tokenizer that does not load would make an unusable export
        check_tokenizer(metadata.tokenizer_dir, preset, load / METADATA_FILE)

    from megatron_renio.models.builder import DTYPES  # torch: only once the input is known to be good

    model, _ = build_single_process_model(preset, metadata.dtype)
    load_model_checkpoint(model, load)
    tensors = hf_tensors(load, preset, megatron_parameters(model), DTYPES[dtype])

    staging = staging_directory(save)
    staging.mkdir(parents=True)
    try:
        safetensors_io.write_sharded(staging, tensors)
        config = hf_config_dict(preset, HF_DTYPES[dtype])
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if metadata.tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_files(metadata.tokenizer_dir), staging)
        else:
            print(f"note: {load} has no tokenizer files; {save} will have none", file=sys.stderr)
        if metadata.generation_config is not None:
            shutil.copy2(metadata.generation_config, staging / GENERATION_CONFIG_FILE)
        else:
            generation = {name: config[name] for name in ("bos_token_id", "eos_token_id")}
            (staging / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        fsync_tree(staging, synced_by_writers=(".safetensors",))  # write_sharded syncs each file it writes
        publish_directory(staging, save)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise storage_error(e, staging, f"cannot write the Hugging Face folder {save}") from None
        raise
    print_summary(preset, dtype, len(tensors), f"the Hugging Face folder {save.resolve()}")
    return save


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("checkpoints_conversion.megatron_to_hf", __doc__.split("\n\n")[0], "the checkpoint's")
    parser.add_argument("--load", required=True, type=path_arg, help="megatron_renio model checkpoint folder")
    return run_cli(parser, lambda a: convert(a.load, a.save, a.dtype, a.overwrite), argv)


if __name__ == "__main__":  # dist_checkpointing's reader may start helper processes that re-import it
    sys.exit(main())
