"""A real 2-process run of `trl_plus.GRPOTrainer` (torchrun, gloo on CPU) against the single-process result.

`tests/distributed/check_two_process.py` (its docstring has the details) runs each trainer configuration through TRL's
real `_generate_and_score_completions` (fixed completions from a `rollout_func`, fixed rewards) and `_compute_loss`
plus `backward`, on two layouts of the same 12 completions, and saves per sample id the token advantages and the
process-averaged (as DDP) gradient. It runs twice here: once with `python` (1 process) and once with
`torchrun --nproc_per_node 2` (`accelerate launch --cpu --num_processes 2` would start only one process). Each run
checks itself against the definitions (REINFORCE++ whitening over the global batch, token_mean over the global token
count); the tests below also compare the runs with each other.
"""

from pathlib import Path

import check_two_process as script  # for its constants: CONFIGS, LAYOUTS
import pytest
import torch
from conftest import requires_gloo, run_one_and_two_processes
from torch.testing import assert_close

SCRIPT = Path(__file__).parent / "distributed" / "check_two_process.py"
ADVANTAGE_ATOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4  # gradient entries are up to ~0.2; observed differences ~1e-7

pytestmark = requires_gloo


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """{"single": [rank 0], "two": [rank 0, rank 1]}, each (summary, tensors); both runs must exit 0."""
    return run_one_and_two_processes(SCRIPT, tiny_model_path, tmp_path_factory.mktemp("distributed"))


def test_two_processes_really_ran(runs):
    for rank, (summary, _) in enumerate(runs["two"]):
        assert summary["world_size"] == 2
        assert summary["num_processes"] == 2  # trainer.accelerator.num_processes
        assert summary["process_index"] == rank
        assert summary["distributed_type"] == "DistributedType.MULTI_CPU"
        assert summary["backend"] == "gloo"
    single, _ = runs["single"][0]
    assert single["num_processes"] == 1 and single["backend"] is None


def test_every_run_matches_the_definitions(runs):
    """Each process's own checks: advantages, gradients, loss and token count against the full-batch math."""
    kinds = ("advantages", "grad", "loss", "num_items_in_batch", "padding_advantages")
    layouts = [f"{config}/{layout}" for config in script.CONFIGS for layout in script.LAYOUTS]
    expected = {f"{kind}/{config_layout}" for kind in kinds for config_layout in layouts}
    assert len(expected) == 5 * 5 * 2
    for name, ranks in runs.items():
        for summary, _ in ranks:
            checks = summary["checks"]
            assert expected <= set(checks), f"{name}: checks missing: {expected - set(checks)}"
            failed = {key: value for key, value in checks.items() if not value["ok"]}
            assert not failed, f"{name} rank {summary['rank']} mismatches: {failed}"
            assert summary["failures"] == []


def test_masked_whiten_with_all_reduce_equals_full_batch(runs):
    for summary, _ in runs["two"]:
        for name in ("masked_whiten/all_reduce_vs_full", "masked_whiten/full_vs_definition"):
            result = summary["checks"][name]
            assert result["ok"], (name, result)
            assert result["max_abs_err"] <= 1e-5 and result["max_abs_expected"] > 1.0


def test_layouts_split_tokens_differently_and_a_group_straddles(runs):
    """The two layouts really put different rows, token counts and padding widths on each process."""
    _, rank0 = runs["two"][0]
    _, rank1 = runs["two"][1]
    in_order = "groups_in_order"
    rotated = "groups_rotated_rows_reversed"
    for config in script.CONFIGS:
        first, second = rank0["results"][config], rank1["results"][config]
        # groups_in_order: process 0 has samples 0-5 (1+2+3+2+5+3 = 16 tokens, padded to 5),
        # process 1 samples 6-11 (8+4+7+6+8+5 = 38 tokens, padded to 8); group 1 (samples 4-7) straddles.
        assert first[in_order]["local_samples"] == [0, 1, 2, 3, 4, 5]
        assert (first[in_order]["local_valid_tokens"], first[in_order]["local_width"]) == (16, 5)
        assert (second[in_order]["local_valid_tokens"], second[in_order]["local_width"]) == (38, 8)
        # rotated: process 0 has samples 11, 10, 9, 8, 3, 2 (5+8+6+7+2+3 = 31), process 1 the other 23 tokens;
        # group 0 (samples 0-3) straddles.
        assert first[rotated]["local_samples"] == [11, 10, 9, 8, 3, 2]
        assert (first[rotated]["local_valid_tokens"], second[rotated]["local_valid_tokens"]) == (31, 23)
        for layout in script.LAYOUTS:
            assert first[layout]["num_items_in_batch"] == second[layout]["num_items_in_batch"] == 54.0


