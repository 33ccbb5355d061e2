"""The trainer through its real command line: layouts, resume, skipped steps, EMA teacher, bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.training.checkpointing import iteration_dir, prune_checkpoints
from tests.python_forkserver import run_python
from tests.torchrun_harness import REPO_ROOT, free_port, read_jsonl, run_torchrun, subprocess_env, torchrun_args

MAKE_MODELS = """
import sys
from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig
from megatron_renio.models.builder import build_gpt_model
from megatron_renio.models.checkpoint import save_model_checkpoint
from megatron_renio.models.presets import get_preset
out, tok = sys.argv[1], sys.argv[2]
distributed.initialize(ParallelConfig(), seed=5)
student = get_preset("tiny-qwen3").replace(vocab_size=200)
# a teacher with more (unused) vocabulary rows than the student, as DeepSeek-R1-Distill-Qwen-7B against -1.5B:
# padded to 384 rows at TP=1 and 512 at TP=2, the student to 256
teacher = get_preset("tiny-qwen3-untied").replace(vocab_size=300, hidden_size=96, ffn_hidden_size=192, head_dim=24)
odd = get_preset("tiny-qwen3").replace(vocab_size=200, num_attention_heads=3, num_query_groups=3)
for name, preset in (("student", student), ("teacher", teacher), ("odd_heads", odd)):
    model, info = build_gpt_model(preset, ParallelConfig())
    save_model_checkpoint(model, info, f"{out}/{name}", tokenizer_dir=tok)
