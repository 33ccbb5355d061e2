"""``megatron-renio analyze``: how correct and incorrect student-generated outputs (SGOs) differ.

Input: one or more files of graded generations (JSON lines, a JSON array, either gzipped, or parquet;
read by :func:`~megatron_renio.data.records.read_rows`; several files, e.g. the trainer's
``samples_rank<R>.jsonl`` of every data-parallel rank, are analysed as one set), one object per record,
with the fields

* ``completion`` (string, required): the generated text;
* ``correct`` (``true`` / ``false``): the grade; a record without one (the trainer's samples of a
  ``--task code`` run, or of a prompt without an answer) is counted as ungraded and left out of
  the analysis (at least one record must have a grade);
* ``weight`` (number, optional): the ReNIO weight the sample got;
* ``num_tokens`` (non-negative integer, optional): the completion length in model tokens.

A number must convert to a finite float (a JSON integer beyond about 1.8e308 is refused). Blank
lines are skipped; ``null`` counts as absent for every field but ``completion``.

Output: a directory with ``summary.json``, ``report.md`` and, when matplotlib is importable,
``lengths.png``, ``reflection.png`` and (when weights are present) ``weights.png``.
``summary["num_generations"]`` counts the graded records analysed, ``summary["num_ungraded"]``
those left out. Reported per group (correct / incorrect):

* **length**: mean, median, 90th percentile (linear interpolation), in model tokens when every
  graded record has ``num_tokens``, otherwise in word tokens (see :mod:`.reflection`); the unit is
  ``summary["length_unit"]``; computed exactly and rounded once, so no value a record may hold
  overflows them;
* **reflection**: for every phrase, the number of occurrences, the rate per 1,000 length units
  (occurrences / total length of the group x 1000) and the share of completions that contain it;
  the same for all phrases together;
* **ReNIO weight** (records that have one): count, mean, median (computed as for lengths) per
  group, and the AUC of the weight as a detector of *incorrect* completions: the probability that
  a random incorrect completion has a higher weight than a random correct one, ties counting one
  half (the Mann-Whitney U statistic over n_incorrect x n_correct). ``null`` when either group has
  no weighted record.

Errors in the input (missing file, malformed line, missing or mistyped field) print
``error: <one line>`` on stderr and exit with status 2; nothing is written then. The output is
assembled in a temporary directory beside the target and renamed into place at the end, so a
failed run leaves no partial directory; the directory gets the permissions that ``mkdir`` gives
under the umask. An ``--out`` that is a symbolic link is followed: the output goes into the
link's target, and the link stays. An existing non-empty output directory is only replaced
with ``--overwrite``, and only when it holds nothing but files analyze writes (:data:`OUTPUT_FILES`):
a folder with anything else in it (another command's output, a mistyped path) is refused. A bad
flag is one line too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from megatron_renio.config import _GivenOnce, _OneLineErrorParser
from megatron_renio.data.records import RECORD_EXTENSIONS, read_rows
from megatron_renio.entrypoint import debug_requested
from megatron_renio.errors import UserInputError
from megatron_renio.eval.reflection import DEFAULT_PHRASES, count_phrases, word_tokens

_GROUPS = ("correct", "incorrect")
# everything an output directory holds: the summary, the report and write_plots's files
OUTPUT_FILES = ("summary.json", "report.md", "lengths.png", "reflection.png", "weights.png")
# matplotlib's axis arithmetic overflows near the largest float: beyond this magnitude a histogram
# is drawn in units of a power of ten
_PLOT_MAGNITUDE = 1e200


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion and its grade, ``correct`` None for an ungraded one (see the module docstring
    for the fields)."""

    completion: str
    correct: bool | None
    weight: float | None = None
    num_tokens: int | None = None


def load_generations(*paths: str) -> list[Generation]:
    """Read and validate the records of the generations files ``paths``, in order (:data:`RECORD_EXTENSIONS`,
    read by :func:`~megatron_renio.data.records.read_rows`), ungraded records included;
    :class:`UserInputError` names the line, or the files when none has a record with a grade."""
    seen = {}
    for path in paths:
        if not os.path.isfile(path):
            raise UserInputError(f"--generations {path}: no such file")
        file = os.stat(path)  # the same file under two names (also a hard link): its records would count twice
        if (file.st_dev, file.st_ino) in seen:
            raise UserInputError(f"--generations {path}: the same file as {seen[file.st_dev, file.st_ino]}")
        seen[file.st_dev, file.st_ino] = path
    generations = [_generation(row.fields, row.where) for path in paths for row in read_rows(path, RECORD_EXTENSIONS)]
    named = ", ".join(paths)
    if not generations:
        raise UserInputError(f"{named}: no generations in the file{'s' if len(paths) > 1 else ''}")
    if all(g.correct is None for g in generations):
        raise UserInputError(f"{named}: no record has a grade (field 'correct'; {len(generations)} records read), "
                             "so there is nothing to compare")
    return generations


