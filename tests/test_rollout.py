"""The on-policy rollout: sampling rules, and generation with the KV cache on Megatron's GPTModel
under TP=1, TP=2 (with and without sequence parallelism) and PP=2, compared with full recompute
and across layouts (one torchrun launch, see tests/workers/rollout_worker.py)."""

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.rollout.sampling import SamplingConfig, sample_next
from tests.torchrun_harness import REPO_ROOT, run_torchrun

WORKER = REPO_ROOT / "tests" / "workers" / "rollout_worker.py"
LAYOUTS = ("tp1", "tp2", "tp2_sp", "pp2")
PROMPT_LENGTHS = (5, 3, 8, 4)  # the worker's PROMPTS
MAX_NEW, VOCAB, DEFAULT_EOS = 12, 250, 249


# ---------------------------------------------------------------- sampling (no process group)


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(temperature=0.0), "--rollout-temperature"),
        (dict(temperature=-1.0), "--rollout-temperature"),
        (dict(temperature=-1.0, greedy=True), "--rollout-temperature"),
        (dict(top_p=0.0), "--rollout-top-p"),
        (dict(top_p=1.5), "--rollout-top-p"),
        (dict(top_k=-1), "--rollout-top-k"),
        (dict(top_k=2.5), "--rollout-top-k"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
    ],
)
def test_sampling_config_validation_names_the_flag(changes, flag):
    kwargs = dict(max_new_tokens=8) | changes
    with pytest.raises(UserInputError, match=flag):
        SamplingConfig(**kwargs).validate()


def test_sampling_config_defaults_are_valid():
    cfg = SamplingConfig(max_new_tokens=1)
    cfg.validate()
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.greedy) == (1.0, 1.0, 0, False)


def _draws(logits_row, cfg, n=4000, seed=0):
    logits = torch.tensor(logits_row, dtype=torch.float32).expand(n, -1)
    return sample_next(logits, cfg, torch.Generator().manual_seed(seed))


def test_temperature_zero_is_allowed_only_with_greedy():
    SamplingConfig(max_new_tokens=1, greedy=True, temperature=0.0).validate()
    with pytest.raises(UserInputError, match=r"> 0 \(or 0 with greedy decoding\), got 0.0"):
        SamplingConfig(max_new_tokens=1, temperature=0.0).validate()


def test_greedy_is_argmax_and_uses_no_randomness():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(max_new_tokens=1, greedy=True, temperature=3.0, top_p=0.1)
    assert torch.equal(sample_next(logits, cfg, None), logits.argmax(-1))
    assert torch.equal(sample_next(logits, SamplingConfig(max_new_tokens=1, top_k=1), torch.Generator()), logits.argmax(-1))


def test_sampling_follows_the_tempered_distribution_with_the_given_generator_only():
    row = [2.0, 1.0, 0.0, -1.0]
    global_state = torch.get_rng_state()
    for temperature in (1.0, 2.0):
        draws = _draws(row, SamplingConfig(max_new_tokens=1, temperature=temperature), n=20000)
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        expected = torch.softmax(torch.tensor(row) / temperature, -1)
        assert torch.allclose(freq, expected, atol=0.015), (temperature, freq, expected)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_top_k_and_top_p_restrict_the_support():
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert set(_draws(row, SamplingConfig(max_new_tokens=1, top_k=2)).tolist()) == {0, 1}
    assert set(_draws(row, SamplingConfig(max_new_tokens=1, top_p=0.7)).tolist()) == {0, 1}
    assert set(_draws(row, SamplingConfig(max_new_tokens=1, top_p=0.85)).tolist()) == {0, 1, 2}
    assert set(_draws(row, SamplingConfig(max_new_tokens=1, top_p=0.3)).tolist()) == {0}  # the top token stays
    assert set(_draws(row, SamplingConfig(max_new_tokens=1, top_k=3, top_p=0.9)).tolist()) == {0, 1, 2}