distributed.destroy()
"""


def train(args, nproc=1, check=True, fault=None):
    """Run the trainer (torchrun when nproc > 1), with ``MEGATRON_RENIO_FAULT=fault`` when given
    (megatron_renio.training.faults); returns the completed process."""
    launcher = [] if nproc == 1 else torchrun_args(nproc)
    env = subprocess_env() | ({"MEGATRON_RENIO_FAULT": fault} if fault else {})
    proc = run_python(launcher + ["-m", "megatron_renio.train", *args], env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def plain_tensors(path):
    """Every tensor of a dist checkpoint, read in this (single) process."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return load_plain_tensors(str(path))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from megatron_renio.data.arithmetic_task import Difficulty, build_char_tokenizer, make_splits, write_jsonl

    root = tmp_path_factory.mktemp("train")
    train_split, _ = make_splits(0, 48, 4, Difficulty(min_ops=2, max_ops=2, max_operand=9))
    write_jsonl(root / "train.jsonl", train_split)
    build_char_tokenizer(root / "tok")
    proc = run_python(["-c", MAKE_MODELS, root / "ckpt", root / "tok"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def base_args(root, **overrides):
    args = {
        "--student-load": root / "ckpt" / "student", "--data-path": root / "train.jsonl",
        "--seq-length": 384, "--max-new-tokens": 12, "--micro-batch-size": 1, "--global-batch-size": 4,
        "--train-iters": 2, "--lr": 1e-3, "--renio": None, "--seed": 3,
    }
    args.update(overrides)
    out = []
    for key, value in args.items():
        if value is False:
            continue
        out.append(key)
        if value is not None:
            out.append(value)
    return out


@pytest.mark.parametrize("scope", ["global"])
def test_opd_step_is_the_same_under_tp2_pp2_dp2(workdir, scope):
    """OPD with a separate, wider teacher: TP=2, PP=2 and DP=2 give the single-process losses."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.data.tokenizer import load_tokenizer
    from megatron_renio.models.checkpoint import read_checkpoint_metadata
    from megatron_renio.training.components import forward_flops_per_position, load_prompts

    presets = {name: read_checkpoint_metadata(workdir / "ckpt" / name).preset for name in ("student", "teacher")}
    opd = {"--mode": "opd", "--teacher": "separate", "--teacher-load": workdir / "ckpt" / "teacher", "--renio-scope": scope,
           "--peak-tflops": 1}
    # the layouts also recompute activations in the three ways (bitwise neutral on the CPU, see
    # test_cpu_backend): across TP, across PP stages, and with the DP gradient reduction, which DP=2
    # overlaps with the backward
    # TP=2 also forms micro-batches of two rows longest first (global scope: the same loss as rows one by one);
    # PP=2 generates its replica's 4 rollouts one at a time (the same draws)
    runs = {"tp1": ({}, 1),
            "tp2": ({"--tensor-model-parallel-size": 2, "--recompute-granularity": "selective", "--micro-batch-size": 2,
                     "--micro-batch-order": "length"}, 2),
            "pp2": ({"--pipeline-model-parallel-size": 2, "--recompute-granularity": "full",
                     "--recompute-method": "block", "--rollout-batch-size": 1}, 2),
            "dp2": ({"--recompute-granularity": "full", "--recompute-method": "uniform", "--recompute-num-layers": 2,
                     "--overlap-grad-reduce": None}, 2)}
    prompts = load_prompts(TrainConfig(data_path=[str(workdir / "train.jsonl")], seq_length=384, max_new_tokens=12,
                                       mode="opd"), load_tokenizer(str(workdir / "tok")))
    losses, norms, rollouts = {}, {}, {}
    for name, (extra, nproc) in runs.items():
        path, save = workdir / f"opd_{name}.jsonl", workdir / f"opd_{name}"
        train(base_args(workdir, **opd, **extra, **{"--metrics-file": path, "--save": save,
                                                    "--save-samples-interval": 1}), nproc=nproc)
        metrics = read_jsonl(path)
        losses[name], norms[name] = [m["loss"] for m in metrics], [m["grad_norm"] for m in metrics]
        rollouts[name] = [[m[key] for key in ("completion_length_mean", "completion_length_max",
                                              "completion_hit_limit_fraction")] for m in metrics]
        for m in metrics:  # the rollout statistics and throughput count every replica's 4 completions
            assert m["rollout_tokens_per_s"] * m["time_rollout_s"] == pytest.approx(4 * m["completion_length_mean"])
            if name != "dp2":
                # one replica; each micro-batch (one row, two for tp2) padded to its longest row's length L
                # rounded up to a multiple of 8: L positions per row, 3 student forwards + 1 teacher's each
                need = [max(len(prompts.student[r["prompt_index"]]), len(prompts.teacher[r["prompt_index"]]))
                        + r["num_tokens"] for r in read_jsonl(save / "samples_rank0.jsonl") if r["step"] == m["step"]]
                assert len(need) == 4
                rows = 2 if name == "tp2" else 1
                if name == "tp2":  # the samples are saved in micro-batch order: longest first
                    assert need == sorted(need, reverse=True), need
                lengths = [-(-max(need[i:i + rows]) // 8) * 8 for i in range(0, 4, rows)]
                t = m["time_forward_backward_s"]
                assert m["train_tokens_per_s"] * t == pytest.approx(rows * sum(lengths))
                flops = sum((3 * forward_flops_per_position(presets["student"], n)
                             + forward_flops_per_position(presets["teacher"], n)) * n * rows for n in lengths)
                assert m["mfu"] == pytest.approx(flops / t / (1e12 * nproc))
    assert len(losses["tp1"]) == 2 and all(l > 0 for l in losses["tp1"])
    for name in ("tp2", "pp2", "dp2"):  # the gradient's size too: Adam's update would hide a scaled gradient
        assert losses[name] == pytest.approx(losses["tp1"], rel=1e-5), name
        assert norms[name] == pytest.approx(norms["tp1"], rel=1e-5), name
        assert rollouts[name] == rollouts["tp1"], name


def straight_and_resumed(workdir, name: str, common: dict, stop: dict, resume: dict):
    """(metrics of 4 straight steps, metrics of the same run stopped after step 2 by ``stop`` and resumed
    by fresh processes with ``--load workdir/name`` and ``resume``, the save folder); DP=2 launches."""
    straight, resumed, save = workdir / f"{name}_straight.jsonl", workdir / f"{name}_resumed.jsonl", workdir / name
    train(base_args(workdir, **common, **{"--metrics-file": straight}), nproc=2)
    train(base_args(workdir, **common, **stop, **{"--save": save, "--metrics-file": resumed}), nproc=2)
    assert [m["step"] for m in read_jsonl(resumed)] == [1, 2]
    train(base_args(workdir, **common, **resume, **{"--load": save, "--metrics-file": resumed}), nproc=2)
    a, b = read_jsonl(straight), read_jsonl(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    return a, b, save


def test_resume_continues_bitwise(workdir):
    """4 steps straight == 2 steps, exit, fresh processes with --load, 2 more steps (DP=2, EMA teacher,
    ReNIO's EMA normaliser; the resume reads model, optimizer and EMA teacher with Megatron's fully
    parallel load)."""
    common = {"--train-iters": 4, "--teacher": "ema", "--ema-decay": 0.9, "--renio-scope": "global",
              "--renio-norm": "ema", "--renio-threshold": -1.0, "--renio-temperature": 0.2,  # weights far from 1
              "--rollout-temperature": 1.3, "--save-interval": 1}
    a, b, save = straight_and_resumed(workdir, "resume", common, {"--exit-interval": 2},
                                      {"--save": workdir / "resume", "--ckpt-fully-parallel-load": None})
    assert all(m["weight_std"] > 0.01 for m in a)  # the normaliser's EMA matters (it is 1 when every weight is)
    for x, y in zip(a, b):
        assert (x["loss"], x["grad_norm"], x["completion_length_mean"]) == (y["loss"], y["grad_norm"], y["completion_length_mean"])
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000004"]  # --keep-last 2
    # the EMA teacher moved by step 4's student: teacher_4 = d teacher_3 + (1 - d) student_4, in float64 here
    teacher_3, teacher_4, student_4 = (plain_tensors(save / f"iter_{i:07d}" / part)
                                       for i, part in ((3, "teacher"), (4, "teacher"), (4, "model")))
    moved = 0
    for key, weight in student_4.items():
        if not torch.is_floating_point(weight):
            continue
        expected = 0.9 * teacher_3[key].double() + 0.1 * weight.double()
        torch.testing.assert_close(teacher_4[key].double(), expected, rtol=1e-6, atol=1e-7, msg=key)
        moved += not torch.equal(teacher_4[key], teacher_3[key])
    assert moved > len(student_4) // 2


def test_resume_at_another_layout_reshards_model_and_optimizer(workdir):
    """2 steps at DP=2 with the distributed optimizer (Adam state sharded over DP) saved in the format
    that loads at any layout, then fresh processes with --load at TP=2, DP=1: the 4 steps equal 4
    straight steps at DP=2 (fp32 tolerance, as layouts). Step 4's loss follows step 3's update, which
    depends on the restored Adam moments and step count."""
    common = {"--train-iters": 4, "--use-distributed-optimizer": None, "--renio-scope": "global",
              "--dist-ckpt-optim-fully-reshardable": None}
    a, b, save = straight_and_resumed(workdir, "layout", common, {"--save-interval": 2, "--exit-interval": 2},
                                      {"--tensor-model-parallel-size": 2, "--save": workdir / "layout",
                                       "--save-interval": 2})
    for x, y in zip(a, b):
        assert (y["loss"], y["grad_norm"]) == pytest.approx((x["loss"], x["grad_norm"]), rel=1e-4), y["step"]
    # each save records its own layout (a dp_reshardable resume is refused at another one)
    assert [torch.load(save / f"iter_{i:07d}" / "train_state.pt", weights_only=False)["optimizer_format"]
            for i in (2, 4)] == [{"sharding": "fully_reshardable", "tp": t, "pp": 1} for t in (1, 2)]


@pytest.mark.slow  # about 30 s of DP=2 launches; test_resume_continues_bitwise and the layout resume run in CI
def test_the_default_optimizer_format_resumes_at_another_dp_size_only(workdir):
    """Without --dist-ckpt-optim-fully-reshardable each DP rank writes its own shard (Megatron-LM's
    default): 2 steps at DP=2 resume in one process (DP=1) and continue as 4 straight steps at DP=2;
    a resume at TP=2 is refused before the models load, naming the layout and the flag."""
    common = {"--train-iters": 4, "--use-distributed-optimizer": None, "--renio-scope": "global"}
    straight, resumed, save = (workdir / "dp_format_straight.jsonl", workdir / "dp_format_resumed.jsonl",
                               workdir / "dp_format")
    train(base_args(workdir, **common, **{"--metrics-file": straight}), nproc=2)
    train(base_args(workdir, **common, **{"--save-interval": 2, "--exit-interval": 2, "--save": save,
                                          "--metrics-file": resumed}), nproc=2)
    proc = train(base_args(workdir, **common, **{"--load": save, "--tensor-model-parallel-size": 2}), nproc=2,
                 check=False)
    assert proc.returncode != 0 and "[rank0]:" not in proc.stderr  # no worker traceback
    assert proc.stderr.count(
        f"--load {save}: its distributed optimizer state was saved without --dist-ckpt-optim-fully-reshardable "
        "(Megatron's dp_reshardable format), which loads only at the TP/PP it was saved at: resume with "
        "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 (any DP size); to change the layout, resume "
        "it once at the layout it was saved at with --dist-ckpt-optim-fully-reshardable (a finished run then saves its "
        "checkpoint again, one that has iterations left at its next save), which any layout loads") == 1  # rank 0 only
    train(base_args(workdir, **common, **{"--load": save, "--metrics-file": resumed}), nproc=1)
    a, b = read_jsonl(straight), read_jsonl(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert (y["loss"], y["grad_norm"]) == pytest.approx((x["loss"], x["grad_norm"]), rel=1e-4), y["step"]
    # as the refusal says: the checkpoint of a run that is done (--train-iters 2), resumed at its layout with the
    # flag, is saved again in the format that loads at TP=2
    done = {**common, "--train-iters": 2, "--lr-decay-iters": 4, "--load": save, "--save": save}
    proc = train(base_args(workdir, **done, **{"--dist-ckpt-optim-fully-reshardable": None}), nproc=2)
    assert f"nothing to train (saved again with --dist-ckpt-optim-fully-reshardable in {save / 'iter_0000002'}" \
        in proc.stdout
    proc = train(base_args(workdir, **done, **{"--tensor-model-parallel-size": 2}), nproc=2)
    assert "resumed from" in proc.stdout and "nothing to train (raise --train-iters to go on)" in proc.stdout


@pytest.mark.slow  # about 30 s of DP=2 launches; test_resume_continues_bitwise and the layout resume run in CI
def test_resume_under_pp2_keeps_the_renio_ema(workdir):
    """PP=2 with --renio-norm ema: the EMA of the weight normaliser lives on the last pipeline stage
    (the loss), the checkpoint's train state is written by global rank 0 (the first stage); the resumed
    steps equal the straight ones bitwise (they would not if the EMA restarted from the next batch)."""
    common = {"--train-iters": 4, "--pipeline-model-parallel-size": 2, "--renio-norm": "ema",
              "--renio-scope": "global", "--save-interval": 2, "--renio-threshold": -1.0,
              "--renio-temperature": 0.2}  # every token pivotal, weights far from 1
    a, b, _ = straight_and_resumed(workdir, "pp2_ema", common, {"--exit-interval": 2}, {})
    assert all(m["weight_std"] > 0.01 for m in a)
    for x, y in zip(a, b):
        assert (x["loss"], x["weight_mean"], x["grad_norm"]) == (y["loss"], y["weight_mean"], y["grad_norm"])


@pytest.mark.slow  # about 30 s of DP=2 launches; test_resume_continues_bitwise and the layout resume run in CI
def test_resume_keeps_each_ranks_local_renio_ema(workdir):
    """Local scope with --renio-norm ema at DP=2: each rank's EMA follows its own micro-batches; the
    resumed steps equal the straight ones bitwise (not if rank 1 resumed with rank 0's EMA)."""
    common = {"--train-iters": 4, "--renio-norm": "ema", "--renio-scope": "local", "--save-interval": 2,
              "--renio-threshold": -1.0, "--renio-temperature": 0.2}  # every token pivotal, weights far from 1
    a, b, _ = straight_and_resumed(workdir, "local_ema", common, {"--exit-interval": 2}, {})
    assert all(m["weight_std"] > 0.01 for m in a)
    for x, y in zip(a, b):
        assert (x["loss"], x["weight_mean"], x["grad_norm"]) == (y["loss"], y["weight_mean"], y["grad_norm"])


@pytest.mark.slow  # about 30 s of DP=2 launches; test_resume_continues_bitwise and the layout resume run in CI
def test_resume_at_another_layout_gives_a_replica_one_local_renio_ema(workdir):
    """Local scope with --renio-norm ema, saved at DP=2 (one EMA per replica), resumed at DP=1 in one
    process, at TP=2 and at PP=2: every rank of the replica resumes from replica 0's EMA, so the three
    layouts take the same step 3 (fp32 tolerance); not if TP rank 1 or the PP=2 last stage took replica
    1's EMA (their rank numbers in the DP=2 run). Without the per-entry clamp: its gradient mask flips
    where d_v = p_v log(p_v / q_v) rounds to either side of 0, and this student and teacher are close."""
    common = {"--train-iters": 3, "--renio-norm": "ema", "--renio-scope": "local", "--renio-threshold": -1.0,
              "--renio-temperature": 0.2, "--kd-token-clip": "none"}  # every token pivotal, weights far from 1
    save = workdir / "replica_ema"
    train(base_args(workdir, **common, **{"--save": save, "--save-interval": 2, "--exit-interval": 2}), nproc=2)
    step3 = {}
    for name, extra, nproc in (("dp1", {}, 1), ("tp2", {"--tensor-model-parallel-size": 2}, 2),
                               ("pp2", {"--pipeline-model-parallel-size": 2}, 2)):
        path = workdir / f"replica_ema_{name}.jsonl"
        train(base_args(workdir, **common, **extra, **{"--load": save, "--metrics-file": path}), nproc=nproc)
        (step3[name],) = read_jsonl(path)
    assert step3["dp1"]["weight_std"] > 0.01
    for name in ("tp2", "pp2"):
        got, want = step3[name], step3["dp1"]
        assert (got["loss"], got["grad_norm"]) == pytest.approx((want["loss"], want["grad_norm"]), rel=1e-4), name


def test_resume_with_another_schedule_is_refused_unless_overridden(workdir):
    """A longer --train-iters (the LR decay length) or another --lr on resume: one line naming the flag
    (Megatron's scheduler would keep the old schedule silently); --override-opt-param-scheduler takes it."""
    save = workdir / "schedule"
    common = {"--lr-decay-style": "linear", "--save": save, "--save-interval": 1}
    train(base_args(workdir, **common, **{"--train-iters": 1}))
    for change, flag in (({"--train-iters": 2}, "the learning rate decays over --train-iters (--lr-decay-iters not "
                                                "given) = 2 iterations, but the run being resumed decays over 1; pass "
                                                "--lr-decay-iters 1 to go on with its schedule"),
                         ({"--train-iters": 1, "--lr": 2e-3}, "--lr sets max_lr=0.002")):
        proc = train(base_args(workdir, **common, **change, **{"--load": save}), check=False)
        assert proc.returncode == 2 and flag in _last_error(proc), _last_error(proc)
    path = workdir / "schedule.jsonl"
    train(base_args(workdir, **common, **{"--train-iters": 4, "--load": save, "--override-opt-param-scheduler": None,
                                          "--lr": 2e-3, "--min-lr": 1e-4, "--metrics-file": path}))
    # the linear decay from the new --lr to the new --min-lr now spans 4 steps: after step 2 the LR is halfway,
    # after step 3 a quarter of the way above --min-lr (the old schedule: 0; the optimizer state's own bounds,
    # which Megatron's scheduler reads first: 5e-4, then 2.5e-4); each step logs the rate after its update, as
    # Megatron-LM does
    assert [(m["step"], m["lr"]) for m in read_jsonl(path)][:2] == [(2, pytest.approx(1.05e-3)),
                                                                    (3, pytest.approx(5.75e-4))]


def test_resume_with_the_other_optimizer_kind_is_refused(workdir):
    """Distributed and replicated optimizer states have different layouts: one line names the flag, exit 2."""
    save = workdir / "plain_optimizer"
    train(base_args(workdir, **{"--train-iters": 1, "--save": save, "--save-interval": 1}))
    proc = train(base_args(workdir, **{"--load": save, "--use-distributed-optimizer": None}), check=False)
    assert proc.returncode == 2
    assert "saved without --use-distributed-optimizer; resume without it" in _last_error(proc)
    assert "student:" not in proc.stdout  # refused before the models load


def test_resume_refuses_what_the_checkpoint_cannot_honour_before_the_models_load(workdir):
    """The run's train state records --bf16, Adam's betas and epsilon and what the frozen teacher was
    built from, and the sampler the prompts it was saved for; a resume that changes one, or the
    student's architecture, is refused in one line before any model is built (the "student:" line
    follows the build). They used to be ignored (Adam's settings: the checkpoint's optimizer kept its
    own; another --student-load: another fixed teacher; the same number of other prompts), late
    (another student) or a traceback (--bf16)."""
    from megatron_renio.models.checkpoint import checkpoint_fingerprint

    save = workdir / "recorded_state"
    train(base_args(workdir, **{"--train-iters": 1, "--save": save, "--save-interval": 1}))
    state = torch.load(iteration_dir(save, 1) / "train_state.pt", weights_only=False)
    student = workdir / "ckpt" / "student"
    assert state["bf16"] is False and state["adam"] == {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8}
    assert state["teacher_origin"] == {"flag": "--student-load", "source": str(student),
                                       "identity": checkpoint_fingerprint(student)}
    reordered = workdir / "train_reversed.jsonl"  # the same prompts in another order
    reordered.write_text("".join(reversed((workdir / "train.jsonl").read_text().splitlines(keepends=True))))
    for change, expected in (
            ({"--bf16": None}, "the run was saved without --bf16; resume without it"),
            ({"--adam-beta2": 0.5}, "the run was saved with --adam-beta2 0.999, which its optimizer state keeps; "
                                    "resume with the same value, not 0.5"),
            ({"--student-load": workdir / "ckpt" / "odd_heads"},  # of the same architecture: the teacher check
             f"iteration 1 holds another model than --student-load (checkpoint vs --student-load: "  # (unit test)
             "num_attention_heads 4 vs 3; num_query_groups 2 vs 3)"),
            ({"--lr-decay-style": "linear", "--lr-decay-iters": 1}, "--lr-decay-style sets lr_decay_style='linear'"),
            ({"--data-path": reordered}, "the checkpoint's prompt sampler was saved for other prompts (48 of them too: "
                                         "other files, another order or other text"),
            ({"--seq-length": 272}, "the checkpoint's prompt sampler was saved for 48 prompts, but the prompt data "
                                    "holds 12 prompts that fit --seq-length 272 (36 longer ones skipped): resume with "
                                    "the run's data and --seq-length")):
        proc = train(base_args(workdir, **change, **{"--load": save}), check=False)
        assert expected in _last_error(proc) and "student:" not in proc.stdout, proc.stdout[-2000:]


def test_nonfinite_gradient_behind_a_finite_loss_is_skipped(workdir):
    """DP=2: a NaN in global rank 0's reduced gradient only (the loss is finite) makes every rank skip
    the step before the optimizer (which would apply it: bf16 without a loss scale and fp32 do not
    check); the weights and the ReNIO EMA stay as they were and training goes on."""
    save = workdir / "nonfinite_grad"
    path = workdir / "nonfinite_grad.jsonl"
    proc = train(base_args(workdir, **{"--train-iters": 3, "--save": save,
                                "--save-interval": 1, "--keep-last": 3, "--metrics-file": path,
                                "--renio-norm": "ema", "--renio-scope": "global", "--renio-threshold": -1}), nproc=2,
          fault="nan-grad:2:0")
    # rank 0 alone shows progress: one line per iteration, not one per rank
    assert [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("train iteration ")] == \
        [f"train iteration {i}/3" for i in (1, 2, 3)], proc.stdout
    ema = [torch.load(save / f"iter_{i:07d}" / "train_state.pt", weights_only=False)["normalizer"][0]["ema"]
           for i in (1, 2, 3)]
    assert torch.equal(ema[0], ema[1]) and not torch.equal(ema[1], ema[2]) and torch.isfinite(ema[2])
    m = read_jsonl(path)
    assert [x["skipped"] for x in m] == [False, True, False]
    assert m[1]["grad_norm"] is None and m[1]["nonfinite"] == 0 and m[1]["loss"] > 0
    assert not any(x["rollout_nonfinite"] for x in m)
    w1, w2, w3 = (plain_tensors(save / f"iter_{i:07d}" / "model") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2) and all(torch.isfinite(w3[k]).all() for k in w3)


def test_a_rollout_drawn_from_nonfinite_logits_on_one_replica_skips_the_step_everywhere(workdir):
    """DP=2: rank 1's rollout reports a token drawn from non-finite logits while every loss is finite:
    both ranks skip the step (rank 0 alone would step, and the ranks would part ways) and log why."""
    path = workdir / "nonfinite_rollout.jsonl"
    train(base_args(workdir, **{"--train-iters": 3, "--metrics-file": path}), nproc=2, fault="nan-rollout:2:1")
    m = read_jsonl(path)
    assert [x["skipped"] for x in m] == [False, True, False]
    assert [x["rollout_nonfinite"] for x in m] == [False, True, False] and m[1]["nonfinite"] == 0


def test_a_replica_waiting_for_a_slower_rollout_does_not_count_the_wait_as_forward_backward(workdir):
    """DP=2: rank 1's first rollout takes SLOW_ROLLOUT_S longer. Rank 0 waits for it before its
    forward-backward timer starts: time_rollout_s (the slowest replica's) holds the wait, and the phases
    fit in the step (counted in forward-backward too, the throughput and MFU came out several times too low)."""
    from megatron_renio.training.faults import SLOW_ROLLOUT_S

    path = workdir / "slow_rollout.jsonl"
    train(base_args(workdir, **{"--train-iters": 2, "--metrics-file": path}), nproc=2, fault="slow-rollout:1:1")
    m = read_jsonl(path)
    assert m[0]["time_rollout_s"] >= SLOW_ROLLOUT_S > m[1]["time_rollout_s"]
    for x in m:
        phases = x["time_rollout_s"] + x["time_forward_backward_s"] + x["time_optimizer_s"]
        assert phases <= x["time_step_s"] + 0.5, x


def test_nonfinite_step_is_skipped_and_weights_unchanged(workdir):
    save = workdir / "nonfinite"
    path = workdir / "nonfinite.jsonl"
    proc = train(base_args(workdir, **{"--train-iters": 3, "--save": save, "--save-interval": 1, "--keep-last": 3,
                                       "--metrics-file": path}), fault="nan-logits:2")
    m = read_jsonl(path)
    assert [x["skipped"] for x in m] == [False, True, False]
    # a log file, not a terminal: one line per iteration (--log-interval 1), a skipped step without a norm,
    # and a last line naming the final checkpoint
    lines = [line for line in proc.stdout.splitlines() if line.startswith("train iteration ")]
    assert [line.split(" | ")[0] for line in lines] == [f"train iteration {i}/3" for i in (1, 2, 3)]
    assert " | grad norm - | " in lines[1] and lines[1].endswith(" | skipped 1") and lines[0].endswith(" | skipped 0")
    assert proc.stdout.splitlines()[-1] == f"done: iteration 3 of --train-iters 3; checkpoint in {save / 'iter_0000003'}"
    assert "\r" not in proc.stderr  # no progress bar in a log file
    assert m[1]["skipped_total"] == 1 and m[1]["nonfinite"] > 0 and m[1]["grad_norm"] is None
    # the checkpoints keep the run of skipped steps, so --max-skipped-steps counts across a requeue
    assert [torch.load(save / f"iter_{i:07d}" / "train_state.pt", weights_only=False)["skipped_in_a_row"]
            for i in (1, 2, 3)] == [0, 1, 0]
    assert "NaN" not in path.read_text() and m[1]["loss"] is None  # standard JSON: a non-finite value is null
    w1, w2, w3 = (plain_tensors(save / f"iter_{i:07d}" / "model") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    # a requeue that resumes right after the skipped step 2 goes on counting: one more skip in a row
    # reaches --max-skipped-steps 2
    import shutil
    requeued = workdir / "nonfinite_requeued"
    shutil.copytree(save, requeued)
    shutil.rmtree(requeued / "iter_0000003")
    (requeued / "latest_checkpointed_iteration.txt").write_text("2")
    requeued_metrics = workdir / "nonfinite_requeued.jsonl"
    proc = train(base_args(workdir, **{"--train-iters": 3, "--load": requeued, "--max-skipped-steps": 2,
                                       "--log-interval": 2, "--metrics-file": requeued_metrics}),
                 check=False, fault="nan-logits:3")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: 2 consecutive steps had a non-finite loss"), proc.stderr[-2000:]
    # every step reaches the metrics file (--log-interval paces the console), the one that stops the run too
    assert [(m["step"], m["skipped"]) for m in read_jsonl(requeued_metrics)] == [(3, True)]


def test_fault_injection_names_a_fault_an_iteration_and_optionally_a_rank(monkeypatch, workdir):
    from megatron_renio.training.faults import injected

    assert not injected("nan-grad", 2)
    monkeypatch.setenv("MEGATRON_RENIO_FAULT", "nan-grad:2:1")
    monkeypatch.setenv("RANK", "1")
    assert injected("nan-grad", 2) and not injected("nan-grad", 3) and not injected("nan-logits", 2)
    monkeypatch.setenv("RANK", "0")
    assert not injected("nan-grad", 2)
    monkeypatch.setenv("MEGATRON_RENIO_FAULT", "nan-logits:2")
    assert injected("nan-logits", 2)
    for spec in ("nan-logit:2", "nan-logits", "nan-logits:0", "nan-logits:2:x", "nan-logits:2:1:1"):
        monkeypatch.setenv("MEGATRON_RENIO_FAULT", spec)
        with pytest.raises(UserInputError, match=f"^MEGATRON_RENIO_FAULT={spec}: expected <fault>:<iteration>"
                                                 r"\[:<rank>\], the fault one of rollout, backward, checkpoint, "
                                                 "eval, nan-logits, nan-grad, nan-rollout, slow-rollout, "
                                                 "sigterm-in-checkpoint$"):
            injected("nan-logits", 2)
    proc = train(base_args(workdir, **{"--save": workdir / "save_of_a_refused_run"}), check=False, fault="nan-logits")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MEGATRON_RENIO_FAULT=nan-logits: expected")
    assert not (workdir / "save_of_a_refused_run").exists()  # refused at start-up


def test_too_many_nonfinite_steps_abort_with_a_message(workdir):
    proc = train(base_args(workdir, **{"--train-iters": 3, "--max-skipped-steps": 1}), check=False, fault="nan-logits:1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 consecutive steps had a non-finite loss")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda p: p.write_text('{"problem": "1+1", "solution": "2"}\n{"problem": \n'), r"train_bad.jsonl.*line 2"),
        (lambda p: p.write_text('{"problem": "1+1"}\n'), r"line 1.*solution|solution.*line 1"),
        (lambda p: p.write_text('{"problem": "", "solution": "x"}\n'), r"empty problem|problem.*empty"),
        (lambda p: p.write_text(""), r"empty"),
    ],
)
def test_bad_data_gives_one_line_error(workdir, mutate, expected):
    bad = workdir / "train_bad.jsonl"
    mutate(bad)
    proc = train(base_args(workdir, **{"--data-path": bad}), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len([l for l in lines if l.startswith("error:")]) == 1 and "Traceback" not in proc.stderr
    import re

    assert re.search(expected, lines[-1]), lines[-1]


def test_samples_per_prompt_rows_share_their_prompt(workdir):
    """--samples-per-prompt 2 at DP=2: each prompt fills two consecutive rows of a rank's batch, for the
    student's and the teacher's prompts alike (one mapping, ``rows_of_prompts``), and its two samples
    draw different noise; the saved samples name each row's prompt."""
    from megatron_renio.train import rows_of_prompts

    assert rows_of_prompts([7, 3], 2) == [7, 7, 3, 3] and rows_of_prompts([5], 3) == [5, 5, 5]
    save = workdir / "grouped"
    train(base_args(workdir, **{"--samples-per-prompt": 2, "--train-iters": 1, "--save": save,
                                "--save-samples-interval": 1, "--rollout-temperature": 2.0}), nproc=2)
    for rank in (0, 1):
        rows = read_jsonl(save / f"samples_rank{rank}.jsonl")
        assert [r["index"] for r in rows] == [0, 1]
        assert rows[0]["prompt_index"] == rows[1]["prompt_index"]
        assert rows[0]["completion_ids"] != rows[1]["completion_ids"]


def test_a_completion_fits_beside_the_longer_teacher_prompt(workdir):
    """OPSD's teacher prompt holds the solution, so it is the longer one: each completion is generated up to
    what that prompt leaves of --seq-length (before, the student generated up to its own room and the
    trainer cut the completion, dropping its EOS), and one cut there counts as hitting its limit."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.data.tokenizer import load_tokenizer
    from megatron_renio.training.components import load_prompts

    tokenizer = load_tokenizer(str(workdir / "tok"))
    longest = max(len(p) for p in load_prompts(TrainConfig(data_path=[str(workdir / "train.jsonl")], seq_length=4096),
                                               tokenizer).teacher)
    seq_length = -(-(longest + 6) // 8) * 8  # room for 6 to 13 tokens beside the longest teacher prompt
    save, metrics = workdir / "teacher_room", workdir / "teacher_room.jsonl"
    proc = train(base_args(workdir, **{"--seq-length": seq_length, "--max-new-tokens": 64, "--train-iters": 1,
                                       "--save": save, "--save-samples-interval": 1, "--metrics-file": metrics,
                                       "--rollout-temperature": 2.0}))
    cfg = TrainConfig(data_path=[str(workdir / "train.jsonl")], seq_length=seq_length, max_new_tokens=64)
    prompts = load_prompts(cfg, tokenizer)
    rows = read_jsonl(save / "samples_rank0.jsonl")
    rooms = [seq_length - max(len(prompts.student[r["prompt_index"]]), len(prompts.teacher[r["prompt_index"]]))
             for r in rows]
    assert all(len(p) < len(t) for p, t in zip(prompts.student, prompts.teacher))
    assert all(r["num_tokens"] <= room for r, room in zip(rows, rooms))
    cut = sum(r["num_tokens"] == room and r["completion_ids"][-1] not in tokenizer.stop_ids for r, room in zip(rows, rooms))
    assert (f"note: 48 prompts leave fewer than --max-new-tokens 64 tokens of --seq-length {seq_length}; their "
            "completions end there") in proc.stdout
    assert "note: with --renio-scope local, --renio-norm batch_mean and --micro-batch-size 1 every ReNIO weight is 1" \
        in proc.stdout
    (step,) = read_jsonl(metrics)
    assert cut > 0 and step["completion_hit_limit_fraction"] == cut / len(rows)


def test_prompts_longer_than_seq_length_are_skipped_or_refused(workdir):
    save = workdir / "save_of_a_refused_run"
    proc = train(base_args(workdir, **{"--seq-length": 64, "--max-new-tokens": 8, "--save": save}), check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "longer than --seq-length 64" in last
    assert "teacher prompt alone" not in last  # the student prompts do not fit either: no teacher note
    assert not save.exists()  # bad input writes nothing


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"--student-load": "/nonexistent/ckpt"}, "--student-load: model checkpoint folder /nonexistent/ckpt does not exist"),
        ({"--teacher-load": "/nonexistent/ckpt"}, "--teacher-load: model checkpoint folder /nonexistent/ckpt does not exist"),
        ({"--renio-clip": 0}, "--renio-clip must be > 0"),
        ({"--tokenizer": "/nonexistent/tok"}, "--tokenizer: tokenizer path /nonexistent/tok does not exist"),
    ],
)
def test_bad_flags_and_paths(workdir, overrides, expected):
    save = workdir / "save_of_a_refused_run"
    proc = train(base_args(workdir, **overrides, **{"--save": save}), check=False)
    assert proc.returncode == 2
    assert expected in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert not save.exists()  # bad input writes nothing


def test_load_must_name_a_run_folder_unless_it_is_the_save_folder(workdir):
    """--load without a checkpoint is refused (a typo, or a model checkpoint), except when it is also --save:
    the first launch of a requeued job starts fresh and says so; a requeue restores the checkpoint that a
    save killed between its renames set aside. Resuming with another --mode or --teacher is refused."""
    student = workdir / "ckpt" / "student"
    for load, expected in ((workdir / "no_such_run", f"--load {workdir / 'no_such_run'} holds no checkpoint to "
                                                      "resume (no such folder)"),
                           (student, f"--load {student} is a model checkpoint, not a run folder: pass --student-load")):
        proc = train(base_args(workdir, **{"--load": load, "--train-iters": 1}), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert expected in proc.stderr.strip().splitlines()[-1]
    other = workdir / "another_runs_metrics.jsonl"
    other.write_text('{"step": 1, "loss": 9.0}\n')
    proc = train(base_args(workdir, **{"--load": workdir / "requeued", "--save": workdir / "requeued",
                                       "--metrics-file": other, "--train-iters": 1}), check=False)
    assert proc.returncode == 2 and other.read_text() == '{"step": 1, "loss": 9.0}\n', proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{other} holds records of an earlier run; remove it or "
                                                         "choose another --metrics-file")  # not this run's to trim
    run = workdir / "first_launch"
    run.mkdir()  # an earlier attempt was killed before its first checkpoint, mid-way through a record
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    (run / "samples_rank0.jsonl").write_text('{"step": 1, "index": 99}\n')
    proc = train(base_args(workdir, **{"--load": run, "--save": run, "--train-iters": 1, "--seq-length": 1024,
                                       "--save-samples-interval": 1}))
    assert f"no checkpoint in {run} yet: starting a new run" in proc.stdout + proc.stderr
    metrics, samples = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "samples_rank0.jsonl")
    assert [m["step"] for m in metrics] == [1] and metrics[0]["loss"] != 9.0  # each step recorded once
    assert [r["index"] for r in samples] == [0, 1, 2, 3]
    assert json.loads((run / "run_logs.json").read_text()) == []  # no log outside --save to claim
    assert ("note: --seq-length 1024 exceeds the student's max_position_embeddings (512); positions beyond it were "
            "not trained") in proc.stdout + proc.stderr
    # a save of iteration 1 over itself killed between its renames: the requeue renames the old folder back
    (run / "iter_0000001").rename(run / ".iter_0000001.replaced-0badf00d")
    proc = train(base_args(workdir, **{"--load": run, "--save": run, "--train-iters": 1, "--seq-length": 1024}))
    assert f"note: restored {run / 'iter_0000001'} from .iter_0000001.replaced-0badf00d" in proc.stdout
    assert ("the run is at iteration 1 of --train-iters 1: nothing to train (raise --train-iters to go on)"
            in proc.stdout) and "done:" not in proc.stdout
    proc = train(base_args(workdir, **{"--load": run / "iter_0000001", "--train-iters": 2}), check=False)
    assert f"pass --load {run} (its run folder) to resume, or --student-load" in proc.stderr.strip().splitlines()[-1]
    from megatron_renio.models.checkpoint import read_checkpoint_metadata

    with pytest.raises(UserInputError, match=f"it is a training run folder; pass one of its checkpoints, the latest "
                                             f"is {run / 'iter_0000001'}$"):
        read_checkpoint_metadata(run)  # what megatron_to_hf --load, eval and score read
    for change, saved in (({"--teacher": "ema"}, "--teacher fixed"),
                          ({"--mode": "opd", "--teacher": "separate", "--teacher-load": workdir / "ckpt" / "teacher"},
                           "--mode opsd")):
        proc = train(base_args(workdir, **{"--load": run, "--save": run, "--train-iters": 2, **change}), check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"--load {run}: the run was saved with {saved}; resume it with the same" in proc.stderr.splitlines()[-1]


def _train_until_signalled(workdir, name: str, extra: dict, ready, signal_workers):
    """Launch a 2-rank run of 1000 iterations into ``workdir/name`` (with ``extra`` flags), wait until
    ``ready(save, metrics)``, call ``signal_workers(launcher, workers)``; return the launcher's
    (return code, stdout, stderr), the number of logged steps and the latest checkpoint's iteration."""
    import signal
    import time

    import psutil

    save, path = workdir / name, workdir / f"{name}.jsonl"
    cmd = [sys.executable, *torchrun_args(2), "-m", "megatron_renio.train"]
    args = base_args(workdir, **{"--train-iters": 1000, "--save": save, "--metrics-file": path, **extra})
    proc = subprocess.Popen(cmd + [str(a) for a in args], cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ready(save, path):
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "megatron_renio.train" in " ".join(p.cmdline())]
        signal_workers(proc, workers)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a failed run: end the launcher and its workers (its own session)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    latest = save / "latest_checkpointed_iteration.txt"
    return proc.returncode, out, err, len(read_jsonl(path)), int(latest.read_text()) if latest.exists() else None


def test_sigterm_saves_at_the_next_safe_point_and_exits_0(workdir):
    """SLURM-style preemption: SIGTERM reaches one rank only; every rank agrees, saves, exits 0."""
    import signal

    def rank1_only(_, workers):
        next(p for p in workers if p.environ().get("RANK") == "1").send_signal(signal.SIGTERM)

    rc, out, err, steps, latest = _train_until_signalled(
        workdir, "sigterm", {}, lambda _, path: path.exists() and path.read_text().count("\n") >= 1, rank1_only)
    assert rc == 0, err[-3000:]
    assert "exiting after iteration" in out and "SIGTERM received" in out
    assert 1 <= steps < 1000 and latest == steps


def test_sigterm_to_every_process_of_the_step_after_a_save(workdir):
    """SLURM's ``--signal=TERM@N`` and preemption signal every process of the job step: the launcher,
    the ranks and any process they started (Megatron's checkpoint writer kept a helper process from
    the first save on, which the signal killed, so the save on the way out failed on every rank)."""
    import signal

    def whole_group(launcher, _):
        os.killpg(launcher.pid, signal.SIGTERM)

    rc, out, err, steps, latest = _train_until_signalled(
        workdir, "sigterm_all", {"--save-interval": 2}, lambda save, _: (save / "iter_0000002").is_dir(), whole_group)
    assert rc != 0  # torchrun itself was told to stop: it reports that, after its workers finished
    assert "exiting after iteration" in out and "SIGTERM received" in out and "Error" not in err, err[-3000:]
    assert 2 <= steps < 1000 and latest == steps  # the last step's checkpoint (2: the signal came during its save)
    kept = sorted({*range(2, steps + 1, 2), steps})[-2:]  # --keep-last 2, and no half-written folder left
    assert sorted(p.name for p in (workdir / "sigterm_all").glob("*iter_*")) == [f"iter_{i:07d}" for i in kept]


def test_a_signal_during_a_periodic_save_exits_after_that_save(workdir):
    """SIGTERM while iteration 2's checkpoint is written: the run exits once that save is done, without
    another step and save (at scale a rollout and a second save could outlast the grace period)."""
    save = workdir / "signalled_in_save"
    proc = train(base_args(workdir, **{"--train-iters": 6, "--save": save, "--save-interval": 2}),
                 fault="sigterm-in-checkpoint:2")
    assert "exiting after iteration 2: SIGTERM received" in proc.stdout, proc.stdout[-2000:]
    assert [m["step"] for m in read_jsonl(save / "metrics.jsonl")] == [1, 2]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_the_exit_signal_is_the_one_named(monkeypatch):
    """--exit-signal SIGUSR1 (SLURM's --signal=USR1@N): that signal is recorded and ends the run after
    the step; its previous handler comes back when the run ends."""
    import signal

    from megatron_renio.config import parse_train_args
    from megatron_renio.training.exit_conditions import ExitConditions

    assert parse_train_args(["--data-path", "d.jsonl", "--model", "tiny-qwen3",
                             "--exit-signal", "SIGUSR1"]).exit_signal == "SIGUSR1"
    before = signal.getsignal(signal.SIGUSR1)
    exits = ExitConditions(exit_signal=signal.Signals["SIGUSR1"]).install()
    try:
        assert exits.should_exit(1, torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert exits.should_exit(2, torch.device("cpu")) == "SIGUSR1 received"
    finally:
        exits.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_exit_duration_in_mins(workdir):
    save = workdir / "duration"
    proc = train(base_args(workdir, **{"--train-iters": 1000, "--save": save, "--exit-duration-in-mins": 0.0001}))
    assert "exiting after iteration 1: --exit-duration-in-mins" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"


def _last_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_checkpoint_with_a_missing_shard(workdir):
    import shutil

    broken = workdir / "broken_ckpt"
    shutil.copytree(workdir / "ckpt" / "student", broken)
    next((broken / "model").glob("*.distcp")).unlink()
    line = _last_error(train(base_args(workdir, **{"--student-load": broken}), check=False))
    assert line.startswith("error:") and str(broken) in line


def test_teacher_with_another_tokenizer_is_refused(workdir):
    import shutil

    from megatron_renio.data.arithmetic_task import build_char_tokenizer

    other = workdir / "other_teacher"
    shutil.copytree(workdir / "ckpt" / "teacher", other)
    shutil.rmtree(other / "tokenizer")
    build_char_tokenizer(workdir / "tok_other")
    vocab = (workdir / "tok_other" / "tokenizer.json").read_text().replace('"0"', '"zero"', 1)
    (other / "tokenizer").mkdir()
    for f in (workdir / "tok_other").iterdir():
        (other / "tokenizer" / f.name).write_text(vocab if f.name == "tokenizer.json" else f.read_text())
    line = _last_error(train(base_args(workdir, **{"--mode": "opd", "--teacher": "separate", "--teacher-load": other}), check=False))
    assert "teacher tokenizer" in line and "differs from the student's" in line
    # --tokenizer: compared with the teacher's (named as the flag) and, as a note, with the student's
    line = _last_error(train(base_args(workdir, **{"--mode": "opd", "--teacher": "separate", "--teacher-load": other,
                                                   "--tokenizer": workdir / "tok_other"}), check=False))
    assert line.startswith(f"error: teacher tokenizer ({other / 'tokenizer'}) differs from --tokenizer {workdir / 'tok_other'}")
    # a student built from a preset has no tokenizer of its own: the teacher's is still compared
    preset = {"--student-load": False, "--model": "tiny-qwen3", "--tokenizer": workdir / "tok"}
    line = _last_error(train(base_args(workdir, **preset, **{"--mode": "opd", "--teacher": "separate",
                                                              "--teacher-load": other}), check=False))
    assert line.startswith(f"error: teacher tokenizer ({other / 'tokenizer'}) differs from --tokenizer {workdir / 'tok'}")
    save = workdir / "other_tokenizer_run"
    proc = train(base_args(workdir, **{"--tokenizer": other / "tokenizer", "--train-iters": 1, "--save": save}))
    assert (f"note: the vocabulary of --tokenizer {other / 'tokenizer'} differs from the student checkpoint's tokenizer "
            f"({workdir / 'ckpt' / 'student' / 'tokenizer'})") in proc.stdout
    # the checkpoint keeps the tokenizer the run trained with (it kept the student checkpoint's)
    assert (iteration_dir(save, 1) / "tokenizer" / "tokenizer.json").read_text() == vocab


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"--global-batch-size": 3, "--micro-batch-size": 2}, "--global-batch-size 3 is not divisible by --micro-batch-size 2"),
        ({"--tensor-model-parallel-size": 2}, "world size 1 is not divisible by --tensor-model-parallel-size 2"),
        ({"--global-batch-size": 128, "--samples-per-prompt": 2},  # 48 prompts in the data
         "holds 48 prompts, fewer than --global-batch-size 128 / --samples-per-prompt 2 = 64 prompts per step"),
    ],
)
def test_layout_errors(workdir, overrides, expected):
    assert expected in _last_error(train(base_args(workdir, **overrides), check=False))


