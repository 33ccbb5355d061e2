"""TokenSequences (token ids at 4 bytes a token) and the prompt set load_prompts keeps in it."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc

import pytest

from megatron_renio.data.token_sequences import TokenSequences

INT32_MAX = 2**31 - 1


def _held_bytes(build):
    """(result of ``build()``, bytes it still holds once built) as tracemalloc counts them."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = build()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return result, held


def test_sequences_read_back_as_the_lists_appended():
    rng = random.Random(0)
    lists = [[rng.randrange(INT32_MAX + 1) for _ in range(rng.randrange(0, 50))] for _ in range(200)]
    lists[3] = []  # an empty sequence keeps its place
    lists[4] = [0, INT32_MAX, 257, 1]
    seqs = TokenSequences(iter(lists))  # any iterable, consumed once
    assert len(seqs) == len(lists) and seqs.num_tokens == sum(map(len, lists))
    assert list(seqs) == lists
    assert [seqs[i] for i in range(len(lists))] == lists
    assert seqs[-1] == lists[-1] and seqs[-len(lists)] == lists[0]
    assert all(type(t) is int for t in seqs[4])  # plain ints, as the tokenizer gave (torch.tensor, json)
    assert seqs.lengths() == [len(x) for x in lists]
    picked = [5, 0, 5, 199, 3]
    assert list(seqs.select(picked)) == [lists[i] for i in picked]
    read = seqs[10]
    read.append(1)  # a read is a copy: the store is unchanged
    assert seqs[10] == lists[10]
    for bad in (len(lists), -len(lists) - 1):
        with pytest.raises(IndexError):
            seqs[bad]
    with pytest.raises(TypeError):
        seqs[1:3]


def test_an_id_beyond_int32_is_refused_and_appends_nothing():
    seqs = TokenSequences([[1, 2]])
    with pytest.raises(OverflowError):
        seqs.append([3, INT32_MAX + 1])
    assert len(seqs) == 1 and seqs.num_tokens == 2 and list(seqs) == [[1, 2]]
    seqs.append([4])
    assert list(seqs) == [[1, 2], [4]]


def test_held_memory_is_about_4_bytes_a_token():
    """Ids above 256 (each a separate int object in a list, ~41 bytes a token there) appended one
    sequence at a time: what stays held is the int32 array and the offsets."""
    rng = random.Random(1)
    num, length = 300, 1000
    seqs, held = _held_bytes(lambda: TokenSequences([rng.randrange(300, 150_000) for _ in range(length)]
                                                    for _ in range(num)))
    tokens = num * length
    assert seqs.num_tokens == tokens
    assert held < 4.5 * tokens + 8 * (num + 1) + 1024, held / tokens
    as_lists, held_lists = _held_bytes(lambda: [seqs[i] for i in range(num)])
    assert as_lists == list(seqs) and held_lists > 30 * tokens  # the representation this replaces


# --- load_prompts ----------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(3000)]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A whitespace word-level Hugging Face tokenizer: ``w0`` .. ``w2999`` are ids 3 .. 3002."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_renio.data.tokenizer import load_tokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("word_tok")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return load_tokenizer(str(path))


