"""pack_pairs layout (gather indices, labels, masks, padding, truncation); filter_long_prompts."""

import pytest
import torch

from megatron_renio.data.batching import filter_long_prompts, pack_pairs
from megatron_renio.errors import UserInputError

EOS, PAD = 1, 0


def _check_side(side, prompts, completions, batch):
    """Every invariant of one model's inputs against the raw prompts and kept completions."""
    b, seq_len = side.tokens.shape
    assert side.tokens.dtype == side.labels.dtype == side.position_ids.dtype == torch.int64
    assert side.loss_mask.dtype == torch.float32
    assert torch.equal(side.labels[:, :-1], side.tokens[:, 1:])
    assert torch.all(side.labels[:, -1] == PAD)
    assert torch.equal(side.position_ids, torch.arange(seq_len).expand(b, -1))
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, c = len(prompt), len(completion)
        assert side.prompt_lengths[i] == p
        assert side.tokens[i, :p].tolist() == prompt
        assert side.tokens[i, p : p + c].tolist() == completion
        assert torch.all(side.tokens[i, p + c :] == PAD)
        # The gather index reconstructs the completion from the tokens and from the labels.
        index = side.gather_index[i, :c]
        assert side.tokens[i, index + 1].tolist() == completion
        assert side.labels[i, index].tolist() == completion
        assert batch.completion_ids[i, :c].tolist() == completion
        # The loss mask is 1 exactly where the label is a completion token (EOS included).
        expected_mask = torch.zeros(seq_len)
        expected_mask[index] = 1.0
        assert torch.equal(side.loss_mask[i], expected_mask)
        assert side.loss_mask[i].sum() == c


def test_layout_reconstructs_completions_in_both_models():
    student = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    teacher = [[5, 6, 7, 20, 21], [8, 9, 22, 23, 24, 25, 26], [10, 11, 12, 13, 27]]
    completions = [[30, 31, EOS], [32, 33, 34, 35, 36, EOS, PAD, PAD], [37]]
    batch = pack_pairs(student, teacher, completions, EOS, PAD, seq_length=64)
    kept = [[30, 31, EOS], [32, 33, 34, 35, 36, EOS], [37]]
    _check_side(batch.student, student, kept, batch)
    _check_side(batch.teacher, teacher, kept, batch)
    assert batch.completion_lengths.tolist() == [3, 6, 1]
    assert batch.completion_ids.shape == (3, 6)
    assert batch.completion_mask.tolist() == [
        [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0],
    ]
    assert torch.all(batch.completion_ids[batch.completion_mask == 0] == PAD)
    assert batch.truncated.tolist() == [False, False, False]
    # Longest sequence: teacher of sample 1, 7 + 6 = 13 -> padded to 16.
    assert batch.seq_len == 16 == batch.teacher.tokens.shape[1]
    # Per-position log-probs of the labels, gathered, give each completion token's log-prob.
    for side in (batch.student, batch.teacher):
        logits = torch.randn(3, batch.seq_len, 40)
        per_position = logits.log_softmax(-1).gather(-1, side.labels.unsqueeze(-1)).squeeze(-1)
        on_grid = per_position.gather(1, side.gather_index)
        for i, c in enumerate(batch.completion_lengths.tolist()):
            for j in range(c):
                position = side.prompt_lengths[i] - 1 + j
                token = batch.completion_ids[i, j]
                assert on_grid[i, j] == logits[i, position].log_softmax(-1)[token]


def test_docstring_example():
    batch = pack_pairs([[2, 3, 4]], [[5, 6, 7, 8, 9]], [[10, 11, EOS]], EOS, PAD, seq_length=8)
    assert batch.student.tokens.tolist() == [[2, 3, 4, 10, 11, EOS, PAD, PAD]]
    assert batch.student.labels.tolist() == [[3, 4, 10, 11, EOS, PAD, PAD, PAD]]
    assert batch.student.loss_mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]
    assert batch.teacher.tokens.tolist() == [[5, 6, 7, 8, 9, 10, 11, EOS]]
    assert batch.teacher.loss_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 0]]
    assert batch.student.gather_index.tolist() == [[2, 3, 4]]
    assert batch.teacher.gather_index.tolist() == [[4, 5, 6]]


def test_same_prompts_for_opd():
    prompts = [[4, 5, 6]]
    batch = pack_pairs(prompts, prompts, [[7, 8, EOS]], EOS, PAD, seq_length=16)
    assert torch.equal(batch.student.tokens, batch.teacher.tokens)
    assert torch.equal(batch.student.gather_index, batch.teacher.gather_index)


def test_completion_without_eos_is_kept_whole():
    batch = pack_pairs([[3, 4]], [[3, 4]], [[5, 6, 7]], EOS, PAD, seq_length=16)
    assert batch.completion_ids.tolist() == [[5, 6, 7]]
    assert batch.student.loss_mask.sum() == 3