def test_save_folder_of_another_model_is_refused(workdir):
    save = workdir / "other_model_run"
    proc_first = train(base_args(workdir, **{"--train-iters": 2, "--save": save, "--save-interval": 1}))
    wider = base_args(workdir, **{"--student-load": workdir / "ckpt" / "teacher", "--train-iters": 1, "--save": save,
                                  "--save-interval": 1})
    assert _last_error(train(wider, check=False)).startswith(
        f"error: --save {save} holds checkpoints of another model (checkpoint vs this run: hidden_size ")
    assert f"data: 48 prompts from --data-path {workdir / 'train.jsonl'}\n" in proc_first.stdout  # the files it read
    # resuming it with another student (no --save) is refused before any model is built, naming what differs
    teacher = workdir / "ckpt" / "teacher"
    proc = train(base_args(workdir, **{"--student-load": teacher, "--train-iters": 3, "--load": save}), check=False)
    assert _last_error(proc).startswith(f"error: --load {save}: iteration 2 holds another model than --student-load "
                                        "(checkpoint vs --student-load: hidden_size ") and "student:" not in proc.stdout
    same = base_args(workdir, **{"--train-iters": 1, "--save": save, "--save-interval": 1})
    assert "of a run of this architecture: resume it with --load" in _last_error(train(same, check=False))
    assert [m["step"] for m in read_jsonl(save / "metrics.jsonl")] == [1, 2]
    # a new run does not append to the earlier run's metrics (refused before the models load)
    proc = train(base_args(workdir, **{"--train-iters": 1, "--metrics-file": save / "metrics.jsonl"}), check=False)
    assert _last_error(proc) == (f"error: {save / 'metrics.jsonl'} holds records of an earlier run; remove it or "
                                 "choose another --metrics-file") and "student:" not in proc.stdout
    import shutil
    shutil.copytree(save, workdir / "other_model_run_copy")
    train(wider + ["--override-save", "--train-iters", "3", "--save-interval", "3"])
    # the folder's metrics start over with the new run (they were appended: steps 1, 2, 1, ...), and its
    # first save removes the earlier run's checkpoints (with --keep-last 2 it kept iteration 2 beside 3)
    assert [m["step"] for m in read_jsonl(save / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003"]
    # the same when the run resumes another folder: --load save (iteration 3), --save the copy of the old run
    copy = workdir / "other_model_run_copy"
    train(wider + ["--override-save", "--load", str(save), "--save", str(copy), "--train-iters", "4",
                   "--save-interval", "4"])
    assert [m["step"] for m in read_jsonl(copy / "metrics.jsonl")] == [4]
    assert sorted(p.name for p in copy.glob("iter_*")) == ["iter_0000004"]


def test_a_save_folder_in_use_by_another_run_is_refused_before_anything_is_written(workdir):
    """The requeue form (--load S --save S) started while the first attempt still runs: one line naming
    the holder, before it reads the folder or builds a model, and the folder left as it was."""
    from megatron_renio.training.save_lock import LOCK_FILE, claim_save_folder, release_save_folder

    save = workdir / "held_run"
    claim_save_folder(save)  # this process stands for the run that holds the folder
    try:
        proc = train(base_args(workdir, **{"--train-iters": 1, "--load": save, "--save": save}), check=False)
        holder = (save / LOCK_FILE).read_text().strip()
    finally:
        release_save_folder(save)
    assert _last_error(proc).startswith(f"error: --save {save} is in use by another run ({holder}); ")
    assert "student:" not in proc.stdout and [p.name for p in save.iterdir()] == [LOCK_FILE]


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_tp_that_does_not_divide_the_heads(workdir, role):
    """The error names the model whose heads do not divide (a teacher with 3 heads said "the model's")."""
    odd = workdir / "ckpt" / "odd_heads"
    models = ({"--student-load": odd} if role == "student" else
              {"--mode": "opd", "--teacher": "separate", "--teacher-load": odd})
    proc = train(base_args(workdir, **models, **{"--tensor-model-parallel-size": 2}), nproc=2, check=False)
    assert proc.returncode != 0
    assert f"error: --tensor-model-parallel-size 2 does not divide the {role}'s attention heads (3)" in proc.stderr


def test_two_nodes_through_the_rendezvous_launch_form(workdir):
    """Two torchrun agents of one process each joining one c10d rendezvous, as two nodes do (each rank is
    local rank 0 of its node, the checkpoint folder is shared): the same losses as DP=2 on one node, and
    one complete checkpoint."""
    opd = {"--mode": "opd", "--teacher": "separate", "--teacher-load": workdir / "ckpt" / "teacher", "--renio-scope": "global"}
    static = workdir / "opd_dp2.jsonl"  # written by test_opd_step_is_the_same_under_tp2_pp2_dp2 when it ran first
    if not static.exists():
        train(base_args(workdir, **opd, **{"--metrics-file": static}), nproc=2)
    path, save = workdir / "two_nodes.jsonl", workdir / "two_nodes_save"
    args = [str(a) for a in base_args(workdir, **opd, **{"--metrics-file": path, "--save": save})]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=renio-test", "-m", "megatron_renio.train", *args]
    nodes = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(err[-3000:] for _, err in outputs)
    assert [m["loss"] for m in read_jsonl(path)] == pytest.approx([m["loss"] for m in read_jsonl(static)], rel=1e-6)
    assert sorted(p.name for p in save.iterdir()) == [".run_lock", "iter_0000002", "latest_checkpointed_iteration.txt",
                                                      "run_logs.json"]
    assert json.loads((save / "run_logs.json").read_text()) == [str(path.resolve())]  # the run's log outside --save


def test_a_save_waits_for_the_pruning_of_the_save_before(tmp_path, monkeypatch):
    """Rank 0 prunes in a background thread after publishing. The next save joins it before writing
    anything (pruning also removes iterations newer than the one it keeps: a thread still at work
    would delete the new save), and the thread is no daemon (a finished process joins it). The model,
    optimizer and teacher writers are stubbed: this checks the order."""
    import time
    import types

    from megatron_renio import distributed
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models import checkpoint as model_checkpoint
    from megatron_renio.training import checkpointing

    events = []

    def slow_prune(*args):
        time.sleep(0.5)
        events.append("pruned")
        return prune_checkpoints(*args)

    def model_writer(student, info, directory, **kwargs):
        os.makedirs(directory)
        events.append("model")

    monkeypatch.setattr(checkpointing, "prune_checkpoints", slow_prune)
    monkeypatch.setattr(model_checkpoint, "save_model_checkpoint", model_writer)
    monkeypatch.setattr(checkpointing, "optimizer_format", lambda *args: None)
    monkeypatch.setattr(checkpointing, "_optimizer_state_dict", lambda *args: None)
    monkeypatch.setattr(checkpointing, "_distributed", lambda optimizer: False)
    student = types.SimpleNamespace(sharded_state_dict=dict)
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        for iteration in (1, 2):
            checkpointing.save_training_checkpoint(tmp_path, iteration, student=student, student_info=None,
                                                   optimizer=None, train_state={"iteration": iteration}, keep_last=1)
            assert [thread.daemon for thread in checkpointing._pruning] == [False]
        checkpointing.wait_for_pruning()
    finally:
        distributed.destroy()
    assert events == ["model", "pruned", "model", "pruned"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_pruning_keeps_the_latest_saves_of_this_run(tmp_path):
    """--keep-last 2 after each save; a folder of a longer run started over (--override-save) loses its
    later iterations at the first save instead of keeping them and deleting the new ones."""
    for old in (90, 100):
        iteration_dir(tmp_path, old).mkdir()
    kept = []
    for published in (1, 2, 3):
        iteration_dir(tmp_path, published).mkdir()
        prune_checkpoints(tmp_path, published, keep_last=2)
        kept.append(sorted(p.name for p in tmp_path.glob("iter_*")))
    assert kept == [["iter_0000001"], ["iter_0000001", "iter_0000002"], ["iter_0000002", "iter_0000003"]]
    prune_checkpoints(tmp_path, 3, keep_last=1)
    assert [p.name for p in tmp_path.glob("iter_*")] == ["iter_0000003"]


def test_checkpoint_fingerprint_follows_a_copy_and_tells_weights_apart(tmp_path):
    """Same weights, same fingerprint: a copy, and the same model saved again (torch_dist's .metadata
    holds a random id; renio_model.json's extra names where it came from; its preset's pad id is not
    architecture). Other weights, another
    architecture or dtype: another fingerprint."""
    import json
    import shutil

    from megatron_renio.models.checkpoint import checkpoint_fingerprint

    original = tmp_path / "a"
    (original / "model").mkdir(parents=True)
    (original / "renio_model.json").write_text(json.dumps({"preset": {"x": 1}, "dtype": "bf16", "extra": {}}))
    big = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: its first and last MiB are read
    (original / "model" / "__0_0.distcp").write_bytes(big)
    (original / "model" / ".metadata").write_bytes(b"meta")
    fingerprint = checkpoint_fingerprint(original)
    saved_again = tmp_path / "again"
    shutil.copytree(original, saved_again)
    assert checkpoint_fingerprint(saved_again) == fingerprint
    (saved_again / "model" / ".metadata").write_bytes(b"another save id")
    (saved_again / "renio_model.json").write_text(json.dumps({"preset": {"x": 1}, "dtype": "bf16",
                                                              "extra": {"source": "/elsewhere"}}))
    assert checkpoint_fingerprint(saved_again) == fingerprint
    for pad in (None, -1, 7):  # presets carry pad_token_id since 2026-11-28: converted again, the same fingerprint
        (saved_again / "renio_model.json").write_text(json.dumps({"preset": {"x": 1, "pad_token_id": pad},
                                                                  "dtype": "bf16"}))
        assert checkpoint_fingerprint(saved_again) == fingerprint, pad
    for name, data in (("__0_0.distcp", b"\1" + big[1:]), ("__0_0.distcp", big[:-1] + b"\1"),
                       ("__1_0.distcp", b"one more file"),
                       # the data repeats every 256 bytes: 256 more in the middle keep the first and last MiB
                       ("__0_0.distcp", big[:1 << 20] + bytes(range(256)) + big[1 << 20:])):
        changed = tmp_path / f"changed_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(original, changed)
        (changed / "model" / name).write_bytes(data)
        assert checkpoint_fingerprint(changed) != fingerprint, name
    for metadata in ({"preset": {"x": 2}, "dtype": "bf16"}, {"preset": {"x": 1}, "dtype": "fp32"}):
        (saved_again / "renio_model.json").write_text(json.dumps(metadata))
        assert checkpoint_fingerprint(saved_again) != fingerprint, metadata


def test_checkpoint_fingerprint_does_not_depend_on_the_listing_order(tmp_path, monkeypatch):
    """Another filesystem lists a folder in another order (a copy must keep its fingerprint)."""
    import pathlib

    from megatron_renio.models.checkpoint import checkpoint_fingerprint

    (tmp_path / "model").mkdir()
    (tmp_path / "renio_model.json").write_text("{}")
    for name in ("a.distcp", "b.distcp", ".metadata"):
        (tmp_path / "model" / name).write_bytes(name.encode())
    fingerprint = checkpoint_fingerprint(tmp_path)
    rglob = pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, pattern: reversed(list(rglob(self, pattern))))
    assert checkpoint_fingerprint(tmp_path) == fingerprint


def test_resumed_settings_are_compared_with_the_run(tmp_path):
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.resume import check_resumed_settings

    cfg = TrainConfig(load="run", lr=1e-3)
    origin = {"flag": "--student-load", "source": "s", "identity": "abc"}
    state = {"mode": cfg.mode, "teacher": cfg.teacher, "bf16": False, "teacher_origin": origin,
             "adam": {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8},
             "scheduler": {"max_lr": 1e-3, "lr_decay_steps": cfg.train_iters}}
    check_resumed_settings(state, cfg, dict(origin, source="moved"))  # a moved copy: same identity
    check_resumed_settings({"mode": cfg.mode}, cfg, origin)  # an earlier version's state records less
    check_resumed_settings({"mode": cfg.mode}, TrainConfig(load="run", bf16=True), origin)
    for change, expected in ((dict(bf16=True), "saved without --bf16"),
                             (dict(adam_eps=1e-6), "saved with --adam-eps 1e-08"),
                             (dict(lr=2e-3), "--lr sets max_lr=0.002")):
        with pytest.raises(UserInputError, match=expected):
            check_resumed_settings(state, TrainConfig(**{"load": "run", "lr": 1e-3, **change}), origin)
    other_teacher = {"flag": "--model", "source": "tiny", "identity": "preset tiny"}
    for flags in ({}, {"override_opt_param_scheduler": True}):  # only --override-teacher-check lets it through
        with pytest.raises(UserInputError, match="frozen teacher was built from --student-load s, but --model tiny "
                                                 r".*or pass --override-teacher-check if it holds the same weights"):
            check_resumed_settings(state, TrainConfig(load="run", lr=1e-3, **flags), other_teacher)
    check_resumed_settings(state, TrainConfig(load="run", lr=1e-3, override_teacher_check=True),
                           {"flag": "--student-load", "source": "resaved", "identity": "other files"})
    check_resumed_settings(state, TrainConfig(load="run", lr=2e-3, override_opt_param_scheduler=True), origin)


def test_more_train_iters_resume_a_constant_lr_and_a_decay_with_its_own_length():
    """A constant LR never reads the decay length or the minimum: more --train-iters (or another
    --min-lr) resume it as it is. A decaying LR
    keeps its length with --lr-decay-iters (Megatron-LM's flag); without it more --train-iters would
    stretch the decay, refused in one line that says which flag to pass. The weight decay is constant,
    so its increment length (--train-iters) is not compared."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.components import check_resumed_schedule, schedule_settings

    def saved(**flags):
        return schedule_settings(TrainConfig(**{"load": "run", "train_iters": 100, **flags}))

    check_resumed_schedule(saved(), TrainConfig(load="run", train_iters=300))
    check_resumed_schedule(saved(), TrainConfig(load="run", min_lr=1e-7))  # a constant LR never reads it either
    with pytest.raises(UserInputError, match="--min-lr sets min_lr=1e-07"):
        check_resumed_schedule(saved(lr_decay_style="cosine"), TrainConfig(load="run", lr_decay_style="cosine",
                                                                           min_lr=1e-7))
    check_resumed_schedule(saved(lr_decay_style="cosine"),
                           TrainConfig(load="run", train_iters=300, lr_decay_style="cosine", lr_decay_iters=100))
    for flags, expected in (
            (dict(train_iters=300), r"decays over --train-iters \(--lr-decay-iters not given\) = 300 iterations, "
                                    r"but the run being resumed decays over 100; pass --lr-decay-iters 100 to go on"),
            (dict(train_iters=300, lr_decay_iters=200), "decays over --lr-decay-iters = 200 iterations"),
            (dict(train_iters=100, lr_decay_style="linear"), "--lr-decay-style sets lr_decay_style='linear'"),
            # both differ: the style first (--lr-decay-iters could not fix the refusal)
            (dict(train_iters=300, lr_decay_style="linear"), "--lr-decay-style sets lr_decay_style='linear'")):
        with pytest.raises(UserInputError, match=expected):
            check_resumed_schedule(saved(lr_decay_style="cosine"),
                                   TrainConfig(**{"load": "run", "lr_decay_style": "cosine", **flags}))


def test_a_dp_reshardable_optimizer_state_resumes_at_its_own_tp_pp_only():
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.resume import check_resumed_settings

    state = {"optimizer_format": {"sharding": "dp_reshardable", "tp": 2, "pp": 1}}
    check_resumed_settings(state, TrainConfig(load="run", tensor_model_parallel_size=2), None)
    for layout in (dict(tensor_model_parallel_size=1), dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)):
        with pytest.raises(UserInputError, match="loads only at the TP/PP it was saved at: resume with "
                                                 "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1"):
            check_resumed_settings(state, TrainConfig(load="run", **layout), None)
    fully = {"optimizer_format": {"sharding": "fully_reshardable", "tp": 2, "pp": 1}}
    check_resumed_settings(fully, TrainConfig(load="run", pipeline_model_parallel_size=2), None)


@pytest.mark.parametrize("fully_reshardable", [False, True])
def test_distributed_optimizer_state_round_trip(tmp_path, fully_reshardable, monkeypatch):
    """A training checkpoint restores the distributed optimizer's main weights, Adam moments and step in
    both formats (the format is recorded and read back); a dp_reshardable state loaded into other
    gradient buckets (--overlap-grad-reduce splits a model above its bucket size) is refused with one
    line before the load. A save whose RNG file cannot be written (torch.save raises RuntimeError for a
    full disk) is one line, and the checkpoint before it stays the latest."""
    from megatron_renio import distributed
    from megatron_renio.config import TrainConfig
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training import components as C
    from megatron_renio.training.checkpointing import (load_training_checkpoint, read_train_state,
                                                       save_training_checkpoint)

    cfg = TrainConfig(use_distributed_optimizer=True, lr=1e-2)
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        def build(bucket_size=None):
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            model, info = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
            if bucket_size is None:
                ddp = C.wrap_ddp(model, use_distributed_optimizer=True)
            else:  # as wrap_ddp with --overlap-grad-reduce, with buckets smaller than the model
                ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True,
                    average_in_collective=False, bucket_size=bucket_size), model)
            optimizer = C.build_optimizer(ddp, cfg)[0]
            return model, info, ddp, optimizer, optimizer.chained_optimizers[0]  # the one DistributedOptimizer

        def adam_state(distributed_optimizer):
            inner = distributed_optimizer.optimizer
            return [[p.detach().clone(), *(inner.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "step"))]
                    for group in inner.param_groups for p in group["params"]]

        model, info, ddp, optimizer, dist_opt = build()
        tokens = torch.randint(0, 100, (2, 16))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(tokens, torch.arange(16).expand(2, 16), attention_mask=None).float().pow(2).mean().backward()
        ddp.finish_grad_sync()
        assert optimizer.step()[0]
        saved = adam_state(dist_opt)
        model_config = tmp_path.parent / f"generation_config_{fully_reshardable}.json"
        model_config.write_text('{"eos_token_id": [1, 5], "temperature": 0.6}')
        save_training_checkpoint(tmp_path, 1, student=model, student_info=info, optimizer=optimizer,
                                 train_state={"iteration": 1}, fully_reshardable=fully_reshardable,
                                 generation_config=model_config)
        # the model's generation config is kept (a run with --tokenizer passes the student checkpoint's)
        assert (tmp_path / "iter_0000001" / "tokenizer" / "generation_config.json").read_text() == model_config.read_text()
        state = read_train_state(tmp_path)
        assert state["optimizer_format"] == {"sharding": "fully_reshardable" if fully_reshardable else "dp_reshardable",
                                             "tp": 1, "pp": 1}
        if fully_reshardable:  # a full disk at each of the files and folders the trainer writes itself
            import errno
            from pathlib import Path

            save, mkdir, part = torch.save, Path.mkdir, tmp_path / ".tmp_iter_0000002"

            def full_disk(obj, path, *args, **kwargs):  # torch.save reports it as RuntimeError
                if isinstance(path, (str, os.PathLike)) and os.path.basename(path) == full.name:
                    raise RuntimeError("basic_ios::clear: iostream error")
                return save(obj, path, *args, **kwargs)

            def full_disk_folder(path, *args, **kwargs):
                if path == full:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return mkdir(path, *args, **kwargs)

            monkeypatch.setattr(torch, "save", full_disk)
            monkeypatch.setattr(Path, "mkdir", full_disk_folder)
            for full, reason in ((part / "rng" / "rank_00000.pt", "basic_ios::clear: iostream error"),
                                 (part / "train_state.pt", "basic_ios::clear: iostream error"),
                                 (part / "rng", "No space left on device"),
                                 (part / "optimizer", "No space left on device")):
                with pytest.raises(UserInputError) as error:
                    save_training_checkpoint(tmp_path, 2, student=model, student_info=info, optimizer=optimizer,
                                             train_state={"iteration": 2}, fully_reshardable=True)
                assert str(error.value) == f"{full}: cannot write the checkpoint ({reason}); the latest one stays"
                assert read_train_state(tmp_path)["iteration"] == 1
            monkeypatch.setattr(torch, "save", save)
            monkeypatch.setattr(Path, "mkdir", mkdir)
        if not fully_reshardable:
            model, _, _, optimizer, _ = build(bucket_size=20000)
            with pytest.raises(UserInputError, match=r"was saved from other gradient buckets \(\(bucket, size\) "
                                                     r"\[\('0', \d+\)\], here \[\('0', \d+\), \('1', \d+\)"):
                load_training_checkpoint(tmp_path, state, student=model, optimizer=optimizer)
        model, _, _, optimizer, dist_opt = build()
        if fully_reshardable:  # a checkpoint of an earlier version records no format: it was fully reshardable
            del state["optimizer_format"]
        load_training_checkpoint(tmp_path, state, student=model, optimizer=optimizer)
        for before, after in zip(saved, adam_state(dist_opt), strict=True):
            for x, y in zip(before, after, strict=True):
                torch.testing.assert_close(y, x, rtol=0, atol=0)
    finally:
        distributed.destroy()


def test_the_teacher_origin_of_a_preset_names_its_flag():
    """A preset model has no checkpoint to fingerprint: its name stands for it (random init from --seed)."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.resume import teacher_origin
    from megatron_renio.training.components import resolve_model

    student = resolve_model(None, "tiny-qwen3", "--student-load/--model")
    assert teacher_origin(TrainConfig(model="tiny-qwen3"), student, None) == {
        "flag": "--model", "source": "tiny-qwen3 at TP 1, PP 1", "identity": "preset tiny-qwen3 at TP 1, PP 1"}
    teacher = resolve_model(None, "tiny-qwen3-untied", "--teacher-load/--teacher-model")
    cfg = TrainConfig(model="tiny-qwen3", mode="opd", teacher="separate", teacher_model="tiny-qwen3-untied",
                      pipeline_model_parallel_size=2)  # random initialisation depends on the layout
    assert teacher_origin(cfg, student, teacher)["identity"] == "preset tiny-qwen3-untied at TP 1, PP 2"
    assert teacher_origin(TrainConfig(model="tiny-qwen3", teacher="ema"), student, None) is None


def test_a_model_with_non_finite_weights_is_not_saved(tmp_path):
    """save_model_checkpoint refuses before writing anything (a run whose update overflowed saved an
    all-inf model with exit 0); the refusal names the parameter."""
    from megatron_renio import distributed
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.checkpoint import save_model_checkpoint
    from megatron_renio.models.presets import get_preset

    distributed.initialize(ParallelConfig(), seed=0)
    try:
        model, info = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
        with torch.no_grad():
            model.decoder.final_layernorm.weight[0] = float("inf")
        with pytest.raises(UserInputError, match=f"^the model holds non-finite weights \\(parameter "
                                                 f"decoder.final_layernorm.weight\\); not saved to {tmp_path / 'out'}$"):
            save_model_checkpoint(model, info, tmp_path / "out")
    finally:
        distributed.destroy()
    assert list(tmp_path.iterdir()) == []


def test_metrics_and_samples_write_non_finite_values_as_null(tmp_path):
    """NaN, inf and -inf become null in both JSONL files (json.loads with a strict parser accepts them)."""
    import json
    from types import SimpleNamespace

    from megatron_renio.config import TrainConfig
    from megatron_renio.training.run_logs import save_samples, standard_json

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))

    values = {"nan": float("nan"), "inf": float("inf"), "minus": float("-inf"), "ok": 1.5, "flag": True}
    assert strict(json.dumps(standard_json(values))) == {"nan": None, "inf": None, "minus": None, "ok": 1.5,
                                                          "flag": True}
    path = tmp_path / "samples_rank0.jsonl"
    per_sample = {"weights": torch.tensor([float("nan")]), "raw_weights": torch.tensor([float("inf")]),
                  "per_sample_loss": torch.tensor([float("-inf")])}
    save_samples(path, 3, 0, [0], [[1, 2]], per_sample, SimpleNamespace(decode=lambda ids: "x"),
                 SimpleNamespace(answers=[None], sources=["data.jsonl:1"]), TrainConfig())
    (record,) = [strict(line) for line in path.read_text().splitlines()]
    assert (record["weight"], record["raw_weight"], record["sample_loss"]) == (None, None, None)
    assert record["source"] == "data.jsonl:1"


