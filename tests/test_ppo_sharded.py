"""PPOTrainer's critic on sharded models: FSDP2 for real on 2 CPU processes (gloo), and `trl_plus.trainer.sharding`.

accelerate enables FSDP only for GPU distributed types, so `tests/distributed/check_ppo_fsdp.py` builds the trainer
as on CPU and shards its model with accelerate's own `fsdp2_prepare_model` (see its docstring). The 2-process sharded
run is compared with the 1-process unsharded one on the same global batch: FSDP2 averages the gradients over the
processes as DDP does, and TRL's token-mean loss divides each process's token sum by the global count / processes, so
the reduced gradients must equal the single-process ones up to float32 summation order (the reduce-scatter sums two
partial sums instead of one: a few 1e-8 here, against gradients of 0.2; 1e-6 leaves room and still catches any wrong
adapter, lost update or missing gather, which are 1e-2 or more).
DeepSpeed ZeRO-2 / ZeRO-3 (`check_ppo_deepspeed.py`: a real `DeepSpeedEngine` from `deepspeed.initialize`, on
DeepSpeed's CPU accelerator over gloo) run where `deepspeed` is installed (it is not a dependency: skipped
otherwise), against the same single-process run.
"""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_gloo, run_isolated, run_one_and_two_processes
from torch import nn

from trl_plus.trainer import sharding