def _write_records(path, num, seed, long_every=0):
    """OPSD records with short problems and long solutions of ids above 256; every ``long_every``-th
    solution is made too long for the sequence length the tests use."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for k in range(num):
            words = lambda n: " ".join(rng.choice(WORDS[300:]) for _ in range(n))  # noqa: E731
            n = 2500 if long_every and k % long_every == 0 else rng.randrange(700, 1400)
            row = {"problem": words(rng.randrange(20, 60)), "solution": words(n)}
            if k % 3:
                row["answer"] = str(k)
            f.write(json.dumps(row) + "\n")


def _as_lists(cfg, tokenizer):
    """The prompt set as load_prompts built it before (lists of ids, filtered by the longer prompt)."""
    from megatron_renio.data.prompts import load_prompt_records
    from megatron_renio.data.templates import build_prompt_ids

    records = load_prompt_records(cfg.data_path, cfg.problem_field, cfg.solution_field, cfg.answer_field,
                                  require_solution=True)
    student = [build_prompt_ids(tokenizer, r, cfg.task, "student", cfg.mode) for r in records]
    teacher = [build_prompt_ids(tokenizer, r, cfg.task, "teacher", cfg.mode) for r in records]
    longest = [max(len(s), len(t)) for s, t in zip(student, teacher)]
    kept = [k for k, n in enumerate(longest) if n + 1 <= cfg.seq_length]
    budget_limited = sum(cfg.seq_length - longest[k] < cfg.max_new_tokens for k in kept)
    return ([student[k] for k in kept], [teacher[k] for k in kept], [records[k].answer for k in kept],
            len(records) - len(kept), budget_limited, [records[k].source for k in kept])


@pytest.mark.parametrize("long_every", [0, 7], ids=["all_fit", "some_too_long"])
def test_load_prompts_keeps_the_tokenizers_ids_and_counts(tmp_path, word_tokenizer, long_every):
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.components import load_prompts

    _write_records(tmp_path / "train.jsonl", 60, seed=long_every, long_every=long_every)
    cfg = TrainConfig(data_path=[str(tmp_path / "train.jsonl")], seq_length=2048, max_new_tokens=800)
    prompts = load_prompts(cfg, word_tokenizer)
    student, teacher, answers, skipped, budget_limited, sources = _as_lists(cfg, word_tokenizer)
    assert list(prompts.student) == student and list(prompts.teacher) == teacher
    assert prompts.answers == answers and prompts.sources == sources
    # the samples' source names the record's line, past the skipped ones (every 7th, from line 1)
    assert prompts.sources[0] == f"{tmp_path / 'train.jsonl'}:{2 if long_every else 1}"
    if long_every:  # the solutions made too long: the student prompts fit, the teacher's do not
        assert prompts.teacher_note.startswith(f"; {skipped} of them for their teacher prompt alone, the problem with "
                                               "its solution: teacher prompts have up to ")
    else:
        assert prompts.teacher_note == ""
    assert (prompts.skipped_too_long, prompts.budget_limited) == (skipped, budget_limited)
    assert len(prompts.student) == len(prompts.teacher) == 60 - skipped
    assert (skipped > 0) == bool(long_every) and budget_limited > 0
    assert max(max(p) for p in teacher) > 256  # the ids a list would hold as separate int objects


def test_load_prompts_holds_about_4_bytes_a_token(tmp_path, word_tokenizer):
    """Every rank holds the whole prompt set: 4 bytes a token (plus the array's growth slack of at
    most 1/16, the offsets and the answers), where lists of Python ints held ~41."""
    from megatron_renio.config import TrainConfig
    from megatron_renio.training.components import load_prompts

    _write_records(tmp_path / "train.jsonl", 150, seed=3, long_every=10)
    cfg = TrainConfig(data_path=[str(tmp_path / "train.jsonl")], seq_length=2048, max_new_tokens=800)
    prompts, held = _held_bytes(lambda: load_prompts(cfg, word_tokenizer))
    tokens = prompts.student.num_tokens + prompts.teacher.num_tokens
    assert prompts.skipped_too_long > 0 and tokens > 150_000
    assert held < 5 * tokens, f"{held / tokens:.1f} bytes a token"


def test_the_hash_covers_the_ids_and_where_each_sequence_ends():
    import hashlib

    def digest(store):
        h = hashlib.sha256()
        store.update_hash(h)
        return h.hexdigest()

    seqs = TokenSequences([[1, 2], [3], [4, 5, 6]])
    assert digest(seqs) == digest(TokenSequences([[1, 2], [3], [4, 5, 6]])) == digest(seqs.select([0, 1, 2]))
    others = ([[1], [2, 3], [4, 5, 6]], [[3], [1, 2], [4, 5, 6]], [[1, 2], [3], [4, 5, 7]], [[1, 2], [3]])
    assert len({digest(seqs), *(digest(TokenSequences(o)) for o in others)}) == 1 + len(others)