def test_completion_ends_at_the_first_of_several_stop_ids():
    batch = pack_pairs([[3, 4], [3, 4]], [[3, 4], [3, 4]], [[5, 9, 6, EOS], [5, EOS, 9]], [EOS, 9], PAD, seq_length=16)
    assert batch.completion_lengths.tolist() == [2, 2]
    assert batch.completion_ids.tolist() == [[5, 9], [5, EOS]]


def test_truncation_to_seq_length():
    student = [[3, 4], [3, 4]]
    teacher = [[3, 4, 5, 6, 7, 8], [3, 4]]
    completions = [[10, 11, 12, 13, EOS], [10, 11, EOS]]
    batch = pack_pairs(student, teacher, completions, EOS, PAD, seq_length=8, pad_to_multiple=4)
    # Sample 0: the teacher prompt leaves 8 - 6 = 2 tokens of room for both models.
    assert batch.completion_lengths.tolist() == [2, 3]
    assert batch.truncated.tolist() == [True, False]
    assert batch.seq_len == 8
    _check_side(batch.student, student, [[10, 11], [10, 11, EOS]], batch)
    _check_side(batch.teacher, teacher, [[10, 11], [10, 11, EOS]], batch)


def test_a_completion_that_exactly_fills_the_room_is_not_truncated():
    """The room is seq_length minus the longer prompt: a completion of exactly that many tokens is
    kept whole and not marked truncated; one token more is cut to the room and marked."""
    batch = pack_pairs([[3, 4]], [[3, 4]], [[5] * 6], EOS, PAD, seq_length=8)  # room 8 - 2 = 6
    assert batch.truncated.tolist() == [False]
    assert batch.completion_ids.tolist() == [[5] * 6] and batch.seq_len == 8
    # kept through EOS (6 tokens), the generation padding after it does not count
    batch = pack_pairs([[3, 4]], [[3, 4, 6]], [[5, 5, 5, 5, EOS, PAD]], EOS, PAD, seq_length=8)  # room 5
    assert batch.truncated.tolist() == [False] and batch.completion_lengths.tolist() == [5]
    batch = pack_pairs([[3, 4]], [[3, 4]], [[5] * 7], EOS, PAD, seq_length=8)
    assert batch.truncated.tolist() == [True] and batch.completion_lengths.tolist() == [6]


def test_padding_to_multiple():
    batch = pack_pairs([[3]], [[3]], [[5, EOS]], EOS, PAD, seq_length=24, pad_to_multiple=6)
    assert batch.seq_len == 6
    batch = pack_pairs([[3] * 6], [[3]], [[5, EOS]], EOS, PAD, seq_length=24, pad_to_multiple=6)
    assert batch.seq_len == 12


def test_pack_pairs_errors():
    with pytest.raises(UserInputError, match="--seq-length 30 must be a multiple of 8"):
        pack_pairs([[3]], [[3]], [[5]], EOS, PAD, seq_length=30)
    with pytest.raises(ValueError, match="filter_long_prompts"):
        pack_pairs([[3]], [[3] * 8], [[5]], EOS, PAD, seq_length=8)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_pairs([[]], [[3]], [[5]], EOS, PAD, seq_length=8)
    with pytest.raises(ValueError, match="batch sizes differ"):
        pack_pairs([[3]], [[3], [4]], [[5]], EOS, PAD, seq_length=8)


def test_to_device_keeps_everything():
    batch = pack_pairs([[3, 4]], [[3, 4, 5]], [[6, EOS]], EOS, PAD, seq_length=8).to("cpu")
    assert batch.teacher.gather_index.tolist() == [[2, 3]]


def test_filter_long_prompts():
    records = [
        ([1] * 3, [1] * 5),  # fits with room 3
        ([1] * 3, [1] * 8),  # teacher prompt fills seq_length: no room -> skipped
        ([1] * 7, [1] * 7),  # room 1: kept, budget-limited
        ([1] * 2,),  # single prompt (OPD), room 6
        ([1] * 9, [1] * 2),  # student prompt too long -> skipped
    ]
    lengths = [[len(ids) for ids in prompts] for prompts in records]
    result = filter_long_prompts(lengths, seq_length=8, max_new_tokens=4)
    assert result.kept == [0, 2, 3]
    assert result.skipped == 2
    assert result.budget_limited == 2  # records 0 (room 3) and 2 (room 1)
    kept, skipped, _ = result
    assert (kept, skipped) == ([0, 2, 3], 2)
    # Every kept record packs without error and gets at least one completion token.
    for k in result.kept:
        student, teacher = records[k][0], records[k][-1]
        batch = pack_pairs([student], [teacher], [[5] * 10], EOS, PAD, seq_length=8)
        assert batch.completion_lengths.item() >= 1
    with pytest.raises(UserInputError, match="--max-new-tokens must be at least 1"):
        filter_long_prompts(lengths, seq_length=8, max_new_tokens=0)