def test_pipeline_outputs_are_deallocated_as_in_megatron_lm():
    """A stage's output keeps only a placeholder until its backward (memory under PP; on the CPU nothing
    else shows it)."""
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import transformer_config
    from megatron_renio.models.presets import get_preset

    assert transformer_config(get_preset("tiny-qwen3"), ParallelConfig(), "fp32").deallocate_pipeline_outputs


def test_model_flags_reach_megatron(tmp_path):
    """--recompute-* reach the student's TransformerConfig through build_model, and
    --overlap-grad-reduce the DDP config; sft takes the same flags."""
    from megatron_renio import distributed
    from megatron_renio.config import TrainConfig
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.sft import parse_sft_args
    from megatron_renio.training import components as C

    source = C.resolve_model(None, "tiny-qwen3", "--model")
    cases = [(TrainConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
              ("full", "block", 2)),
             (TrainConfig(recompute_granularity="selective", recompute_method="block", recompute_num_layers=2),
              ("selective", None, None)),
             (TrainConfig(), (None, None, None))]
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        for cfg, expected in cases:
            model, _ = C.build_model(source, cfg)
            config = model.config
            assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == expected
        assert C.wrap_ddp(model, False, True).ddp_config.overlap_grad_reduce
        assert not C.wrap_ddp(C.build_model(source, TrainConfig())[0], False).ddp_config.overlap_grad_reduce
    finally:
        distributed.destroy()
    data = tmp_path / "d.jsonl"
    sft = parse_sft_args(["--data-path", str(data), "--model", "tiny-qwen3", "--save", str(tmp_path / "out"),
                          "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers",
                          "3", "--overlap-grad-reduce"]).train
    assert (sft.recompute_granularity, sft.recompute_method, sft.recompute_num_layers, sft.overlap_grad_reduce) == (
        "full", "block", 3, True)


