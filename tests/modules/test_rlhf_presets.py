"""RLHF modules under the project's CPU presets: PPO's separate value model under DDP, GRPO and PPO under TP.

**DDP** (``configs/trainer/cpu_ddp.yaml``: ``find_unused_parameters: false``). A separate value model (and a reward
model being trained) reads its backbone's hidden states and never its ``lm_head``; left trainable, that head gets no
gradient, and Lightning's DDP stops at the second backward ("It looks like your LightningModule has parameters that
were not used in producing the loss", raised by ``prepare_for_backward``; measured before the fix, on both ranks). The
modules freeze that head (:func:`~lightning_llm.modules.reward_model.freeze_lm_head`): every trainable parameter
gets a gradient in every backward (checked in one process below), and 2 gloo processes train PPO (policy,
reference, value model initialised from a reward model, reward model) and the reward model in sync: after training
every parameter is bitwise equal on both ranks (identical all-reduced gradients, identical optimiser steps), although
the ranks sampled different prompts.

**Tensor parallelism** (``configs/trainer/cpu_fsdp2_tp.yaml``: t=2, so one data-parallel rank). GRPO (policy,
reference, reward model) and PPO (policy, reference, value model, reward model; marked slow: a launch pair of its
own) train 2 rollouts; every transformer is split by heads. Reference: the same module, seed and batch in ONE process (the two tensor-parallel ranks read the
same batch and sample with the same generator, seeded by the data-parallel rank, 0). The policy has 4 query and 4
key/value heads, so each rank holds 2 key/value heads: its KV cache must be sized to them (with 2 key/value heads over
t=2, the one local head broadcast into a 2-head cache hid that bug).

Tolerance of the first step's statistics (the losses included): rtol=1e-5, atol=1e-5, as the other distributed tests.
fp32; the runs differ only in reduction order: the row-parallel o/down projections add two partial sums (each over
half the features) with an all-reduce, and the replicated parameters' gradients are all-reduced partial sums. Measured
differences at step 1 are at most 2.4e-7 (GRPO's entropy, 2.6: relative 1e-7; its loss, -0.065, differs by 3e-8) and
6e-8 for PPO, 40x inside the tolerance. Later steps are compared through their sampled tokens (identical at every
step); their statistics drift by up to 6e-6 (PPO's KL, 0.14: Adam turns 1e-7 gradient differences into update
differences over 4 optimiser steps), so they are not held to the first step's tolerance.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = HERE / "_rlhf_presets_worker.py"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _launch import run_all  # noqa: E402
from test_rlhf_fsdp2 import _reward_checkpoint  # noqa: E402  (the same random reward model)

TIMEOUT = 420
TOL = {"rtol": 1e-5, "atol": 1e-5}
#: the default launches (in parallel); PPO under tensor parallelism, a launch pair of its own, is marked slow
LAUNCHES = {"ddp": ["ppo:ddp", "reward:ddp"], "tp": ["grpo:tp"], "single": ["grpo:single"]}
SLOW_LAUNCHES = {"tp": ["ppo:tp"], "single": ["ppo:single"]}


def _launch(out: Path, launches: dict[str, list[str]]) -> dict[str, tuple[dict, dict]]:
    """Run the launches in parallel; ``{"<module>_<layout>": (json result, tensors)}``."""
    ckpt = _reward_checkpoint(out / "rm.ckpt")
    commands = {
        name: [sys.executable, str(WORKER), "--runs", ",".join(items), "--n-kv-head", "4", "--reward-ckpt", str(ckpt),
               "--out", str(out)]
        for name, items in launches.items()
    }  # fmt: skip
    run_all(commands, out, ROOT, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, TIMEOUT)
    return {p.stem: (json.loads(p.read_text()), torch.load(p.with_suffix(".pt"))) for p in out.glob("*.json")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    return _launch(tmp_path_factory.mktemp("rlhf_presets"), LAUNCHES)


def _slices(result: dict) -> dict[str, slice]:
    """Each parameter's slice of the flattened vectors the worker saved."""
    out, start = {}, 0
    for name, n in zip(result["names"], result["numels"]):
        out[name] = slice(start, start + n)
        start += n
    return out


def _assert_trained(result: dict, tensors: dict) -> None:
    """Finite statistics at every step, and the trainable parameters moved."""
    assert result["steps"] and all(math.isfinite(v) for row in result["steps"] for v in row.values())
    change = (tensors["final"] - tensors["initial"]).abs()
    assert torch.isfinite(tensors["final"]).all() and change.max() > 1e-3


# ---------------------------------------------------------------------------------------------------- one process
def _prompts():
    from lightning_llm.data.prompts import PromptDataModule

    dm = PromptDataModule(num_train=16, num_val=8, batch_size=4)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("value_model", ["separate_from_reward_model", "separate", "head"])