def _finite(number: int | float) -> bool:
    """Whether ``number`` converts to a finite float (a huge int raises in ``float``)."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


def _generation(record: dict, where: str) -> Generation:
    if "completion" not in record:
        raise UserInputError(f"{where}: missing field 'completion'")
    completion, correct = record["completion"], record.get("correct")
    if not isinstance(completion, str):
        raise UserInputError(f"{where}: field 'completion' must be a string")
    if correct is not None and not isinstance(correct, bool):
        raise UserInputError(f"{where}: field 'correct' must be true or false")
    weight = record.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _finite(weight):
            raise UserInputError(f"{where}: field 'weight' must be a finite number")
        weight = float(weight)
    num_tokens = record.get("num_tokens")
    if num_tokens is not None and (
        isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0 or not _finite(num_tokens)
    ):
        raise UserInputError(f"{where}: field 'num_tokens' must be a non-negative integer (at most about 1.8e308)")
    return Generation(completion, correct, weight, num_tokens)


def auc_incorrect(weights_incorrect: Sequence[float], weights_correct: Sequence[float]) -> float | None:
    """P(weight of a random incorrect > weight of a random correct) + P(equal) / 2.

    Computed from ranks (Mann-Whitney U with average ranks for ties); ``None`` if a side is empty.
    """
    n_pos, n_neg = len(weights_incorrect), len(weights_correct)
    if n_pos == 0 or n_neg == 0:
        return None
    values = np.concatenate([np.asarray(weights_incorrect, float), np.asarray(weights_correct, float)])
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1  # average of ranks start+1..end+1
        start = end + 1
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _distribution(values: Sequence[int | float]) -> dict | None:
    """Mean, median and 90th percentile (linear interpolation, numpy's default) of numbers that
    convert to finite floats, or None for none: computed exactly (fractions) and rounded once, so
    neither a sum nor a difference of huge values overflows."""
    if not values:
        return None
    ordered = sorted(values)

    def percentile(share: Fraction) -> float:
        position = share * (len(ordered) - 1)
        low = math.floor(position)
        below, above = Fraction(ordered[low]), Fraction(ordered[min(low + 1, len(ordered) - 1)])
        return float(below + (above - below) * (position - low))

    return {
        "mean": float(sum(map(Fraction, values)) / len(values)),
        "median": percentile(Fraction(1, 2)),
        "p90": percentile(Fraction(9, 10)),
    }


def analyze(generations: Sequence[Generation], phrases: Sequence[str] = DEFAULT_PHRASES) -> dict:
    """The summary written to ``summary.json`` (layout described in the module docstring); ungraded
    generations are only counted."""
    graded = [g for g in generations if g.correct is not None]
    use_tokens = all(g.num_tokens is not None for g in graded)
    summary: dict = {
        "num_generations": len(graded),
        "num_ungraded": len(generations) - len(graded),
        "length_unit": "tokens" if use_tokens else "words",
        "phrases": list(phrases),
        "groups": {},
    }
    for group in _GROUPS:
        members = [g for g in graded if g.correct == (group == "correct")]
        tokens = [word_tokens(g.completion) for g in members]
        lengths = [g.num_tokens if use_tokens else len(t) for g, t in zip(members, tokens)]
        counts = [count_phrases(t, phrases) for t in tokens]
        total_length = sum(lengths)
        reflection = {}
        for phrase in list(phrases) + ["all"]:
            per_item = [sum(c.values()) if phrase == "all" else c[phrase] for c in counts]
            occurrences = sum(per_item)
            reflection[phrase] = {
                "count": occurrences,
                "per_1k": 1000 * occurrences / total_length if total_length else None,
                "share_containing": sum(1 for n in per_item if n) / len(members) if members else None,
            }
        summary["groups"][group] = {
            "count": len(members),
            "length": _distribution(lengths),
            "total_length": total_length,
            "reflection": reflection,
        }
    weighted = {
        group: [g.weight for g in graded if g.weight is not None and g.correct == (group == "correct")]
        for group in _GROUPS
    }
    if any(weighted.values()):
        summary["weight"] = {}
        for group, ws in weighted.items():
            dist = _distribution(ws) or {}
            summary["weight"][group] = {"count": len(ws), "mean": dist.get("mean"), "median": dist.get("median")}
        summary["weight"]["auc_incorrect"] = auc_incorrect(weighted["incorrect"], weighted["correct"])
    else:
        summary["weight"] = None
    return summary


def _fmt(value) -> str:
    """A report number: floats with 3 decimals, or 4 significant digits beyond [0.001, 1e6) (0 aside)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _ungraded_note(summary: dict) -> str:
    """``"; N records without a grade were left out"``, or nothing when every record has one."""
    n = summary["num_ungraded"]
    if not n:
        return ""
    return f"; {n} records without a grade were left out" if n > 1 else "; 1 record without a grade was left out"


def render_report(summary: dict, sources: Sequence[str], plots: Sequence[str]) -> str:
    """The Markdown report for a summary from :func:`analyze` of the files ``sources``."""
    groups = summary["groups"]
    unit = summary["length_unit"]
    lines = [
        "# SGO analysis: correct vs incorrect completions",
        "",
        f"Source: {', '.join(f'`{source}`' for source in sources)}, {summary['num_generations']} generations "
        f"({groups['correct']['count']} correct, {groups['incorrect']['count']} incorrect){_ungraded_note(summary)}.",
        "",
        f"## Length ({unit})",
        "",
        "| group | count | mean | median | p90 |",
        "|---|---|---|---|---|",
    ]
    for group in _GROUPS:
        dist = groups[group]["length"] or {}
        lines.append(
            f"| {group} | {groups[group]['count']} | {_fmt(dist.get('mean'))} | "
            f"{_fmt(dist.get('median'))} | {_fmt(dist.get('p90'))} |"
        )
    lines += [
        "",
        f"## Reflection markers (occurrences, per 1k {unit}, share of completions containing it)",
        "",
        "| phrase | correct: count | per 1k | share | incorrect: count | per 1k | share |",
        "|---|---|---|---|---|---|---|",
    ]
    for phrase in list(summary["phrases"]) + ["all"]:
        cells = []
        for group in _GROUPS:
            r = groups[group]["reflection"][phrase]
            cells += [_fmt(r["count"]), _fmt(r["per_1k"]), _fmt(r["share_containing"])]
        lines.append(f"| {phrase} | " + " | ".join(cells) + " |")
    weight = summary["weight"]
    lines += ["", "## ReNIO weight vs correctness", ""]
    if weight is None:
        lines.append("No record has a `weight` field.")
    else:
        lines += ["| group | weighted records | mean | median |", "|---|---|---|---|"]
        for group in _GROUPS:
            w = weight[group]
            lines.append(f"| {group} | {w['count']} | {_fmt(w['mean'])} | {_fmt(w['median'])} |")
        lines += [
            "",
            f"AUC of the weight as a detector of incorrect completions: {_fmt(weight['auc_incorrect'])} "
            "(0.5 = no signal, 1 = every incorrect completion outweighs every correct one).",
        ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _histogram(plt, values_by_group: Mapping[str, Sequence[int | float]], xlabel: str, path: str) -> None:
    """Write to ``path`` a histogram of each group's values (numbers that convert to finite floats,
    at least one in all groups together) over 30 equal-width bins shared by the groups: fewer where
    the values lie too close together for 31 distinct floats, one when they are all equal. Where a
    value's magnitude exceeds :data:`_PLOT_MAGNITUDE`, the axis is in units of 10^k, which its label
    names."""
    arrays = {group: np.asarray(values, dtype=float) for group, values in values_by_group.items() if values}
    peak = max(np.abs(a).max() for a in arrays.values())
    if peak > _PLOT_MAGNITUDE:
        exponent = math.floor(math.log10(peak))
        arrays = {group: a / 10.0**exponent for group, a in arrays.items()}
        xlabel += f" (x 1e{exponent})"
    low = min(a.min() for a in arrays.values())
    high = max(a.max() for a in arrays.values())
    if low < high:
        edges = np.unique(np.linspace(low, high, 31))
    else:  # numpy widens a single value by 0.5 each way, which rounds away beyond 2**53
        half = max(0.5, abs(low) * 1e-6)
        edges = np.array([low - half, low + half])
    fig, ax = plt.subplots(figsize=(7, 4))
    for group, a in arrays.items():
        ax.hist(a, bins=edges, alpha=0.6, label=f"{group} (n={len(a)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("completions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(generations: Sequence[Generation], summary: dict, out_dir: str) -> list[str]:
    """Write the PNG plots of the graded ``generations`` (at least one) into ``out_dir``; returns
    their file names. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_group = {
        group: [g for g in generations if g.correct == (group == "correct")] for group in _GROUPS
    }
    unit = summary["length_unit"]
    lengths = {
        group: [g.num_tokens if unit == "tokens" else len(word_tokens(g.completion)) for g in members]
        for group, members in by_group.items()
    }
    _histogram(plt, lengths, f"completion length ({unit})", os.path.join(out_dir, "lengths.png"))
    written = ["lengths.png"]

    fig, ax = plt.subplots(figsize=(7, 4))
    phrases = list(summary["phrases"])
    x = np.arange(len(phrases))
    for i, group in enumerate(_GROUPS):
        rates = [summary["groups"][group]["reflection"][p]["per_1k"] or 0.0 for p in phrases]
        ax.bar(x + (i - 0.5) * 0.4, rates, width=0.4, label=group)
    ax.set_xticks(x, phrases, rotation=30, ha="right")
    ax.set_ylabel(f"occurrences per 1k {unit}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "reflection.png"), dpi=100)
    plt.close(fig)
    written.append("reflection.png")

    if summary["weight"] is not None:
        weights = {group: [g.weight for g in members if g.weight is not None] for group, members in by_group.items()}
        _histogram(plt, weights, "ReNIO weight", os.path.join(out_dir, "weights.png"))
        written.append("weights.png")
    return written


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_out(generations_path: str) -> str:
    stem = os.path.basename(generations_path)
    for suffix in RECORD_EXTENSIONS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return os.path.join(os.path.dirname(os.path.abspath(generations_path)), f"{stem}_analysis")


def run(generations_paths: Sequence[str], out_dir: str, *, phrases: Sequence[str], overwrite: bool) -> dict:
    """Analyse the files ``generations_paths`` as one set and write the output directory; returns the summary."""
    out_dir = os.path.realpath(out_dir)  # a link to a folder: write into its target, keep the link
    held = [path for path in generations_paths if os.path.realpath(path).startswith(out_dir + os.sep)]
    if held:
        raise UserInputError(f"--out {out_dir} holds the --generations file {held[0]}, which writing there would "
                             "replace; choose another folder")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise UserInputError(f"--out {out_dir}: exists and is not a directory")
        entries = sorted(os.listdir(out_dir))
        foreign = [e for e in entries if e not in OUTPUT_FILES or not os.path.isfile(os.path.join(out_dir, e))]
        if foreign:
            raise UserInputError(f"--out {out_dir}: holds {foreign[0]!r}, which analyze does not write, so the folder "
                                 "is not replaced; choose another")
        if entries and not overwrite:
            raise UserInputError(f"--out {out_dir}: directory is not empty (pass --overwrite to replace it)")
    generations = load_generations(*generations_paths)
    summary = analyze(generations, phrases)

    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    except OSError as exc:
        raise UserInputError(f"--out {out_dir}: cannot create ({exc.strerror})")
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700, readable by its owner only
        if _matplotlib_available():
            plots = write_plots(generations, summary, staging)
        else:
            plots = []
            print("note: matplotlib is not installed, plots skipped "
                  "(pip install matplotlib)", file=sys.stderr)
        with open(os.path.join(staging, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        with open(os.path.join(staging, "report.md"), "w", encoding="utf-8") as f:
            f.write(render_report(summary, generations_paths, plots))
        if os.path.exists(out_dir):
            retired = staging + ".old"
            os.rename(out_dir, retired)
            os.rename(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _parse_phrases(value: str) -> list[str]:
    """The distinct phrases of ``--phrases`` in order; 'all' is the report's total, not a phrase."""
    phrases = list(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    if not phrases or any(not word_tokens(p) for p in phrases):
        raise UserInputError(f"--phrases {value!r}: give comma-separated phrases made of words")
    if "all" in phrases:
        raise UserInputError(f"--phrases {value!r}: 'all' names the total of the phrases; leave it out")
    return phrases


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="megatron-renio analyze",
        description="Compare correct and incorrect generations: length, reflection markers, ReNIO weights.",
    )
    parser.add_argument("--generations", required=True, nargs="+", action=_GivenOnce, metavar="FILE",
                        help="graded generations: JSONL, JSON, gzipped or parquet (completion, correct, optional "
                             "weight, num_tokens); several files are analysed as one set")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: the first FILE without its extension, plus _analysis)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out directory that holds only an earlier analyze output")
    parser.add_argument("--phrases", metavar="LIST",
                        help="comma-separated reflection phrases (default: %s)" % ", ".join(DEFAULT_PHRASES))
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``megatron-renio analyze``; returns the exit status (0, or 2 on bad input, flags
    included)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)  # until the flags are parsed
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        phrases = _parse_phrases(args.phrases) if args.phrases is not None else list(DEFAULT_PHRASES)
        out_dir = args.out if args.out is not None else _default_out(args.generations[0])
        summary = run(args.generations, out_dir, phrases=phrases, overwrite=args.overwrite)
    except UserInputError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = summary["groups"]
    auc = summary["weight"]["auc_incorrect"] if summary["weight"] else None
    print(
        f"analyzed {summary['num_generations']} generations "
        f"({groups['correct']['count']} correct, {groups['incorrect']['count']} incorrect){_ungraded_note(summary)}; "
        f"weight AUC for incorrect: {_fmt(auc)}; report: {os.path.join(out_dir, 'report.md')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