def test_kd_top_k_beyond_the_shared_vocabulary_is_refused_before_building():
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import paired_vocab

    student, teacher = get_preset("tiny-qwen3").replace(vocab_size=200), get_preset("tiny-qwen3")
    assert paired_vocab(TrainConfig(kd_top_k=200), student, teacher)[1] == 200
    with pytest.raises(UserInputError, match=r"^--kd-top-k 201 exceeds the vocabulary that both models hold \(200\)$"):
        paired_vocab(TrainConfig(kd_top_k=201), student, teacher)


def test_an_unreadable_teacher_checkpoint_is_one_line_on_every_rank(tmp_path):
    """Rank 0 fingerprints and broadcasts what it found, an error included (the others would wait)."""
    from megatron_renio import distributed
    from megatron_renio.config import TrainConfig
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.resume import teacher_origin
    from megatron_renio.training.components import ModelSource

    source = ModelSource(get_preset("tiny-qwen3"), tmp_path / "gone", None)
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        with pytest.raises(UserInputError, match=f"^--student-load {tmp_path / 'gone'}: cannot read it to fingerprint"):
            teacher_origin(TrainConfig(student_load=str(tmp_path / "gone")), source, None)
    finally:
        distributed.destroy()


def test_recompute_layers_must_fit_a_stage():
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import check_recompute

    preset = get_preset("tiny-qwen3")  # 2 layers
    for fits in (dict(recompute_num_layers=2), dict(recompute_num_layers=1, pipeline_model_parallel_size=2),
                 dict(recompute_method="block", recompute_num_layers=2), dict(recompute_num_layers=3,
                                                                             recompute_granularity="selective")):
        check_recompute(TrainConfig(**{"recompute_granularity": "full", **fits}), preset)
    for bad, message in ((dict(recompute_num_layers=3), "must divide the 2 layers"),  # an IndexError at step 1
                         (dict(recompute_num_layers=2, pipeline_model_parallel_size=2), "must divide the 1 layers"),
                         (dict(recompute_method="block", recompute_num_layers=3), "must be at most the 2 layers")):
        with pytest.raises(UserInputError, match=f"^--recompute-num-layers {bad['recompute_num_layers']} {message}"):
            check_recompute(TrainConfig(recompute_granularity="full", **bad), preset)


