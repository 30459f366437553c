"""benchmarks/learning.py's entropy setting: its presets, the entropy curve it reads from a trainer's log and its
table (the runs themselves are benchmarks, not tests)."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def learning():
    return load_benchmark("learning")


def test_entropy_setting_presets(learning):
    args = learning.parse_args(["--setting", "entropy"])
    assert (args.budget, args.eval_every, args.learning_rate) == (25600, 1280, 1e-3)
    assert args.algos == ["trl_grpo", "clip_cov", "pf_ppo", "aepo", "entropy_adv", "gppo"]
    assert args.output_dir.endswith("results/entropy")
    assert learning.parse_args(["--setting", "entropy", "--learning-rate", "3e-3"]).learning_rate == 3e-3
    assert learning.parse_args([]).learning_rate == 1e-3  # the demo's
    overrides = {name: learning.SPECS_BY_NAME[name].overrides for name in args.algos[1:]}
    assert overrides == {
        "clip_cov": {"loss_type": "clip_cov"},
        "pf_ppo": {"policy_filtration": "best_of_n"},
        "aepo": {"aepo_target_entropy": 0.5},
        "entropy_adv": {"entropy_advantage_alpha": 0.4},
        "gppo": {"loss_type": "gppo"},
    }


def test_entropy_curve_and_table(learning):
    # trl_plus logs its generated completions; TRL's trainers do not, and generate BATCH_SIZE (64) per step.
    trl_plus_log = [
        {"loss": 0.1, "entropy": 2.0, "generation/completions": 80},
        {"eval": 1},
        {"loss": 0.2, "entropy": 1.0, "generation/completions": 160},
    ]
    trl_log = [{"loss": 0.1, "entropy": 2.0}, {"loss": 0.2, "entropy": 0.5}]
    assert learning.entropy_curve(trl_plus_log) == [(80, 2.0), (160, 1.0)]
    assert learning.entropy_curve(trl_log) == [(64, 2.0), (128, 0.5)]
    # The final entropy is the mean of the last 10 logged steps: here 11 steps of entropy 11, 10, ..., 1 -> 5.5.
    curve = [(64 * step, float(12 - step)) for step in range(1, 12)]
    assert learning.final_entropy(curve) == pytest.approx(5.5)
    runs = [
        {"algo": "aepo", "curve": [(0, 0.3), (1280, acc)], "entropy_curve": [(64, entropy)], "zero_variance": share}
        for acc, entropy, share in ((0.5, 0.4, 0.25), (0.7, 0.6, 0.75))
    ]
    for run in runs:
        run["samples"] = 1280
    row = learning.entropy_table(runs, ["aepo"]).splitlines()[-1]
    # accuracy (0.5 + 0.7) / 2 = 60%, sample std 14.1%; entropy 0.5 +- 0.141; all-equal share 50% +- 35.4%.
    assert row == "| aepo | 60.0% ± 14.1% | 0.500 ± 0.141 | 50.0% ± 35.4% | 1,280 |"


def test_entropy_at_starts_at_the_first_step(learning):
    # An AEPO step generates 80 completions (64 + its regularizer's 16): before its first point the curve holds the
    # first step's entropy, between points it is linear, after the last one it holds the last.
    curve = [(80, 2.0), (160, 1.0)]
    assert [learning.entropy_at(curve, x) for x in (0, 64, 80, 120, 160, 500)] == [2.0, 2.0, 2.0, 1.5, 1.0, 1.0]