@pytest.mark.parametrize("config", list(script.CONFIGS))
def test_advantages_equal_single_process_and_do_not_depend_on_the_split(runs, config):
    _, single = runs["single"][0]
    reference = single["results"][config]["groups_in_order"]["advantages"]
    assert reference.abs().max() > 1.0
    mask = single["samples"]["completion_mask"].bool()
    if "policy_filtration" not in script.CONFIGS[config]:  # whitened: unit variance over the valid tokens
        assert_close(reference[mask].var(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
        assert_close(reference[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    for rank, (_, tensors) in enumerate(runs["two"]):
        for layout in script.LAYOUTS:
            advantages = tensors["results"][config][layout]["advantages"]
            message = f"{config}, layout {layout}, rank {rank}: 2-process advantages differ from 1-process"
            assert_close(advantages, reference, atol=ADVANTAGE_ATOL, rtol=0, msg=message)
    for layout in script.LAYOUTS:  # the single-process run on the other layout too
        assert_close(single["results"][config][layout]["advantages"], reference, atol=ADVANTAGE_ATOL, rtol=0)


@pytest.mark.parametrize("config", list(script.CONFIGS))
def test_token_mean_gradient_equals_single_process_and_does_not_depend_on_the_split(runs, config):
    _, single = runs["single"][0]
    reference = single["results"][config]["groups_in_order"]["grad"]
    assert reference.norm() > 0.1
    reference_loss = single["results"][config]["groups_in_order"]["loss"]
    for rank, (_, tensors) in enumerate(runs["two"]):
        for layout in script.LAYOUTS:
            result = tensors["results"][config][layout]
            message = f"{config}, layout {layout}, rank {rank}: averaged 2-process gradient differs from 1-process"
            assert_close(result["grad"], reference, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=message)
            assert_close(result["loss"], reference_loss, atol=1e-6, rtol=0)
    for layout in script.LAYOUTS:
        assert_close(single["results"][config][layout]["grad"], reference, atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_registry_token_mean_equals_trl_dapo(runs):
    """loss_aggregation='token_mean' (trl_plus registry) and TRL's own 'dapo' give the same gradient."""
    for name, ranks in runs.items():
        for summary, tensors in ranks:
            assert summary["configs"]["reinforce_pp/dapo"]["registry_policy_loss"] is None  # TRL's _compute_loss
            assert summary["configs"]["reinforce_pp/token_mean"]["registry_policy_loss"] == "ppo_clip"
            for layout in script.LAYOUTS:
                dapo = tensors["results"]["reinforce_pp/dapo"][layout]["grad"]
                registry = tensors["results"]["reinforce_pp/token_mean"][layout]["grad"]
                assert_close(registry, dapo, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=f"{name}, {layout}")


def test_kl_in_reward_and_baseline_change_the_advantages(runs):
    """Guards against vacuous checks: the KL term and the group baseline move the advantages measurably."""
    _, tensors = runs["two"][0]
    results = tensors["results"]
    plain = results["reinforce_pp/dapo"]["groups_in_order"]["advantages"]
    with_kl = results["reinforce_pp/kl_in_reward"]["groups_in_order"]["advantages"]
    baseline = results["reinforce_pp_baseline/token_mean"]["groups_in_order"]["advantages"]
    assert tensors["reference"]["reinforce_pp/kl_in_reward"]["kl_max"] > 0.1
    assert (with_kl - plain).abs().max() > 1e-2
    assert (baseline - plain).abs().max() > 1e-1


def test_policy_filtration_weighs_each_sample_on_every_split(runs):
    """PF-PPO's max_random weights (2.0 on each group's best, 0.5 elsewhere, normalized over both processes) are the
    ratio of the filtered advantages to the plain ones, on every layout and process count."""
    weights = torch.tensor(script.PF_WEIGHTS).unsqueeze(1)
    for name, ranks in runs.items():
        for _, tensors in ranks:
            for layout in script.LAYOUTS:
                plain = tensors["results"]["reinforce_pp/token_mean"][layout]["advantages"]
                filtered = tensors["results"]["reinforce_pp/pf_max_random"][layout]["advantages"]
                assert_close(filtered, plain * weights, atol=ADVANTAGE_ATOL, rtol=0, msg=f"{name}, {layout}")
                assert (filtered - plain).abs().max() > 0.5


def test_both_processes_hold_the_same_reduced_results(runs):
    (_, rank0), (_, rank1) = runs["two"]
    for config in script.CONFIGS:
        for layout in script.LAYOUTS:
            first, second = rank0["results"][config][layout], rank1["results"][config][layout]
            assert torch.equal(first["advantages"], second["advantages"])
            assert torch.equal(first["grad"], second["grad"])


TTRL_SCRIPT = Path(__file__).parent / "distributed" / "check_ttrl.py"


def test_ttrl_vote_only_completions_are_gathered_across_processes(tiny_model_path, tmp_path):
    # check_ttrl.py: 3 groups of 4 trained rows plus 8 vote-only completions each; group q1 straddles the processes
    # and its label (y) needs the other process's votes. Each run checks the gathered rewards against the vote
    # counted by hand and the 36 generated completions; here both runs must agree and really be 1 and 2 processes.
    results = run_one_and_two_processes(TTRL_SCRIPT, tiny_model_path, tmp_path)
    assert [summary["num_processes"] for summary, _ in results["single"] + results["two"]] == [1, 2, 2]
    expected = torch.tensor([0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0], dtype=torch.float)  # labels b, y, m
    for summary, tensors in results["single"] + results["two"]:
        assert summary["failures"] == []
        assert_close(tensors["rewards"], expected)