def test_a_new_run_does_not_append_to_an_earlier_runs_logs(tmp_path):
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.run_logs import check_new_run_logs

    save = tmp_path / "run"
    save.mkdir()
    (save / "metrics.jsonl").write_text("")
    check_new_run_logs(TrainConfig(save=str(save)))  # empty: nothing to mix
    (save / "samples_rank0.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserInputError, match=f"{save / 'samples_rank0.jsonl'} holds records of an earlier run; pass "
                                             f"--load {save} to continue that run, or remove it or choose another "
                                             "--save, or pass --override-save"):
        check_new_run_logs(TrainConfig(save=str(save)))
    check_new_run_logs(TrainConfig(save=str(save), override_save=True))  # started over: emptied
    other = tmp_path / "metrics.jsonl"
    other.write_text('{"step": 1}\n')
    with pytest.raises(UserInputError, match=f"^{other} holds records of an earlier run; remove it or choose another "
                                             "--metrics-file$"):
        check_new_run_logs(TrainConfig(save=str(save), override_save=True, metrics_file=str(other)))


def test_a_requeue_without_a_checkpoint_trims_only_the_logs_its_run_claimed(tmp_path):
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.run_logs import CLAIMED_LOGS_FILE, check_new_run_logs, claim_logs

    save, ours, theirs = tmp_path / "run", tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    first = TrainConfig(save=str(save), load=str(save), metrics_file=str(ours))
    check_new_run_logs(first, requeued=True)  # the first launch: nothing logged yet
    claim_logs(first)
    ours.write_text('{"step": 1}\n')  # then killed before its first checkpoint
    (save / "samples_rank0.jsonl").write_text('{"step": 1}\n')
    check_new_run_logs(first, requeued=True)  # the requeue may drop the steps it takes again
    theirs.write_text('{"step": 7}\n')
    with pytest.raises(UserInputError, match=f"^{theirs} holds records of an earlier run; remove it or choose another "
                                             "--metrics-file$"):
        check_new_run_logs(dataclasses.replace(first, metrics_file=str(theirs)), requeued=True)
    with pytest.raises(UserInputError, match=f"^{ours} holds records of an earlier run"):
        check_new_run_logs(dataclasses.replace(first, save=str(tmp_path / "other_run")), requeued=True)
    with pytest.raises(UserInputError, match=f"^{save / 'samples_rank0.jsonl'} holds records of an earlier run; pass "
                                             f"--load {save}"):
        check_new_run_logs(dataclasses.replace(first, load=None, metrics_file=None))  # a new run in a used folder
    (save / CLAIMED_LOGS_FILE).write_text('{"metrics": 1}\n')
    with pytest.raises(UserInputError, match=f"^{save / CLAIMED_LOGS_FILE}: not this trainer's record of the run's "
                                             r"logs \(not a list of paths\); remove it to go on$"):
        check_new_run_logs(first, requeued=True)

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(
            UserInputError, match=f"^{save / CLAIMED_LOGS_FILE}: cannot read it \\(Permission denied\\)$"):
        patch.setattr(type(save), "read_text", unreadable)
        check_new_run_logs(first, requeued=True)