def _swept(logits_row, cfg, n=1000):
    """Tokens drawn for one row with the uniforms (k + 0.5) / n, k < n: a deterministic sweep of
    [0, 1), so every token of the support is drawn about n times its probability."""
    logits = torch.tensor(logits_row, dtype=torch.float32).expand(n, -1)
    return sample_next(logits, cfg, uniforms=(torch.arange(n, dtype=torch.float64) + 0.5) / n)


def _log(probs):
    return torch.log(torch.tensor(probs)).tolist()


def test_top_p_keeps_the_most_likely_tokens_wherever_they_sit_in_the_vocabulary():
    """The nucleus is chosen in probability order but applies to the tokens' own ids: with the most
    likely tokens at the end of the vocabulary, top_p=0.7 keeps tokens 3 (0.5) and 2 (0.3), drawn in
    proportion 0.5 : 0.3."""
    draws = _swept(_log([0.05, 0.15, 0.3, 0.5]), SamplingConfig(max_new_tokens=1, top_p=0.7), n=800)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert set(draws.tolist()) == {2, 3}
    assert abs(counts[3] - 500) <= 1 and abs(counts[2] - 300) <= 1, counts
    # A shuffled vocabulary: 0.4 at id 1, 0.35 at id 3 reach 0.7; 0.15 (id 0) and 0.1 (id 2) are dropped.
    draws = _swept(_log([0.15, 0.4, 0.1, 0.35]), SamplingConfig(max_new_tokens=1, top_p=0.7))
    assert set(draws.tolist()) == {1, 3}


def test_top_p_applies_to_the_tempered_top_k_distribution():
    """top_p is taken on the distribution after the temperature and the top-k cut, not on the raw
    logits."""
    # temperature 2: probabilities ~ sqrt([.6, .3, .1]) = [.47, .33, .19]; .47 < .5, so token 1 stays
    # (on the raw probabilities .6 alone would reach .5)
    hot = SamplingConfig(max_new_tokens=1, temperature=2.0, top_p=0.5)
    assert set(_swept(_log([0.6, 0.3, 0.1]), hot).tolist()) == {0, 1}
    # top_k=2 renormalises [.4, .35] to [.53, .47]: .53 alone reaches .5 (on the raw probabilities
    # .4 would not, and token 1 would stay)
    cut = SamplingConfig(max_new_tokens=1, top_k=2, top_p=0.5)
    assert set(_swept(_log([0.4, 0.35, 0.25]), cut).tolist()) == {0}


def test_top_p_equal_to_the_top_probability_keeps_the_top_token_only():
    """'The smallest set whose probability reaches top_p': when the most likely token's probability
    equals top_p exactly, that token alone reaches it."""
    row = _log([0.5, 0.3, 0.2])
    top = float(torch.tensor(row).softmax(-1)[0])
    assert top == 0.5  # exact in float32, so the boundary is hit exactly
    assert set(_swept(row, SamplingConfig(max_new_tokens=1, top_p=top)).tolist()) == {0}
    # just above it the second token is needed
    assert set(_swept(row, SamplingConfig(max_new_tokens=1, top_p=0.51)).tolist()) == {0, 1}


def test_greedy_ties_go_to_the_lowest_index():
    """Greedy decoding takes the argmax; among equal maxima, the lowest token id."""
    cfg = SamplingConfig(max_new_tokens=1, greedy=True)
    logits = torch.tensor([[0.0, 5.0, 5.0], [5.0, 5.0, 5.0], [-1.0, 3.0, 2.0], [1.0, 2.0, 2.0]])
    assert sample_next(logits, cfg).tolist() == [1, 0, 1, 1]
    assert sample_next(torch.tensor([[0.0, 5.0, 5.0]]), cfg).tolist() == [1]