def test_every_trainable_ppo_parameter_gets_a_gradient(value_model, tmp_path):
    """What DDP with ``find_unused_parameters=False`` requires of every backward: a gradient for every trainable
    parameter. The separate value model's ``lm_head`` is frozen (and left as it was), every other parameter of the
    policy, value model and value head trains."""
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.synthetic import TargetCharReward
    from lightning_llm.modules.ppo import PPO

    dm = _prompts()
    reward = None
    if value_model == "separate_from_reward_model":
        reward = str(_reward_checkpoint(tmp_path / "rm.ckpt"))
    cfg = TransformerConfig(vocab_size=dm.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    m = PPO(config=cfg, reward_functions=[TargetCharReward("a", 6)], reward_model=reward, max_new_tokens=6,
            value_model="head" if value_model == "head" else "separate", log_completions_every_n_steps=0)  # fmt: skip
    m.tokenizer = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    roll = m.rollout(batch["prompt"], batch["prompt_ids"])
    loss, _ = m.ppo_losses(roll)
    loss.backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n, p in m.named_parameters() if p.requires_grad and p.grad is None} == set()
    assert "value_backbone.lm_head.weight" not in trainable
    prefixes = ("policy.", "value_head.") + (("value_backbone.",) if value_model != "head" else ())
    expected = {n for n, _ in m.named_parameters() if n.startswith(prefixes) and n != "value_backbone.lm_head.weight"}
    assert trainable == expected  # the reference and the reward model stay frozen
    if value_model == "separate":  # the value model is a copy of the initial policy, LM head included
        torch.testing.assert_close(m.value_backbone.lm_head.weight, m.policy.lm_head.weight, rtol=0, atol=0)


def test_every_trainable_reward_model_parameter_gets_a_gradient():
    from lightning_llm.config import TransformerConfig
    from lightning_llm.data.preference import PreferenceDataModule
    from lightning_llm.modules.reward_model import RewardModel

    dm = PreferenceDataModule(num_train=16, num_val=8, batch_size=4, max_length=24, max_prompt_length=12)
    dm.setup("fit")
    rm = RewardModel(config=TransformerConfig(vocab_size=dm.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16))
    rm._loss(next(iter(dm.train_dataloader())))[0].backward()
    assert not rm.backbone.lm_head.weight.requires_grad
    assert [n for n, p in rm.named_parameters() if p.requires_grad and p.grad is None] == []
    assert len(rm.trainable_parameters()) == len(list(rm.parameters())) - 1  # all but the LM head
    # tied embeddings: there is no separate head, and the embedding (used) stays trainable
    tied = RewardModel(config=TransformerConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                                tie_embeddings=True))  # fmt: skip
    assert tied.backbone.lm_head is None and all(p.requires_grad for p in tied.parameters())


# ---------------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.distributed
@pytest.mark.parametrize("module", ["ppo", "reward"])
def test_ddp_preset_keeps_the_ranks_in_sync(runs, module):
    preset = yaml.safe_load((ROOT / "configs/trainer/cpu_ddp.yaml").read_text())["trainer"]["strategy"]
    assert preset["init_args"]["find_unused_parameters"] is False  # the setting that failed before the fix
    result, tensors = runs[f"{module}_ddp"]
    assert result["world_size"] == 2
    _assert_trained(result, tensors)
    r0, r1 = tensors["replicas"]
    assert r0.numel() == tensors["final"].numel() and torch.equal(r0, r1)  # every parameter, bitwise
    torch.testing.assert_close(r0, tensors["final"], rtol=0, atol=0)
    frozen_head = {"ppo": "value_backbone.lm_head.weight", "reward": "backbone.lm_head.weight"}[module]
    assert frozen_head not in result["trainable"]
    where = _slices(result)[frozen_head]
    assert torch.equal(tensors["final"][where], tensors["initial"][where])
    if module == "ppo":
        value = [s for n, s in _slices(result).items() if n.startswith("value_backbone.blocks.")]
        assert any(not torch.equal(tensors["final"][s], tensors["initial"][s]) for s in value)  # the value model trains
        assert len(result["samples"]) == 2 and all(len(set(per_rank)) == 2 for per_rank in result["samples"])


def _check_tensor_parallel(runs: dict[str, tuple[dict, dict]], module: str) -> None:
    (got, got_t), (ref, ref_t) = runs[f"{module}_tp"], runs[f"{module}_single"]
    assert got["world_size"] == 2 and ref["world_size"] == 1
    assert (got["kv_cache_heads"], ref["kv_cache_heads"]) == (2, 4)  # 4 key/value heads, 2 per tensor-parallel rank
    _assert_trained(got, got_t)
    torch.testing.assert_close(got_t["initial"], ref_t["initial"], rtol=0, atol=0)  # the same initial weights
    # both tensor-parallel ranks sampled the same tokens, the tokens the single process sampled, at every step
    assert len(got["samples"]) == 2 and all(len(set(per_rank)) == 1 for per_rank in got["samples"])
    assert [per_rank[0] for per_rank in got["samples"]] == [per_rank[0] for per_rank in ref["samples"]]
    first, first_ref = got["steps"][0], ref["steps"][0]
    assert sorted(first) == sorted(first_ref)
    assert {"grpo": "train/loss", "ppo": "train/policy_loss"}[module] in first and "train/kl" in first
    keys = sorted(first_ref)
    torch.testing.assert_close(
        torch.tensor([first[k] for k in keys], dtype=torch.float64),
        torch.tensor([first_ref[k] for k in keys], dtype=torch.float64),
        msg=lambda m: f"first step ({keys}): {m}",
        **TOL,
    )
    # the ranks of a tensor-parallel group log the same statistics and keep equal copies of the unsplit parameters
    assert all(per_rank[0] == per_rank[1] for per_rank in got["per_rank"])
    r0, r1 = got_t["replicas"]
    assert 0 < r0.numel() < got_t["final"].numel() and torch.equal(r0, r1)


@pytest.mark.distributed
def test_tensor_parallel_preset_grpo_matches_one_process(runs):
    _check_tensor_parallel(runs, "grpo")


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_preset_ppo_matches_one_process(tmp_path):
    """PPO's four models (policy, reference, value model from the reward model, reward model) split by heads."""
    _check_tensor_parallel(_launch(tmp_path, SLOW_LAUNCHES), "ppo")