def test_a_model_inside_the_save_folders_checkpoints_is_refused(tmp_path):
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import check_save_target

    save = tmp_path / "run"
    (save / "iter_0000004").mkdir(parents=True)
    (save / "init").mkdir()
    for flag, key in (("--student-load", "student_load"), ("--teacher-load", "teacher_load")):
        for override in (False, True):  # --override-save deleted it at the first save
            with pytest.raises(UserInputError, match=f"{flag} {save / 'iter_0000004'} lies inside --save {save}, "
                                                     "whose iter_\\* folders the run's saves prune"):
                check_save_target(TrainConfig(save=str(save), override_save=override,
                                              **{key: str(save / "iter_0000004")}), get_preset("tiny-qwen3"))
    # beside the iter_* folders (which, without a marker, only --override-save accepts): not pruned
    check_save_target(TrainConfig(save=str(save), override_save=True, student_load=str(save / "init")),
                      get_preset("tiny-qwen3"))


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-untied", "tiny-qwen2", "tiny-llama3"])
def test_forward_flops_match_a_flop_count_of_the_hf_model(name):
    """forward_flops_per_position against torch's FLOP counter on the transformers model of the same
    preset (eager attention: the full S x S scores and values, twice the causal half counted here);
    tied and untied output layers, QKV biases."""
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_renio.models.presets import get_preset, hf_config_dict
    from megatron_renio.training.components import forward_flops_per_position

    preset, seq = get_preset(name), 64
    fields = hf_config_dict(preset, "float32")
    config = transformers.AutoConfig.for_model(fields.pop("model_type"),
                                               **{k: v for k, v in fields.items() if k != "architectures"})
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, seq, dtype=torch.long))
    full_attention_extra = 2 * preset.num_layers * seq * preset.num_attention_heads * preset.head_dim
    counted = counter.get_total_flops() / seq - full_attention_extra
    assert forward_flops_per_position(preset, seq) == pytest.approx(counted, rel=0.01)

def test_untrained_positions_note_names_the_role_and_limit(capsys):
    """train, sft, score and eval share the note; it is silent up to max_position_embeddings."""
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import note_untrained_positions

    preset = get_preset("tiny-qwen3")
    limit = preset.max_position_embeddings
    note_untrained_positions(limit, "model", preset)
    assert capsys.readouterr().out == ""
    note_untrained_positions(limit + 1, "model", preset)
    assert capsys.readouterr().out == (f"note: --seq-length {limit + 1} exceeds the model's max_position_embeddings "
                                       f"({limit}); positions beyond it were not trained\n")


def test_local_attention_memory_is_noted_on_a_gpu_without_te(capsys):
    from megatron_renio.config import TrainConfig
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import note_local_attention_memory

    qwen = get_preset("qwen3-8b")  # 32 heads, 36 layers
    cfg = TrainConfig(seq_length=8192, tensor_model_parallel_size=2, bf16=True)
    note_local_attention_memory(cfg, qwen, gpu_without_te=True)
    assert capsys.readouterr().out == (  # 1 x 16 heads x 8192^2 x 2 bytes
        "note: without transformer-engine the attention keeps [micro-batch, heads, s, s] probabilities for backward: "
        "2.1 GB per layer at --seq-length 8192 (36 layers); install transformer-engine or pass "
        "--recompute-granularity selective\n")
    for quiet in (dict(cfg=cfg, gpu_without_te=False), dict(cfg=TrainConfig(seq_length=4096, bf16=True,
                                                                            tensor_model_parallel_size=8),
                                                            gpu_without_te=True),
                  dict(cfg=TrainConfig(seq_length=8192, recompute_granularity="selective"), gpu_without_te=True)):
        note_local_attention_memory(quiet["cfg"], qwen, gpu_without_te=quiet["gpu_without_te"])
        assert capsys.readouterr().out == "", quiet


def test_renio_settings_without_effect_are_noted():
    from megatron_renio.config import TrainConfig
    from megatron_renio.train import _renio_notes

    for norm in ("batch_mean", "clamp"):
        assert _renio_notes(TrainConfig(renio=True, renio_norm=norm))[0].startswith(
            f"with --renio-scope local, --renio-norm {norm} and --micro-batch-size 1 every ReNIO weight is 1")
    # defaults c = 2.5, tau = 0.8, gamma = 1: at most 16 e^2.5 / (e^2.5 + 15) = 7.171 times the mean
    assert _renio_notes(TrainConfig(renio=True, renio_scope="global", micro_batch_size=16)) == [
        "--renio-max-weight 10 cannot bind with --micro-batch-size 16: a weight is at most 7.171 times its "
        "micro-batch's mean here (one sample at exp(clip / temperature), the others at their smallest weight)"]
    assert _renio_notes(TrainConfig(renio=True, micro_batch_size=4, renio_max_weight=3.21))  # bound 3.2096
    for quiet in (dict(renio=False), dict(renio=True, micro_batch_size=64), dict(renio=True, renio_norm="ema"),
                  dict(renio=True, micro_batch_size=4, renio_max_weight=3.2),
                  dict(renio=True, renio_norm="clamp", micro_batch_size=4),
                  dict(renio=True, micro_batch_size=16, renio_threshold=-1.0)):  # others as low as e^-1: 11.0
        assert _renio_notes(TrainConfig(**quiet)) == [], quiet


def test_console_progress_is_a_bar_on_a_terminal_and_lines_in_a_log_file(capsys, monkeypatch):
    from megatron_renio.training.run_logs import ConsoleProgress, norm_text

    progress = ConsoleProgress("train", 5, 1, log_interval=2)  # pytest's captured streams: no terminal
    for iteration in (2, 3, 4, 5):
        progress.update(iteration, {"loss": "0.5", "grad norm": norm_text(None if iteration == 4 else 1.25)})
    progress.close()
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "train iteration 2/5 | loss 0.5 | grad norm 1.25", "train iteration 4/5 | loss 0.5 | grad norm -",
        "train iteration 5/5 | loss 0.5 | grad norm 1.25"] and out.err == ""  # every 2nd, and the last
    with pytest.raises(ZeroDivisionError), ConsoleProgress("train", 5, 1, log_interval=2, terminal=True) as progress:
        progress.update(2, {"loss": "0.5"})
        1 / 0  # a failing step still closes the bar: the terminal goes on on a fresh line
    out = capsys.readouterr()
    assert out.out == "" and "2/5" in out.err and "loss=0.5" in out.err and out.err.endswith("\n")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)  # `train > log` from a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress = ConsoleProgress("train", 2, 0, log_interval=1)
    progress.update(1, {"loss": "0.5"})
    progress.close()
    out = capsys.readouterr()
    assert out.out == "train iteration 1/2 | loss 0.5\n" and out.err == ""