def test_sequence_parallel_pads_to_a_multiple_of_the_tp_size():
    """Megatron splits the sequence over the TP ranks: with TP=3 or TP=16 the padded length must divide."""
    from megatron_renio.config import TrainConfig, pad_multiple

    assert pad_multiple(TrainConfig(tensor_model_parallel_size=16)) == 8  # no sequence parallelism
    for tp, multiple in ((2, 8), (3, 24), (16, 16)):
        cfg = TrainConfig(tensor_model_parallel_size=tp, sequence_parallel=True)
        assert pad_multiple(cfg) == multiple
        batch = pack_pairs([[5, 6, 7]], [[5, 6, 7, 8, 9]], [[10, 11]], 1, 0, 96, pad_multiple(cfg))
        assert batch.seq_len % tp == 0 and batch.seq_len % 8 == 0 and batch.seq_len == multiple


def test_a_trimmed_micro_batch_keeps_every_token_and_drops_only_padding():
    """Rows 0-1 need 3 + 2 and 5 + 1 positions, row 2 (another micro-batch) 4 + 9: the first micro-batch is
    cut from the batch's 16 positions to 8, its grid from 9 columns to 2; nothing real changes."""
    batch = pack_pairs([[5, 6, 7], [5, 6, 7, 8, 9], [5, 6]], [[5, 6, 7], [5, 6, 7], [5, 6, 7, 8]],
                       [[10, 11], [12], [13] * 9], 1, 0, 64)
    assert (batch.seq_len, batch.completion_ids.shape[1]) == (16, 9)
    first = batch.rows(0, 2).trimmed(8)
    assert (first.seq_len, first.completion_ids.shape[1]) == (8, 2)
    whole = batch.rows(0, 2)
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        for side in ("student", "teacher"):
            full, cut = getattr(getattr(whole, side), name), getattr(getattr(first, side), name)
            assert torch.equal(cut, full[:, :8])
            if name != "position_ids":  # beyond the cut: padding only
                assert torch.equal(full[:, 8:], torch.full_like(full[:, 8:], 0))
    assert torch.equal(first.completion_mask.sum(1), whole.completion_mask.sum(1))
    assert torch.equal(first.student.gather_index, whole.student.gather_index[:, :2])
    last = batch.rows(2, 3).trimmed(8)
    assert (last.seq_len, last.completion_ids.shape[1]) == (16, 9)  # the longest row keeps the batch's lengths
    assert batch.rows(0, 2).trimmed(24).seq_len == 16  # never longer than the batch
    exact = batch.rows(2, 3).trimmed(1)  # the longer prompt decides: the teacher's 4 tokens + 9
    assert exact.seq_len == 13 and torch.equal(exact.teacher.tokens, batch.rows(2, 3).teacher.tokens[:, :13])


def test_longest_first_orders_samples_by_the_positions_they_fill_and_moves_every_field_with_them():
    """Rows need max(ps, pt) + c = 5, 13, 6, 14 positions: longest first is 3, 1, 2, 0 (a tie keeps its
    order); every tensor of both sides (and the grid) moves with its sample, so micro-batches of two pad
    to 16 and 8 positions instead of 16 and 16."""
    prompts_s, prompts_t = [[5, 6, 7], [5, 6], [5, 6, 7, 8, 9], [5]], [[5, 6, 7], [5, 6, 7, 8], [5, 6, 7], [5, 6, 7]]
    completions = [[10, 11], [13] * 9, [12], [14] * 11]
    batch = pack_pairs(prompts_s, prompts_t, completions, 1, 0, 64)
    assert batch.sequence_lengths().tolist() == [5, 13, 6, 14]
    order = batch.longest_first()
    assert order == [3, 1, 2, 0]
    moved = batch.reordered(order)
    alone = pack_pairs(*([lst[i] for i in order] for lst in (prompts_s, prompts_t, completions)), 1, 0, 64)
    for field in ("completion_ids", "completion_mask", "completion_lengths", "truncated"):
        assert torch.equal(getattr(moved, field), getattr(alone, field))
    for side in ("student", "teacher"):
        for name in ("tokens", "labels", "loss_mask", "position_ids", "gather_index", "prompt_lengths"):
            assert torch.equal(getattr(getattr(moved, side), name), getattr(getattr(alone, side), name))
    assert [mb.seq_len for mb in moved.micro_batches(2)] == [16, 8]
    assert [mb.seq_len for mb in batch.micro_batches(2)] == [16, 16]
    tied = pack_pairs([[5, 6]] * 3, [[5, 6]] * 3, [[7], [8, 9], [10]], 1, 0, 64)
    assert tied.longest_first() == [1, 0, 2]
