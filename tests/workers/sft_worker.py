"""torchrun worker (2 ranks) for tests/test_sft.py: supervised fine-tuning in three layouts.

Arguments: OUT_DIR DATA TOKENIZER. A tiny run at TP=1 x DP=2 from a random initialisation (its loss
must fall) saves checkpoint ``init``; one step from ``init`` is then taken at TP=2, PP=2 and
TP=1 x DP=2 (same global batch, same weights), whose losses must agree; the last with a --min-lr that
the constant schedule leaves without effect, whose note it records. Rank 0 reports them.
"""

import contextlib
import io
import sys
from pathlib import Path

from megatron_renio import sft
from tests.torchrun_harness import save_rank_result

COMMON = ["--seq-length", "384", "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "3e-3",
          "--seed", "7", "--privileged-prompt-fraction", "0.25"]


def main(out: str, data: str, tokenizer: str) -> None:
    out = Path(out)

    def run(name, *flags):
        args = ["--data-path", data, "--tokenizer", tokenizer, "--save", str(out / name), *COMMON, *flags]
        return sft.run(sft.parse_sft_args(args))

    result = {"curve": run("init", "--model", "tiny-qwen3", "--train-iters", "8", "--log-interval", "3",
                           "--metrics-file", str(out / "init_metrics.jsonl"))}
    printed = io.StringIO()
    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2"]),
                         ("dp2", ["--min-lr", "1e-4"])):
        with contextlib.redirect_stdout(printed) if name == "dp2" else contextlib.nullcontext():
            result[name] = run(name, "--pretrained-checkpoint", str(out / "init"), "--train-iters", "1", *layout)[0]
    result["dp2_notes"] = [line for line in printed.getvalue().splitlines() if line.startswith("note: ")]
    save_rank_result(out, result)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    finally:
        from megatron_renio import distributed

        distributed.destroy()