CHECK_SCRIPT = Path(__file__).parent / "distributed" / "check_ppo_fsdp.py"
DEEPSPEED_SCRIPT = Path(__file__).parent / "distributed" / "check_ppo_deepspeed.py"
RUNS = ("lora/gc_off", "lora/gc_on", "value_model/gc_off", "value_model/gc_on")
ATOL = 1e-6


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model_path, tmp_path_factory):
    return run_one_and_two_processes(CHECK_SCRIPT, tiny_model_path, tmp_path_factory.mktemp("ppo-fsdp"), 600)


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_model_path, tmp_path_factory):
    """check_ppo_deepspeed.py on 2 processes: [(summary, tensors)] of rank 0 and 1."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: ZeRO-2 / ZeRO-3 are not exercised")
    out_dir = tmp_path_factory.mktemp("ppo-deepspeed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    command += [str(DEEPSPEED_SCRIPT), tiny_model_path, str(out_dir)]
    returncode, output = run_isolated(command, 900, extra_env={"DS_ACCELERATOR": "cpu"})
    assert returncode == 0, output[-8000:]
    return [(json.loads((out_dir / f"rank{r}.json").read_text()), torch.load(out_dir / f"rank{r}.pt")) for r in (0, 1)]


def is_critic(name: str) -> bool:
    return name.startswith(("value_head.", "value_model.")) or ".critic." in name


def assert_all_close(actual: dict, expected: dict, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0.0, msg=f"{what}: {name}")


@requires_gloo
def test_two_processes_really_ran_sharded(fsdp_runs):
    """Every trainable parameter of the 2-process runs is an FSDP2 shard (DTensor), the critic's included."""
    (single,) = fsdp_runs["single"]
    for summary, _ in fsdp_runs["two"]:
        assert summary["world_size"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
        for run in RUNS:
            kinds = summary["sharded"][run]
            assert len(kinds) > 10 and set(kinds.values()) == {"DTensor"}, run
            assert "value_head.weight" in kinds or "value_model.score.weight" in kinds, run
        assert summary["gradient_checkpointing"] == {run: run.endswith("gc_on") for run in RUNS}
    assert set(single[0]["sharded"]["lora/gc_off"].values()) == {"Parameter"}


@requires_gloo
@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_gradients_and_update_equal_the_unsharded_run(fsdp_runs, run):
    """The rollout's old values (critic forward through the root), the reduced gradients of the policy, the critic
    adapter / value model and the value head after one backward, and the weights after one SGD step (critic at twice
    the policy's learning rate) equal the single-process unsharded run's within 1e-6, on both processes."""
    (single,) = fsdp_runs["single"]
    expected = single[1][run]
    trainable = expected["gradients"]
    critic = [name for name in trainable if is_critic(name)]
    policy = [name for name in trainable if name not in critic]
    assert len(critic) >= 8 and len(policy) >= 8
    assert all(gradient.abs().max() > 1e-5 for gradient in trainable.values())  # every parameter gets a signal
    for summary, tensors in fsdp_runs["two"]:
        for kind in ("old_values", "gradients", "updated"):
            assert_all_close(tensors[run][kind], expected[kind], ATOL, f"{run} {kind} rank {summary['rank']}")


@requires_gloo
@pytest.mark.parametrize("critic", ["lora", "value_model"])
def test_fsdp2_critic_saves_from_the_full_state_dict_and_reloads_into_shards(fsdp_runs, critic):
    """`_save` with the full state dict FSDP2's `save_model` gathers writes the trained critic (adapter and value
    head, or the value model) exactly; the critic part of `_load_from_checkpoint` loads the value head (LoRA critic)
    or every value-model weight into a fresh sharded trainer exactly, on both processes, and they stay trainable."""
    for _, tensors in fsdp_runs["two"]:
        trained = tensors[f"{critic}/gc_off"]["updated"]
        saved = tensors[f"{critic}/restored"]["saved_files"]
        assert saved.keys() == {name for name in trained if is_critic(name)}
        for name, tensor in saved.items():
            torch.testing.assert_close(tensor, trained[name], atol=0.0, rtol=0.0, msg=name)
        restored = tensors[f"{critic}/restored"]["loaded"]
        weights = [name for name in restored if not name.startswith("requires_grad/")]
        assert len(weights) == (2 if critic == "lora" else 28)
        initial = tensors[f"{critic}/gc_off"]["initial"]
        for name in weights:
            torch.testing.assert_close(restored[name], trained[name], atol=0.0, rtol=0.0, msg=name)
        # the step changed the critic, so a reload that left the fresh (initial) critic would fail
        assert all((trained[name] - initial[name]).abs().max() > 0 for name in weights if "bias" not in name)
        assert all(restored[f"requires_grad/{name}"] for name in weights)


def test_forward_through_root_runs_inside_the_prepared_forward_and_restores_it(monkeypatch):
    """Unsharded: a plain call, the prepared model's forward and hooks untouched. Sharded (a wrapper whose forward
    calls the inner module's, as a DeepSpeed engine; under FSDP2 both are the same module): the function runs as the
    inner forward inside the wrapper's forward (its hooks see the call), and the inner module's forward is its own
    again afterwards, also after an error and also when it was an instance attribute (accelerate's autocast)."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args):
            return self.module(*args)

    calls = []
    inner = nn.Linear(2, 1)
    wrapper = Wrapper(inner)
    wrapper.register_forward_pre_hook(lambda module, args: calls.append("wrapper"))
    inner.register_forward_pre_hook(lambda module, args: calls.append("inner"))
    assert sharding.forward_through_root(wrapper, inner, lambda x: x * 2, torch.ones(1)).item() == 2.0
    assert calls == []

    monkeypatch.setattr(sharding, "needs_root_forward", lambda prepared: prepared is wrapper)
    assert sharding.forward_through_root(wrapper, inner, lambda x: x * 3, torch.ones(1)).item() == 3.0
    assert calls == ["wrapper", "inner"] and "forward" not in inner.__dict__
    own = inner.forward
    inner.forward = own
    with pytest.raises(ZeroDivisionError):
        sharding.forward_through_root(wrapper, inner, lambda x: 1 / 0, torch.ones(1))
    assert inner.__dict__["forward"] is own
    assert torch.equal(inner(torch.zeros(2)), inner.bias)  # the real forward again


def test_load_full_state_copies_into_plain_parameters_and_refuses_unknown_names():
    model = nn.Sequential(nn.Linear(2, 2))
    sharding.load_full_state(model, {"0.weight": torch.full((2, 2), 3.0)})
    assert torch.equal(model[0].weight, torch.full((2, 2), 3.0))
    with pytest.raises(KeyError, match="1.weight"):
        sharding.load_full_state(model, {"1.weight": torch.zeros(2, 2)})


def test_only_fsdp2_with_full_state_dicts_is_accepted():
    """accelerate's own plugin objects: FSDP2 saving full state dicts passes; FSDP1 (flat parameters the critic
    forward cannot gather) and sharded state dicts (the Trainer would not call `_save`, so no critic files) raise,
    naming the field and the valid choice."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    def plugin(**settings):
        return FullyShardedDataParallelPlugin(**{"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT", **settings})

    sharding.check_fsdp_plugin(None)
    sharding.check_fsdp_plugin(plugin())
    with pytest.raises(ValueError, match=r"`fsdp_version` is 1; valid: 2"):
        sharding.check_fsdp_plugin(plugin(fsdp_version=1))
    with pytest.raises(ValueError, match=r"`fsdp_state_dict_type` is .*SHARDED_STATE_DICT; valid: FULL_STATE_DICT"):
        sharding.check_fsdp_plugin(plugin(state_dict_type="SHARDED_STATE_DICT"))


def test_a_deepspeed_optimizer_section_with_a_separate_critic_learning_rate_is_refused():
    """With an `optimizer` section DeepSpeed trains every parameter at its one learning rate: refused when the critic's
    differs (naming the field and the way out), accepted when it is the policy's or the section is absent."""
    with_optimizer = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-6}}, "zero_optimization": {"stage": 3}}
    sharding.check_deepspeed_optimizer(None, 2e-6, 1e-6)
    sharding.check_deepspeed_optimizer({"zero_optimization": {"stage": 3}}, 2e-6, 1e-6)
    sharding.check_deepspeed_optimizer(with_optimizer, 1e-6, 1e-6)
    with pytest.raises(
        ValueError, match=r"`critic_learning_rate` is 2e-06 \(the policy's: 1e-06\).*without `optimizer`"
    ):
        sharding.check_deepspeed_optimizer(with_optimizer, 2e-6, 1e-6)