def test_a_tiny_temperature_samples_the_argmax_not_the_last_column():
    """logits / 1e-40 overflowed to inf and softmax to NaN, and every row drew the last column; shifted to a
    maximum of 0 first, the tempered distribution is one-hot at the argmax (as greedy)."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [7.0, 1.0, 6.5, 0.0]])
    for temperature in (1e-40, 1e-300):
        cfg = SamplingConfig(temperature=temperature, max_new_tokens=1)
        for u in (0.0, 0.5, 0.999999):
            assert sample_next(logits, cfg, uniforms=torch.full((2,), u)).tolist() == [1, 0]


def test_same_generator_seed_same_tokens():
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.3, top_p=0.95)
    row = torch.randn(100, generator=torch.Generator().manual_seed(2)).tolist()
    assert torch.equal(_draws(row, cfg, n=64, seed=5), _draws(row, cfg, n=64, seed=5))
    assert not torch.equal(_draws(row, cfg, n=64, seed=5), _draws(row, cfg, n=64, seed=6))


# ---------------------------------------------------------------- generation (torchrun, 2 ranks)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_torchrun(WORKER, 2, tmp_path_factory.mktemp("rollout"))


def _through_first(completion, eos):
    return completion[: completion.index(eos) + 1] if eos in completion else completion


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_equals_full_recompute(ranks, layout):
    r = ranks[0][layout]
    assert r["greedy_kv"] == r["greedy_full"]
    assert r["eos_kv"] == r["eos_full"]
    assert r["sampled_a"] == r["sampled_full"]  # same seed, same draws (fp32 logits agree closely)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_parallel_layouts_give_the_tp1_greedy_tokens(ranks, layout):
    assert ranks[0][layout]["greedy_kv"] == ranks[0]["tp1"]["greedy_kv"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_returns_the_same_completions(ranks, layout):
    per_rank = [{k: v for k, v in rank[layout].items() if k != "sp_flags"} for rank in ranks]
    assert per_rank[0] == per_rank[1]


@pytest.mark.parametrize("layout", ("tp2", "tp2_sp"))
def test_tp_rank_0_decides_the_tokens(ranks, layout):
    """Under TP, TP rank 0's sampled tokens are broadcast: when rank 1's sampler would pick other
    tokens, both ranks still return rank 0's (the unperturbed greedy) completions."""
    for rank in ranks:
        assert rank[layout]["rank1_disagrees"] == ranks[0][layout]["greedy_kv"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampling_with_a_seed_is_reproducible(ranks, layout):
    r = ranks[0][layout]
    assert r["sampled_a"] == r["sampled_a_again"]
    assert r["sampled_a"] != r["sampled_b"]
    assert r["sampled_a"] != r["greedy_kv"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generating_in_turns_draws_what_one_batch_draws(ranks, layout):
    """max_batch (train's --rollout-batch-size): the prompts in turns of at most that many, with the
    sampling noise still keyed by row and the per-prompt limits following their prompts."""
    r = ranks[0][layout]
    assert r["sampled_in_turns"] == (r["sampled_a"], sum(map(len, r["sampled_a"])), [3, 1])  # KV caches of 3, 1 rows
    assert r["row_limits_in_turns"] == r["row_limits"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eos_and_length_limits(ranks, layout):
    r = ranks[0][layout]
    greedy, eos = r["greedy_kv"], r["eos_id"]
    for completion in greedy:  # the default EOS stops a completion, otherwise max_new_tokens does
        assert len(completion) == MAX_NEW or completion[-1] == DEFAULT_EOS
        assert DEFAULT_EOS not in completion[:-1]
    assert r["greedy_kv_generated"] == sum(map(len, greedy))
    assert r["eos_kv"] == [_through_first(c, eos) for c in greedy]
    assert r["eos_kv"][0][-1] == eos and 4 <= len(r["eos_kv"][0]) < MAX_NEW
    assert r["eos_among_stop_ids"] == r["eos_kv"]  # the same id as the second of two stop ids
    assert r["short"] == [c[:3] for c in greedy]
    # max_sequence_length 10 bounds prompt + completion
    assert r["seq_limit"] == [c[: 10 - n] for c, n in zip(greedy, PROMPT_LENGTHS)]
    # a per-prompt limit (what a longer teacher prompt leaves) bounds each completion, MAX_NEW still applies
    assert r["row_limits"] == r["row_limits_full"] == [c[:n] for c, n in zip(greedy, (1, 5, 2, MAX_NEW))]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompts_of_different_lengths_decode_as_if_alone(ranks, layout):
    r = ranks[0][layout]
    assert r["greedy_alone"] == r["greedy_kv"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ended_samples_leave_the_batch_without_changing_the_others(ranks, layout):
    """Prompts of 5, 3, 8 and 4 tokens end their 12 new tokens at different steps: the batch shrinks
    (running rows moved to the front of the KV cache) and every completion equals the one decoded
    with the whole batch kept to the end."""
    r = ranks[0][layout]
    assert r["compacted_to"] == [3, 2, 1]
    assert r["greedy_whole_batch"] == r["greedy_kv"]


@pytest.mark.parametrize("layout", ("tp1", "tp2", "tp2_sp"))
def test_padded_vocabulary_rows_are_never_sampled(ranks, layout):
    r = ranks[0][layout]
    assert r["unmasked_argmax"] >= VOCAB  # the boosted padded rows would win without the mask
    for key in ("pad_greedy", "pad_hot"):
        tokens = [t for c in r[key] for t in c]
        assert tokens and max(tokens) < VOCAB


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_logits_are_flagged_on_every_rank(ranks, layout):
    """A NaN weight (the last stage's final norm: every logit NaN) sets ``nonfinite`` on every rank of the
    model-parallel group (under PP the first stage learns it from the last), with the KV cache or
    without, greedy or sampled; generation still runs to its limits (it does not raise). Finite
    logits leave it False, and so does a later call on the restored weights."""
    for rank in ranks:
        r = rank[layout]
        assert r["finite_flags"] == [False, False]
        flags, lengths = r["nan_model"]
        assert flags == [True, True, True]
        assert lengths == [MAX_NEW] * len(PROMPT_LENGTHS)  # argmax of NaN rows is no EOS: every limit is reached
        assert r["after_nan_model"] is False
        assert r["transient_nan"] == [True, False]  # kept through later finite steps; a prompt row draws nothing


@pytest.mark.parametrize("layout", ("tp1", "tp2", "tp2_sp"))
def test_non_finite_padded_vocabulary_columns_are_not_flagged(ranks, layout):
    """NaN in Megatron's padded vocabulary columns only (never sampled, not the model's output): the
    flag stays False and the greedy completions are those of the unpadded weights."""
    for rank in ranks:
        completions, flag = rank[layout]["pad_nan"]
        assert flag is False
        assert completions == rank[layout]["greedy_kv"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_state_is_restored(ranks, layout):
    r = ranks[0][layout]
    assert r["training_restored"] is True
    if "sp_flags" in r:  # sequence-parallel flags of the config and modules, before and after
        before, after = r["sp_flags"]
        assert before == after
        assert all(before) == (layout == "tp2_sp")


def test_bad_inputs_are_one_line_user_errors(ranks):
    messages = ranks[0]["tp1"]["input_errors"]
    assert None not in messages
    expected = ["at least one prompt", "prompt 1 has 0 tokens", "prompt 0 has 64 tokens", "prompt 0 holds token ids",
                "EOS ids [250]", "EOS ids []", "--max-new-tokens", "limits must hold one bound of at least 1 per "
                "prompt, got [1, 1, 0, 1]", "got [1, 1]"]
    assert len(messages) == len(expected)
    for message, fragment in zip(messages, expected):
        assert fragment in message and "\n" not in message