def test_settings_that_other_flags_leave_without_effect_are_noted():
    """A setting changed from its default that the other flags make inert: one note per reason, naming
    the flags; the same setting where it acts, or at its default, gives none."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.config import inert_notes

    assert inert_notes(TrainConfig(renio_norm="ema", renio_clip=3.0, renio_scope="global", ema_decay=0.9,
                                    min_lr=1e-7, lr_decay_iters=5, loss="sampled_rkl", kd_top_k=5)) == [
        "--renio-clip, --renio-norm have no effect on the loss without --renio (clip and threshold still shape "
        "the logged pivotal statistics)",
        "--ema-decay has no effect without --teacher ema",
        "--min-lr, --lr-decay-iters have no effect with --lr-decay-style constant",
        "--kd-top-k has no effect with --loss sampled_rkl (its loss reads only the sampled tokens' log-probs)"]
    assert inert_notes(TrainConfig(loss="sampled_rkl", kd_token_clip=None)) == [
        "--kd-token-clip has no effect with --loss sampled_rkl (its loss reads only the sampled tokens' log-probs)"]
    for norm in ("clamp", "none"):  # a cap of 1.5 left weights of 3.75 without a word
        assert inert_notes(TrainConfig(renio=True, renio_norm=norm, renio_max_weight=1.5)) == [
            "--renio-max-weight has no effect with --renio-norm clamp or none (the cap bounds the weights of "
            "batch_mean and ema)"]
    for quiet in (dict(), dict(renio=True, renio_norm="ema", renio_clip=3.0), dict(renio_scope="global"),
                  dict(renio=True, renio_max_weight=1.5), dict(renio=True, renio_norm="ema", renio_max_weight=1.5),
                  dict(teacher="ema", ema_decay=0.9), dict(lr_decay_style="cosine", min_lr=1e-7, lr_decay_iters=5),
                  dict(loss="sampled_rkl"), dict(kd_top_k=5, kd_token_clip=None)):
        assert inert_notes(TrainConfig(**quiet)) == [], quiet


def test_sampled_rkl_trains_on_the_full_vocabulary_divergence_terms_without_clip_or_top_k():
    """Its loss reads only the log-probs, which --kd-token-clip and --kd-top-k do not change: training
    computes them without either (no unfused top-k path); score, which reports the divergence, keeps them."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.training import components as C

    cfg = TrainConfig(loss="sampled_rkl", kd_top_k=5, kd_token_clip=0.01)
    trained, scored = C.loss_settings(cfg, training=True).divergence, C.loss_settings(cfg).divergence
    assert (trained.token_clip, trained.top_k, scored.token_clip, scored.top_k) == (None, None, 0.01, 5)
    kept = C.loss_settings(TrainConfig(kd_top_k=5, kd_token_clip=0.01), training=True).divergence
    assert (kept.token_clip, kept.top_k) == (0.01, 5)


def test_a_save_interval_without_a_save_folder_is_noted():
    from megatron_renio.config import TrainConfig
    from megatron_renio.train import _save_notes

    assert _save_notes(TrainConfig(save_interval=10)) == ["--save-interval 10 without --save: no checkpoint is written"]
    assert _save_notes(TrainConfig(save_interval=10, save="runs/x")) == _save_notes(TrainConfig()) == []


def test_a_tokenizer_flag_keeps_the_models_stop_ids(tmp_path):
    """--tokenizer replaces the student checkpoint's tokenizer, not the EOS ids of the model's own
    generation_config.json: generation stops on both."""
    import json

    from megatron_renio.config import TrainConfig
    from megatron_renio.data.arithmetic_task import build_char_tokenizer
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import ModelSource, load_run_tokenizer

    tok = build_char_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "model_tokenizer").mkdir()
    config = tmp_path / "model_tokenizer" / "generation_config.json"
    config.write_text(json.dumps({"eos_token_id": [1, 5]}))
    source = ModelSource(get_preset("tiny-qwen3"), tmp_path, None, config)
    assert load_run_tokenizer(TrainConfig(tokenizer=tok), source, None).stop_ids == (1, 5)
    assert load_run_tokenizer(TrainConfig(tokenizer=tok), ModelSource(get_preset("tiny-qwen3"), None, None),
                              None).stop_ids == (1,)


def test_the_step_hands_the_loss_implementation_to_the_fused_loss(monkeypatch):
    """--loss-impl chunked must not run the Triton kernels on a GPU: the step passes it on."""
    from types import SimpleNamespace

    from megatron_renio.losses.divergence import DivergenceConfig
    from megatron_renio.training import step

    seen = []
    monkeypatch.setattr(step, "fused_token_terms", lambda *args, **kwargs: seen.append(kwargs["impl"]))
    grid = SimpleNamespace(gather_index=torch.zeros(1, 2, dtype=torch.long))
    batch = SimpleNamespace(completion_ids=torch.zeros(1, 2, dtype=torch.long), completion_mask=torch.ones(1, 2),
                            student=grid, teacher=grid)
    output = SimpleNamespace(student_logits=torch.zeros(1, 3, 8), teacher_logits=torch.zeros(1, 3, 8))
    for impl in ("chunked", "triton", "auto"):
        runner = SimpleNamespace(settings=SimpleNamespace(impl=impl, divergence=DivergenceConfig("forward_kl")),
                                 true_vocab_size=8,
                                 tp_group=None, _inject_nonfinite=False)
        step.DistillationStep._token_terms(runner, batch, output)
    assert seen == ["chunked", "triton", "auto"]


def test_a_global_batch_splits_into_micro_batches_per_replica():
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.components import samples_per_replica

    assert samples_per_replica(TrainConfig(global_batch_size=4, micro_batch_size=2), 2) == 2
    for gbs, mbs in ((2, 2), (3, 1)):  # fine at DP 1 (config.validate), not at DP 2
        with pytest.raises(UserInputError, match=f"^--global-batch-size {gbs} is not divisible by --micro-batch-size "
                                                 f"{mbs} x data-parallel size 2$"):
            samples_per_replica(TrainConfig(global_batch_size=gbs, micro_batch_size=mbs), 2)


def test_the_loss_implementation_flag_reaches_the_loss_settings_and_triton_needs_a_gpu(monkeypatch):
    from megatron_renio.config import TrainConfig, check_loss_impl_here, parse_train_args
    from megatron_renio.losses import fused_triton
    from megatron_renio.training import components as C

    assert [C.loss_settings(TrainConfig(loss_impl=impl)).impl for impl in ("auto", "chunked", "unfused")] == \
        ["auto", "chunked", "unfused"]
    assert [C.loss_settings(TrainConfig(loss=loss)).divergence.kind for loss in ("sampled_rkl", "jsd", "forward_kl")] \
        == ["reverse_kl", "jsd", "forward_kl"]  # sampled_rkl computes the reverse KL's terms (score reports D)
    # with the flags (parse_train_args, score's parse_args): each node's first rank prints it, not every rank
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserInputError, match=r"^--loss-impl triton needs a GPU and the triton package \(here: no GPU"):
        parse_train_args(["--model", "tiny-qwen3", "--data-path", "d.jsonl", "--loss-impl", "triton"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fused_triton, "triton", None)
    with pytest.raises(UserInputError, match=r"\(here: a GPU, triton missing\)"):
        check_loss_impl_here(TrainConfig(loss_impl="triton"))


def test_loss_settings_with_a_cost_or_a_bias_are_noted():
    from megatron_renio.config import TrainConfig
    from megatron_renio.train import _loss_notes

    assert _loss_notes(TrainConfig(loss="sampled_rkl", rollout_temperature=1.0, rollout_top_p=0.9,
                                   rollout_top_k=20)) == [
        "--loss sampled_rkl with --rollout-temperature 1 (--kd-temperature 1.1), --rollout-top-p 0.9, --rollout-top-k "
        "20: completions are not sampled from the distribution the loss compares, so the sampled-token loss is a "
        "biased estimate of the reverse KL"]
    assert _loss_notes(TrainConfig(loss="sampled_rkl", rollout_top_k=5))[0].startswith(
        "--loss sampled_rkl with --rollout-top-k 5: ")
    assert _loss_notes(TrainConfig(kd_top_k=8)) == [
        "--kd-top-k 8 is not fused: the loss gathers full-vocabulary copies of the completion rows (more time and "
        "memory than without it)"]
    # --loss jsd without --kd-beta trained on exactly the forward KL without a word
    assert _loss_notes(TrainConfig(loss="jsd")) == [
        "--loss jsd with --kd-beta 0 is the --loss forward_kl (the mixture is one of the two models); pass --kd-beta "
        "between 0 and 1 (0.5: the symmetric JSD) to mix them"]
    assert _loss_notes(TrainConfig(loss="jsd", kd_beta=1.0))[0].startswith("--loss jsd with --kd-beta 1 is the --loss "
                                                                           "reverse_kl ")
    for quiet in (dict(loss="sampled_rkl"), dict(loss="sampled_rkl", kd_top_k=8),  # not computed (inert_notes)
                  dict(rollout_temperature=1.0, rollout_top_p=0.5), dict(loss="jsd", kd_beta=0.5)):
        assert _loss_notes(TrainConfig(**quiet)) == [], quiet


def test_step_counts_sum_over_replicas_and_take_the_slowest_rollout(tmp_path):
    """Counts are sums over the DP replicas, the longest completion and the rollout time their maxima
    (the step waits for the slowest replica's rollout: throughput divides by that time)."""
    results = run_torchrun(REPO_ROOT / "tests" / "workers" / "step_counts_worker.py", 2, tmp_path)
    assert [r.pop("finite") for r in results] == [[True, False, False]] * 2
    assert results[0] == results[1] == {"completions": 5.0, "length_sum": 17.0, "cut": 2.0, "generated": 17.0,
                                        "positions": 30.0, "flops": 300.0, "longest": 8.0, "rollout_seconds": 4.0}


def test_a_gradient_whose_norm_overflows_float32_is_not_finite():
    """An entry of 3e19 keeps the buffer's sum finite but overflows the float32 sum of squares that
    Megatron's gradient norm is: with it the clipped gradient is 0 and Adam would still move the
    weights by its momentum, so the step must be skipped before the optimizer, as for inf and NaN.
    The squares add up over buffers (and ranks), as the norm's do."""
    from types import SimpleNamespace

    from megatron_renio.training.components import gradients_are_finite

    def ddp(*buffers):
        return SimpleNamespace(buffers=[SimpleNamespace(grad_data=torch.tensor(values, dtype=torch.float32))
                                        for values in buffers], expert_parallel_buffers=[])

    assert gradients_are_finite(ddp([1.0, -2.0, 1e18]))
    for bad in (3e19, float("inf"), float("nan")):
        assert not gradients_are_finite(ddp([1.0, bad])), bad
    # each buffer's sum of squares is finite (2.25e38), Megatron's norm over both is not
    assert gradients_are_finite(ddp([1.5e19])) and not gradients_are_finite(ddp([1.5e19], [1.5e19]))


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                          ("NVIDIA H200 NVL", 835.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_mfu_peak_by_device_name(name, tflops, monkeypatch):
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.components import peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops(TrainConfig(bf16=True)) == (None if tflops is None else tflops * 1e12)
    assert peak_flops(TrainConfig(bf16=True, peak_tflops=100.0)) == 100e12


def test_chat_template_kwargs_reach_the_prompts_of_the_run(tmp_path):
    """--chat-template-kwargs: the run's tokenizer renders the student and teacher prompts with those
    variables; a tokenizer without a chat template is refused in one line naming the flag."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.data.prompts import PromptRecord
    from transformers import AutoTokenizer

    from megatron_renio.data.templates import build_prompt_ids, build_prompt_text
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import ModelSource, load_run_tokenizer
    from tests.test_data_tokenizer import THINKING_TEMPLATE, _save_hf_tokenizer

    folder = _save_hf_tokenizer(tmp_path / "tok", chat_template=THINKING_TEMPLATE)
    source = ModelSource(get_preset("tiny-qwen3"), None, None)
    record = PromptRecord(problem="the sum of two numbers", solution="3", answer="3", source="p.jsonl line 1")
    kwargs = '{"enable_thinking": false}'
    for mode in ("opd", "opsd"):
        cfg = TrainConfig(tokenizer=folder, chat_template_kwargs=kwargs, mode=mode)
        tokenizer = load_run_tokenizer(cfg, source, None)
        for role in ("student", "teacher"):
            text = AutoTokenizer.from_pretrained(folder).apply_chat_template(
                [{"role": "user", "content": build_prompt_text(record, "math", role, mode)}], tokenize=False,
                add_generation_prompt=True, enable_thinking=False)
            assert text.endswith("assistant: <think></think>")
            assert build_prompt_ids(tokenizer, record, "math", role, mode) == tokenizer.encode(text)
    plain = _save_hf_tokenizer(tmp_path / "plain")
    with pytest.raises(UserInputError, match=f"^--chat-template-kwargs: tokenizer {plain} has no chat template"):
        load_run_tokenizer(TrainConfig(tokenizer=plain, chat_template_kwargs=kwargs), source, None)
    load_run_tokenizer(TrainConfig(tokenizer=plain, chat_template_kwargs="{}"), source, None)  # sets nothing
