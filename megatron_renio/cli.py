"""``megatron-renio <command> [flags]``: one console script for every command.

Each command is a module with ``main(argv) -> exit code``; ``megatron-renio train ...`` is the same
code as ``python -m megatron_renio.train ...`` (and runs under torchrun the same way).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("megatron_renio.train", "on-policy (self-)distillation with ReNIO"),
    "sft": ("megatron_renio.sft", "supervised fine-tuning on reference solutions"),
    "quickstart": ("megatron_renio.quickstart", "OPD, OPSD and ReNIO end to end on a built-in task (CPU)"),
    "eval": ("megatron_renio.eval.runner", "generate on benchmarks with the Megatron model, grade, avg@k / pass@k"),
    "score": ("megatron_renio.eval.score", "ReNIO weights, pivotal tokens and divergences of given completions"),
    "analyze": ("megatron_renio.eval.analysis", "correct vs incorrect analysis of graded generations"),
}


def _usage() -> str:
    lines = ["usage: megatron-renio <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if not argv:  # no command: the usage, as an error (argparse's status for a missing argument)
        print(_usage(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
