"""The CPU quickstart: OPD, OPSD and ReNIO end to end on a built-in arithmetic task.

    megatron-renio quickstart [--out DIR] [--quick] [--tp 2] [--nproc 1|2] [--seed N]
    python -m megatron_renio.quickstart ...

No downloads; every model is a real Megatron-Core ``GPTModel`` trained by this project's own entry
points, each launched here with ``torchrun`` (``--nproc`` processes, tensor parallelism ``--tp``,
data parallelism the rest):

1. **Task.** Seeded multi-step arithmetic problems with worked solutions ending in ``\\boxed{}``
   (:mod:`megatron_renio.data.arithmetic_task`), disjoint train / test splits, and a BPE tokenizer
   trained on them (:func:`train_task_tokenizer`) saved as a Hugging Face tokenizer folder.
2. **Teacher and student** by supervised fine-tuning (``python -m megatron_renio.sft``) of the
   same small architecture (preset ``quickstart``): the teacher trained long enough to solve most
   problems, the student briefly. The student also sees some OPSD teacher prompts (problem + worked
   solution + transition) during SFT, so that it can use a worked solution in its context the way
   an OPSD teacher (the initial student given the solution) must.
3. **Four distillation runs** (``python -m megatron_renio.train``) from the same student with the
   same seed, data order and number of steps: OPD (the SFT teacher), OPD + ReNIO, OPSD (teacher =
   the initial student given the worked solution), OPSD + ReNIO. Each saves checkpoints at a few
   intermediate steps and every training sample (completion, ReNIO weight, grade).
4. **Evaluation** on the held-out split, in this process (TP=1): avg@k accuracy with the project's
   grader (:func:`megatron_renio.eval.math_grader.grade_math`) and the mean completion length, for
   the teacher, the initial student and every saved checkpoint.

Output in ``--out`` (default ``quickstart_out``): ``summary.json``, ``accuracy.png`` (held-out
accuracy vs step per method), ``weights.png`` (distribution of ReNIO weights),
``weight_vs_correctness.png`` (ReNIO weight of correct vs incorrect sampled completions), the
data, the models, every run's metrics / samples / checkpoints and one log per launch under
``logs/``. A table is printed at the end. ``--out`` must be empty, absent, or the output of an
earlier quickstart (which is then replaced). Sizes: :data:`FULL` (under 15 minutes on 2 cores)
and :data:`QUICK` (``--quick``, 3-5 minutes on 2 cores, a smoke test whose numbers mean little).
Everything is seeded: on the same machine the same seed gives the same numbers. It runs on the CPU
also where GPUs are present (it hides them with ``CUDA_VISIBLE_DEVICES=``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from megatron_renio.config import MAX_SEED, _OneLineErrorParser, path_arg
from megatron_renio.data.arithmetic_task import Difficulty
from megatron_renio.errors import UserInputError
from megatron_renio.output_paths import check_output_folder, is_empty_folder

MARKER = ".megatron_renio_quickstart"
# torchrun's variables: the quickstart drops the shell's (``run``); torchrun sets them for its launches.
_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class SFTPlan:
    """One supervised fine-tuning launch."""

    preset: str
    iters: int
    lr: float
    batch: int = 32
    privileged_prompt_fraction: float = 0.3


@dataclass(frozen=True)
class Plan:
    """The sizes of one quickstart run."""

    difficulty: Difficulty
    num_train: int
    num_test: int
    teacher: SFTPlan
    student: SFTPlan
    distill_iters: int
    distill_batch: int
    distill_lr: float
    eval_points: int  # held-out evaluations per method after step 0 (evenly spaced, the last at the end)
    eval_samples: int  # k of avg@k
    eval_temperature: float = 0.7
    max_new_tokens: int = 40
    seq_length: int = 160
    extra_train_flags: tuple[str, ...] = ()


# Distillation settings of every run: rollouts and loss at temperature 1 and no per-entry divergence
# clip (at the reference's 1.1 and 0.05 these small students degraded), a short warmup.
_DISTILL_FLAGS = ("--rollout-temperature", "1.0", "--kd-temperature", "1.0", "--kd-token-clip", "none",
                  "--lr-warmup-iters", "5")
FULL = Plan(
    difficulty=Difficulty(min_ops=1, max_ops=2, min_operand=1, max_operand=5),
    num_train=1000, num_test=128,
    teacher=SFTPlan("quickstart", iters=800, lr=3e-3, privileged_prompt_fraction=0.0),
    student=SFTPlan("quickstart", iters=150, lr=3e-3),
    distill_iters=200, distill_batch=32, distill_lr=1e-3, eval_points=4, eval_samples=2,
    extra_train_flags=_DISTILL_FLAGS,
)
QUICK = Plan(
    difficulty=Difficulty(min_ops=1, max_ops=2, min_operand=1, max_operand=3),
    num_train=200, num_test=48,
    teacher=SFTPlan("quickstart", iters=200, lr=3e-3, privileged_prompt_fraction=0.0),
    student=SFTPlan("quickstart", iters=40, lr=3e-3),
    distill_iters=8, distill_batch=32, distill_lr=1e-3, eval_points=1, eval_samples=2,
    extra_train_flags=_DISTILL_FLAGS,
)


@dataclass(frozen=True)
class Method:
    """One distillation run: its name (folder, JSON key), label and trainer flags."""

    name: str
    label: str
    renio: bool
    opd: bool

    def flags(self, teacher_dir: Path) -> list[str]:
        teacher = ["--mode", "opd", "--teacher", "separate", "--teacher-load", str(teacher_dir)] if self.opd else \
            ["--mode", "opsd", "--teacher", "fixed"]
        return teacher + (["--renio"] if self.renio else [])


METHODS = (
    Method("opd", "OPD", renio=False, opd=True),
    Method("opd_renio", "OPD + ReNIO", renio=True, opd=True),
    Method("opsd", "OPSD", renio=False, opd=False),
    Method("opsd_renio", "OPSD + ReNIO", renio=True, opd=False),
)


# -- launching ---------------------------------------------------------------------------------
@dataclass
class Launcher:
    """Runs the project's entry points under torchrun with a progress bar fed by their metrics."""

    nproc: int
    logs: Path

    def run(self, name: str, module: str, args: list[str], metrics_file: Path, total: int) -> float:
        """``torchrun --nproc-per-node N -m module args``; output goes to ``logs/<name>.log`` and the
        bar follows the step count of ``metrics_file``. Returns the wall time. A failed launch prints
        the end of its log on stderr and raises :class:`UserInputError` naming the log."""
        from tqdm import tqdm

        from megatron_renio.distributed import _free_port

        log_path = self.logs / f"{name}.log"
        env = dict(os.environ)  # without the shell's launcher variables (``run``)
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", module, *args]
        started = time.perf_counter()
        with open(log_path, "w") as log, tqdm(total=total, desc=f"{name:<12}", dynamic_ncols=True, leave=True) as bar:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    _follow(bar, metrics_file)
                _follow(bar, metrics_file)
            finally:  # whatever stops the quickstart stops its launch (no orphaned torchrun training on)
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        if proc.returncode != 0:
            print("".join(log_path.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
            raise UserInputError(f"{name} failed (exit code {proc.returncode}); its output is in {log_path}")
        return time.perf_counter() - started


def _follow(bar, metrics_file: Path) -> None:
    """Advance ``bar`` to the number of steps logged in ``metrics_file`` and show the last loss
    (``skipped`` for a step whose loss was not finite, logged as null)."""
    if not metrics_file.is_file():
        return
    lines = metrics_file.read_text().splitlines()
    complete = [line for line in lines if line.endswith("}")]
    if complete:
        loss = json.loads(complete[-1])["loss"]
        bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}", refresh=False)
    bar.update(len(complete) - bar.n)


# -- evaluation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """avg@k accuracy on the held-out split and the mean completion length (tokens, EOS included)."""

    accuracy: float
    mean_length: float


class HeldOutEvaluator:
    """Samples ``k`` completions per held-out problem with a model checkpoint and grades them.

    Runs in this process as a world of one (TP=1, one thread, so that the numbers do not depend on
    the machine's core count); every evaluation uses the same sampling seed."""

    def __init__(self, test_path: Path, tokenizer_dir: Path, plan: Plan, seed: int):
        import torch

        from megatron_renio import distributed
        from megatron_renio.data.prompts import load_prompt_records
        from megatron_renio.data.templates import build_prompt_ids
        from megatron_renio.data.tokenizer import load_tokenizer

        torch.set_num_threads(1)
        distributed.initialize(distributed.ParallelConfig(), seed)
        self.tokenizer = load_tokenizer(str(tokenizer_dir))
        self.records = load_prompt_records(str(test_path))
        self.prompts = [build_prompt_ids(self.tokenizer, r, "math", "student", "opsd") for r in self.records]
        self.plan = plan
        self.seed = seed

    def __call__(self, checkpoint: Path) -> Evaluation:
        from megatron_renio.distributed import ParallelConfig
        from megatron_renio.eval.benchmarks import avg_at_k
        from megatron_renio.eval.math_grader import grade_math
        from megatron_renio.models.builder import build_gpt_model
        from megatron_renio.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata
        from megatron_renio.rollout.generate import generate
        from megatron_renio.rollout.sampling import SamplingConfig

        preset = read_checkpoint_metadata(checkpoint).preset
        model, _ = build_gpt_model(preset, ParallelConfig(), max_sequence_length=self.plan.seq_length)
        with warnings.catch_warnings():  # torch's deprecation notices about dist_checkpointing's loader
            warnings.simplefilter("ignore", FutureWarning)
            load_model_checkpoint(model, checkpoint)
        k = self.plan.eval_samples
        result = generate(
            model, [p for p in self.prompts for _ in range(k)],
            SamplingConfig(temperature=self.plan.eval_temperature, max_new_tokens=self.plan.max_new_tokens),
            eos_id=self.tokenizer.stop_ids, true_vocab_size=preset.vocab_size, seed=self.seed,
            max_sequence_length=self.plan.seq_length,
        )
        grades = [grade_math(self.tokenizer.decode(c), self.records[i // k].answer) for i, c in enumerate(result.completions)]
        return Evaluation(
            accuracy=avg_at_k([grades[i:i + k] for i in range(0, len(grades), k)]),
            mean_length=sum(map(len, result.completions)) / len(result.completions),
        )

    def close(self) -> None:
        from megatron_renio import distributed

        distributed.destroy()


# -- the run -----------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """What one distillation run gave: held-out curve, time, and its training samples' weights."""

    label: str
    curve: list[dict] = field(default_factory=list)  # {"step", "accuracy", "mean_length"}
    time_s: float = 0.0
    train_accuracy: list[float] = field(default_factory=list)  # per step, on the sampled rollouts
    weights: dict = field(default_factory=dict)


def train_task_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 256) -> Path:
    """Train a BPE tokenizer on ``texts`` and save it as a Hugging Face tokenizer folder.

    Input is lowercased; the alphabet is the task's character set
    (:data:`~megatron_renio.data.arithmetic_task.CHARACTERS`, anything else becomes ``<unk>``). The
    pre-tokenizer keeps every digit a token of its own (as the Qwen and Llama tokenizers do) and lets
    merges form words with their leading space and runs of punctuation, so the fixed instruction
    and transition texts of the prompts cost one token per word instead of one per character.
    Special tokens as :func:`~megatron_renio.data.arithmetic_task.build_char_tokenizer`: ``<pad>``
    0, ``<eos>`` 1, ``<bos>`` 2 (prepended to a whole input), ``<unk>`` 3. At most ``vocab_size``
    tokens (fewer when the texts allow fewer merges); the same texts give the same tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_renio.data.arithmetic_task import CHARACTERS, SPECIAL_TOKENS

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d| ?[a-z]+| ?[^\sa-z\d]+|\s+"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=list(CHARACTERS), show_progress=False,
    ))
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    ).save_pretrained(str(out_dir))
    return out_dir


def _task_texts(problems) -> list[str]:
    """What the tokenizer is trained on: every student prompt, OPSD teacher prompt and solution."""
    from megatron_renio.data.prompts import PromptRecord
    from megatron_renio.data.templates import build_prompt_text

    texts = []
    for p in problems:
        record = PromptRecord(p.problem, p.solution, p.answer, "quickstart")
        texts += [build_prompt_text(record, "math", role, "opsd") for role in ("student", "teacher")] + [p.solution]
    return texts


def _prepare_out(out: Path) -> None:
    """``out`` must be absent, empty, or an earlier quickstart's output (emptied then; the folder itself
    stays, so that ``--out .`` inside one works)."""
    check_output_folder(out, f"--out {out}")
    if out.is_dir() and not is_empty_folder(out):
        if not (out / MARKER).is_file():
            raise UserInputError(f"--out {out} is not empty and was not written by the quickstart")
        if out.resolve() in Path.cwd().resolve().parents:  # emptying it would delete the current folder
            raise UserInputError(f"--out {out} holds the current folder; run the quickstart from outside it")
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by megatron_renio.quickstart; re-running it replaces this folder\n")


def _sft_args(sft: SFTPlan, data: Path, tokenizer: Path, save: Path, metrics: Path, plan: Plan, seed: int, tp: int) -> list[str]:
    return [
        "--model", sft.preset, "--tokenizer", str(tokenizer), "--data-path", str(data), "--save", str(save),
        "--metrics-file", str(metrics), "--seq-length", str(plan.seq_length),
        "--global-batch-size", str(sft.batch), "--micro-batch-size", str(sft.batch // 2),
        "--train-iters", str(sft.iters), "--lr", str(sft.lr), "--min-lr", str(sft.lr / 10),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, sft.iters // 20)),
        "--privileged-prompt-fraction", str(sft.privileged_prompt_fraction),
        "--seed", str(seed), "--tensor-model-parallel-size", str(tp),
    ]


def _train_args(method: Method, plan: Plan, student: Path, teacher: Path, data: Path, run_dir: Path,
                seed: int, tp: int) -> list[str]:
    save_interval = max(1, plan.distill_iters // plan.eval_points)
    return [
        "--student-load", str(student), *method.flags(teacher), "--data-path", str(data),
        "--seq-length", str(plan.seq_length), "--max-new-tokens", str(plan.max_new_tokens),
        "--global-batch-size", str(plan.distill_batch), "--micro-batch-size", str(plan.distill_batch // 2),
        "--train-iters", str(plan.distill_iters), "--lr", str(plan.distill_lr),
        "--save", str(run_dir), "--save-interval", str(save_interval), "--keep-last", str(plan.eval_points + 1),
        "--save-samples-interval", "1", "--seed", str(seed), "--tensor-model-parallel-size", str(tp),
        *plan.extra_train_flags,
    ]


def _read_samples(run_dir: Path) -> list[dict]:
    """Every training sample the run recorded (``samples_rank*.jsonl``), in step order."""
    samples = []
    for path in sorted(run_dir.glob("samples_rank*.jsonl")):
        samples += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(samples, key=lambda s: (s["step"], s["rank"], s["index"]))


def _weight_summary(samples: list[dict]) -> dict:
    """Applied ReNIO weights of correct vs incorrect sampled completions, and the AUC of the
    weight as a detector of incorrect ones (:func:`megatron_renio.eval.analysis.auc_incorrect`)."""
    from megatron_renio.eval.analysis import auc_incorrect

    correct = [s["weight"] for s in samples if s["correct"]]
    incorrect = [s["weight"] for s in samples if not s["correct"]]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {
        "n_correct": len(correct), "n_incorrect": len(incorrect),
        "mean_weight_correct": mean(correct), "mean_weight_incorrect": mean(incorrect),
        "auc_incorrect": auc_incorrect(incorrect, correct),
    }


def run(out: Path, plan: Plan, *, seed: int, tp: int, nproc: int, quick: bool) -> dict:
    """Run every stage (module docstring); returns the summary also written to ``summary.json``."""
    # A CPU run wherever it starts: no GPU (its launches would take one per process), and this
    # process and its launches see only the launcher variables they set themselves.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for name in _LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    from tqdm import tqdm

    from megatron_renio.data.arithmetic_task import make_splits, write_jsonl

    started = time.perf_counter()
    _prepare_out(out)
    for sub in ("data", "models", "runs", "logs"):
        (out / sub).mkdir()
    launcher = Launcher(nproc, out / "logs")

    print(f"[1/4] task: {plan.num_train} train / {plan.num_test} test arithmetic problems (seed {seed})", flush=True)
    train, test = make_splits(seed, plan.num_train, plan.num_test, plan.difficulty)
    data, test_path = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    write_jsonl(str(data), train)
    write_jsonl(str(test_path), test)
    tokenizer = train_task_tokenizer(_task_texts(train), out / "tokenizer")

    print(f"[2/4] supervised fine-tuning: teacher ({plan.teacher.preset}, {plan.teacher.iters} steps) and "
          f"student ({plan.student.preset}, {plan.student.iters} steps)", flush=True)
    models = {}
    sft_time = {}
    for role, sft in (("teacher", plan.teacher), ("student", plan.student)):
        models[role] = out / "models" / role
        metrics = out / "logs" / f"sft_{role}.jsonl"
        sft_time[role] = launcher.run(f"sft_{role}", "megatron_renio.sft",
                                      _sft_args(sft, data, tokenizer, models[role], metrics, plan, seed, tp),
                                      metrics, sft.iters)

    evaluator = HeldOutEvaluator(test_path, tokenizer, plan, seed)
    try:
        print(f"[3/4] held-out evaluation (avg@{plan.eval_samples}, temperature {plan.eval_temperature})", flush=True)
        before = {role: evaluator(models[role]) for role in ("teacher", "student")}
        for role, result in before.items():
            print(f"      {role}: accuracy {result.accuracy:.3f}, mean length {result.mean_length:.1f}", flush=True)

        print(f"[4/4] distillation from the student: {', '.join(m.label for m in METHODS)}", flush=True)
        results = {}
        for method in METHODS:
            run_dir = out / "runs" / method.name
            result = MethodResult(method.label)
            result.time_s = launcher.run(method.name, "megatron_renio.train",
                                         _train_args(method, plan, models["student"], models["teacher"], data, run_dir, seed, tp),
                                         run_dir / "metrics.jsonl", plan.distill_iters)
            result.curve.append({"step": 0, **asdict(before["student"])})
            for checkpoint in tqdm(sorted(run_dir.glob("iter_*")), desc=f"{'eval':<12}", dynamic_ncols=True):
                step = int(checkpoint.name.split("_")[1])
                result.curve.append({"step": step, **asdict(evaluator(checkpoint))})
            samples = _read_samples(run_dir)
            steps = sorted({s["step"] for s in samples})
            result.train_accuracy = [
                sum(s["correct"] for s in samples if s["step"] == k) / sum(s["step"] == k for s in samples) for k in steps
            ]
            result.weights = _weight_summary(samples)
            results[method.name] = result
            last = result.curve[-1]
            print(f"      {method.label}: accuracy {before['student'].accuracy:.3f} -> {last['accuracy']:.3f}, "
                  f"{result.time_s:.0f} s", flush=True)
    finally:
        evaluator.close()

    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "settings": {"quick": quick, "seed": seed, "tp": tp, "nproc": nproc, "plan": asdict(plan)},
        "teacher": {**asdict(before["teacher"]), "sft_time_s": sft_time["teacher"]},
        "student": {**asdict(before["student"]), "sft_time_s": sft_time["student"]},
        "methods": {name: asdict(r) for name, r in results.items()},
    }
    summary["plots"] = _plots(out, summary, {m.name: _read_samples(out / "runs" / m.name) for m in METHODS})
    summary["total_time_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(format_table(summary))
    print(f"\nsummary: {out / 'summary.json'}; plots: {', '.join(str(out / p) for p in summary['plots'])}")
    return summary


def format_table(summary: dict) -> str:
    """The terminal table: method, held-out accuracy before -> after, mean length, time."""
    rows = [("method", "accuracy", "length", "time")]
    for role in ("teacher", "student"):
        r = summary[role]
        rows.append((f"{role} (SFT)", f"{r['accuracy']:.3f}", f"{r['mean_length']:.1f}", f"{r['sft_time_s']:.0f} s"))
    for r in summary["methods"].values():
        first, last = r["curve"][0], r["curve"][-1]
        rows.append((r["label"], f"{first['accuracy']:.3f} -> {last['accuracy']:.3f}",
                     f"{first['mean_length']:.1f} -> {last['mean_length']:.1f}", f"{r['time_s']:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plots(out: Path, summary: dict, samples: dict[str, list[dict]]) -> list[str]:
    """accuracy.png, weights.png, weight_vs_correctness.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in methods.items():
        ax.plot([p["step"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker="o", label=r["label"])
    ax.axhline(summary["teacher"]["accuracy"], color="gray", linestyle="--", label="OPD teacher (SFT)")
    ax.set_xlabel("distillation step")
    ax.set_ylabel(f"held-out accuracy (avg@{summary['settings']['plan']['eval_samples']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    renio = [m for m in METHODS if m.renio]
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in renio:
        ax.hist([s["weight"] for s in samples[m.name]], bins=40, alpha=0.6, label=m.label)
    ax.set_xlabel("ReNIO weight (after batch normalisation)")
    ax.set_ylabel("training samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    groups, labels = [], []
    for m in renio:
        for correct in (True, False):
            weights = [s["weight"] for s in samples[m.name] if s["correct"] == correct]
            groups.append(weights or [float("nan")])
            labels.append(f"{m.label}\n{'correct' if correct else 'incorrect'} (n={len(weights)})")
    ax.boxplot(groups, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel("ReNIO weight of the sampled completion")
    ax.set_title("ReNIO weights of correct vs incorrect completions (training rollouts)")
    fig.tight_layout()
    fig.savefig(out / "weight_vs_correctness.png", dpi=100)
    plt.close(fig)
    return ["accuracy.png", "weights.png", "weight_vs_correctness.png"]


def build_parser() -> _OneLineErrorParser:
    parser = _OneLineErrorParser(prog="megatron-renio quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=path_arg, default="quickstart_out", help="output folder (default: quickstart_out)")
    parser.add_argument("--quick", action="store_true", help="the small smoke-test sizes (3-5 minutes on 2 cores)")
    parser.add_argument("--tp", type=int, choices=(1, 2), default=1, help="tensor-parallel size of every launch (default: 1)")
    parser.add_argument("--nproc", type=int, choices=(1, 2), default=2,
                        help="processes per launch (data parallelism = nproc / tp; default: 2)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the data, the models and the sampling "
                        "(default: 1234, the README's table)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megatron-renio quickstart``; returns the exit status (0, or 2 on bad input, a bad
    flag included: checked before anything runs)."""
    try:
        args = build_parser().parse_args(argv)
        if not 0 <= args.seed <= MAX_SEED:
            raise UserInputError(f"--seed must be an integer in [0, {MAX_SEED}], got {args.seed}")
        if args.tp > args.nproc:
            raise UserInputError(f"--tp {args.tp} needs --nproc {args.tp} (got --nproc {args.nproc})")
        run(Path(args.out), QUICK if args.quick else FULL, seed=args.seed, tp=args.tp, nproc=args.nproc, quick=args.quick)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