def test_a_lora_value_model_with_sharded_parameters_is_refused():
    """A LoRA-adapted value model saves its adapter from its own tensors: refused where they are shards (FSDP2,
    ZeRO-3), accepted where they are whole (one process, DDP, ZeRO-2) and for the other critics."""
    accepted = [(True, False, None), (True, False, 2), (False, True, None), (False, False, 3)]
    for value_model_is_lora, fsdp, zero_stage in accepted:
        sharding.check_lora_value_model_unsharded(value_model_is_lora, fsdp, zero_stage)
    with pytest.raises(NotImplementedError, match="not supported under FSDP2 yet"):
        sharding.check_lora_value_model_unsharded(True, True, None)
    with pytest.raises(NotImplementedError, match="not supported under DeepSpeed ZeRO-3 yet"):
        sharding.check_lora_value_model_unsharded(True, False, 3)


def test_value_pretraining_under_deepspeed_warns(caplog):
    """DeepSpeed steps the frozen policy's groups during value pretraining: a warning that names the fix, only when
    both are on."""
    with caplog.at_level(logging.WARNING, logger="trl_plus.trainer.sharding"):
        sharding.warn_value_pretraining_under_deepspeed(0, True)
        sharding.warn_value_pretraining_under_deepspeed(50, False)
        assert caplog.records == []
        sharding.warn_value_pretraining_under_deepspeed(50, True)
    assert len(caplog.records) == 1 and "value_pretrain_steps=50 under DeepSpeed" in caplog.text
    assert "weight_decay=0" in caplog.text


def test_fsdp2_example_config_gives_a_plugin_ppo_accepts(monkeypatch):
    """`examples/accelerate_configs/fsdp2.yaml` through `accelerate launch`'s own parsing and environment: the plugin
    a training process builds from it is FSDP2 with full state dicts and transformer-layer wrapping; the same config
    with sharded state dicts is refused."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    config = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "examples/vapo.py"])
    args, _, _ = _validate_launch_command(args)
    environment = prepare_multi_gpu_env(args)
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for name, value in environment.items():
        if name.startswith("FSDP_"):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.reshard_after_forward is True
    sharding.check_fsdp_plugin(plugin)
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    with pytest.raises(ValueError, match="fsdp_state_dict_type"):
        sharding.check_fsdp_plugin(FullyShardedDataParallelPlugin())


DEEPSPEED_RUNS = [
    (stage, critic, gc)
    for stage in (2, 3)
    for critic in ("lora", "value_model")
    for gc in ("off", "on")
    if stage == 3 or gc == "off"
]


@requires_gloo
@pytest.mark.parametrize(("stage", "critic", "gc"), DEEPSPEED_RUNS)
def test_deepspeed_gradients_and_update_equal_the_unsharded_run(fsdp_runs, deepspeed_runs, stage, critic, gc):
    """On a ZeRO-2 / ZeRO-3 engine (ZeRO-3: every parameter partitioned, the critic's included): the rollout's old
    values, the reduced full gradients and the updated fp32 weights of every trainable parameter equal the
    single-process unsharded run's within 1e-6, on both processes, with gradient checkpointing as asked."""
    expected = fsdp_runs["single"][0][1][f"{critic}/gc_{gc}"]
    run = f"zero{stage}/{critic}/gc_{gc}"
    for summary, tensors in deepspeed_runs:
        engine = summary["engines"][run]
        assert engine["engine"] == "DeepSpeedEngine" and engine["stage"] == stage
        assert engine["partitioned"] == [stage == 3] and engine["gradient_checkpointing"] == [gc == "on"]
        for kind in ("old_values", "gradients", "updated"):
            assert_all_close(tensors[run][kind], expected[kind], ATOL, f"{run} {kind} rank {summary['rank']}")


@requires_gloo
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("critic", ["lora", "value_model"])
def test_deepspeed_critic_saves_from_the_gathered_state_dict_and_resumes_from_the_engine_checkpoint(
    fsdp_runs, deepspeed_runs, stage, critic
):
    """`_save` with the state dict `Trainer.save_model` gathers under DeepSpeed writes the trained critic (adapter and
    value head, or the value model) exactly; DeepSpeed's engine checkpoint, which a Trainer resume loads, restores it
    exactly into a fresh engine."""
    initial = fsdp_runs["single"][0][1][f"{critic}/gc_off"]["initial"]
    for _, tensors in deepspeed_runs:
        trained = tensors[f"zero{stage}/{critic}/gc_off"]["updated"]
        restored = tensors[f"zero{stage}/{critic}/restored"]
        critic_names = {name for name in trained if is_critic(name)}
        for kind in ("saved_files", "engine_checkpoint"):
            assert restored[kind].keys() == critic_names, kind
            for name in critic_names:
                torch.testing.assert_close(restored[kind][name], trained[name], atol=0.0, rtol=0.0, msg=name)
        assert all((trained[name] - initial[name]).abs().max() > 0 for name in critic_names if "bias" not in name)
