"""Distributed start-up: layout validation and cross-rank config agreement."""

import pytest

from megatron_renio.distributed import ParallelConfig, fingerprint
from megatron_renio.errors import UserInputError
from megatron_renio.models.builder import check_divisibility
from megatron_renio.models.presets import get_preset
from tests.torchrun_harness import REPO_ROOT, run_torchrun


def test_world_size_must_be_divisible_by_tp_times_pp():
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert parallel.data_parallel_size(8) == 2
    with pytest.raises(UserInputError, match=r"world size 6 is not divisible .*tensor-model-parallel-size 2.* = 4"):
        parallel.data_parallel_size(6)


@pytest.mark.parametrize(
    "tp, what",
    [(4, "attention heads"), (3, "query groups")],
)
def test_tp_must_divide_heads_and_groups(tp, what):
    preset = get_preset("tiny-qwen3-wide")  # 6 heads, 2 query groups
    check_divisibility(preset, ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(UserInputError, match=f"--tensor-model-parallel-size {tp} does not divide the model's {what}"):
        check_divisibility(preset, ParallelConfig(tensor_model_parallel_size=tp))


def test_tp_must_divide_ffn_and_pp_the_layers():
    preset = get_preset("tiny-qwen3").replace(num_attention_heads=4, num_query_groups=4, ffn_hidden_size=130)
    with pytest.raises(UserInputError, match="FFN hidden size"):
        check_divisibility(preset, ParallelConfig(tensor_model_parallel_size=4))
    with pytest.raises(UserInputError, match="does not divide the model's 2 layers"):
        check_divisibility(preset, ParallelConfig(pipeline_model_parallel_size=4))


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_parallel_sizes_are_validated(bad):
    with pytest.raises(UserInputError, match="--tensor-model-parallel-size must be an integer >= 1"):
        ParallelConfig(tensor_model_parallel_size=bad).validate()
    with pytest.raises(UserInputError, match="--sequence-parallel"):
        ParallelConfig(sequence_parallel=True).validate()


def test_fingerprint_is_stable_and_sensitive():
    a = ParallelConfig(tensor_model_parallel_size=2)
    assert fingerprint(a, {"lr": 1e-5}) == fingerprint(ParallelConfig(tensor_model_parallel_size=2), {"lr": 1e-5})
    assert fingerprint(a, {"lr": 1e-5}) != fingerprint(a, {"lr": 2e-5})


def test_ranks_that_disagree_get_one_line_error(tmp_path):
    results = run_torchrun(REPO_ROOT / "tests" / "workers" / "config_agreement_worker.py", 2, tmp_path)
    for r in results:
        assert r["agree"] == "ok"
        assert r["disagree"].startswith("ranks disagree on the configuration: rank 1 differs from rank 0")
        assert "\n" not in r["disagree"]
        assert r["dp_size"] == 2 and r["device"] == "cpu"
