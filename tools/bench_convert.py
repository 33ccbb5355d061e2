"""Peak memory of checkpoint conversion on a synthetic ~1B-parameter Qwen3-like model.

    python tools/bench_convert.py [--params 1e9] [--work-dir DIR] [--shard-gb 1.0] [--keep]

Writes a Hugging Face folder (``config.json`` + bf16 safetensors shards with an index, random
weights written tensor by tensor with ``safetensors.torch.save_file``; no HF model is built), then
runs ``checkpoints_conversion.hf_to_megatron`` and ``checkpoints_conversion.megatron_to_hf`` as
subprocesses, each measured on its own: the peak resident memory of the conversion process (its
``VmHWM``, read by the process itself as it exits, cross-checked by psutil sampling every 50 ms) and
its ratio to the model's size in bytes. (``ru_maxrss`` from ``wait4`` would also count this
benchmark's own peak, which a child inherits at fork: no conversion below it could show.) The target is at most about 1.5x. On two CPU cores the whole run
takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from checkpoints_conversion.adapters import get_adapter  # noqa: E402
from megatron_renio.config import typed_arg  # noqa: E402
from megatron_renio.models.presets import ModelPreset, hf_config_dict  # noqa: E402


POSITIVE_FLOAT = typed_arg(float, lambda v: v > 0, "> 0")


def qwen3_like(params: float) -> ModelPreset:
    """Qwen3-1.7B's width (hidden 2048, 16 heads / 8 groups, head 128, tied 151,936 vocabulary)
    with the number of layers that brings the parameter count closest to ``params``."""
    one_layer = ModelPreset("Qwen3ForCausalLM", 1, 2048, 6144, 16, 8, 128, 151936,
                            max_position_embeddings=40960, qk_layernorm=True, tie_word_embeddings=True,
                            bos_token_id=151643, eos_token_id=151645)
    per_layer = one_layer.replace(num_layers=2).num_parameters() - one_layer.num_parameters()
    layers = max(1, round((params - (one_layer.num_parameters() - per_layer)) / per_layer))
    return one_layer.replace(num_layers=layers)


def write_synthetic_hf(preset: ModelPreset, directory: Path, shard_bytes: int) -> int:
    """Random bf16 weights in the HF layout, a shard at a time; returns the total bytes."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(preset, "bfloat16"), indent=2))
    generator = torch.Generator().manual_seed(0)
    names_shapes = [
        (name, shape)
        for mapping in get_adapter(preset.architecture).mappings(preset)
        if not mapping.optional
        for name, shape in zip(mapping.hf, mapping.hf_shapes)
    ]
    shards, current, current_bytes = [], {}, 0
    for name, shape in names_shapes:
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if current and current_bytes + tensor.nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += tensor.nbytes
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
        total += sum(t.nbytes for t in shard.values())
        shard.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# Runs ``python -m <module> <args>`` and, as that process exits, writes its peak resident memory (VmHWM:
# the high-water mark of its own address space, which starts at exec) in bytes into the file named last.
_RUN_AND_REPORT_PEAK = """
import atexit, runpy, sys
report = sys.argv.pop()
def write_peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(report, "w") as out:
        out.write(str(kib * 1024))
atexit.register(write_peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def measure(module: str, *args: str) -> tuple[int, int, float]:
    """Run ``python -m module args``; return (its peak RSS bytes as it reports it, sampled peak RSS bytes,
    seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    handle, name = tempfile.mkstemp(prefix="bench_convert_peak_")
    os.close(handle)
    report = Path(name)
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _RUN_AND_REPORT_PEAK, module, *args, str(report)], env=env,
                            cwd=REPO_ROOT)
    sampled = [0]

    def sample():
        try:
            process = psutil.Process(proc.pid)
            while True:
                sampled[0] = max(sampled[0], process.memory_info().rss)
                time.sleep(0.05)
        except psutil.Error:  # the process has exited
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    seconds = time.time() - start
    sampler.join(timeout=1)
    try:
        if proc.returncode != 0:
            raise SystemExit(f"{module} failed with exit status {proc.returncode}")
        return int(report.read_text()), sampled[0], seconds
    finally:
        report.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=POSITIVE_FLOAT, default=1e9, help="approximate parameter count (the smallest model, one layer and the tied "
                        "151,936 x 2,048 embedding, has 0.36 B)")
    parser.add_argument("--work-dir", type=typed_arg(Path, Path.is_dir, "an existing folder"),
                        help="an existing folder to write the three checkpoints in (default: a temp dir)")
    parser.add_argument("--shard-gb", type=POSITIVE_FLOAT, default=1.0, help="size of the synthetic HF shards")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.work_dir))
    try:
        preset = qwen3_like(args.params)
        t0 = time.time()
        model_bytes = write_synthetic_hf(preset, work / "hf", int(args.shard_gb * 1e9))
        print(f"model: Qwen3-like, {preset.num_layers} layers, {preset.num_parameters() / 1e9:.3f} B parameters, "
              f"{model_bytes / 1e9:.2f} GB in bf16 (written in {time.time() - t0:.0f} s)")
        runs = {
            "hf_to_megatron": ("--hf-dir", str(work / "hf"), "--save", str(work / "megatron")),
            "megatron_to_hf": ("--load", str(work / "megatron"), "--save", str(work / "hf_back")),
        }
        for label, cli_args in runs.items():
            maxrss, sampled, seconds = measure(f"checkpoints_conversion.{label}", *cli_args)
            print(f"{label}: peak RSS {maxrss / 1e9:.2f} GB = {maxrss / model_bytes:.2f}x the model "
                  f"(sampled {sampled / 1e9:.2f} GB), {seconds:.0f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
