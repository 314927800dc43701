"""RewardModel, DPO, PPO, GRPO and RLOO under FSDP2 on two CPU processes (gloo): same numbers, real shards, exact resume.

Every run is launched once per module fixture (``tests/modules/_rlhf_fsdp2_worker.py``, the launches in parallel) and
read by several tests. Each run trains 4 training steps of a 2-layer, width-32 model, saves a sharded checkpoint after
step 2, validates once, then resumes a fresh Trainer from the checkpoint for steps 3-4.

References:

* **RewardModel, DPO**: the same seed and GLOBAL batch (8 pairs) in ONE process, against 2 FSDP2 ranks of 4 pairs
  each (the single process reads the data in the order of a 1-replica ``DistributedSampler``, so each of its batches is
  the union of the two ranks' batches).
* **PPO, GRPO, RLOO**: a 2-process **DDP** run with the same per-rank data. A single process cannot match by
  construction: each rank samples its own prompts with its own generator (seeded ``seed + 1000 * data-parallel
  rank``), so the global batch in one process would draw other random numbers. DDP and FSDP2 give every rank the same
  prompts and the same generator, so the rollouts are identical token for token (DDP stops decoding a rank's batch
  once all its rows emitted EOS while FSDP2 decodes every step and cuts the rows afterwards: identical unless every
  row of a rank finishes before the last step, which these runs never do). The tests compare a digest of every
  rank's sampled tokens (prompt and completion up to EOS) at every step, not only the statistics.

Tolerance: fp32; the layouts differ only in reduction order (reduce-scatter vs all-reduce of the gradients, batch
means over 4 rows per rank vs 8 rows, attention over differently padded batches). The measured differences are at most
2e-6 (DPO's summed log-probabilities, about -24: relative 1e-7); every logged ``train/*`` statistic of every step and
the validation metrics must agree with rtol=1e-5, atol=1e-5. For the online modules the sampled tokens must also stay
the same: a token could only flip when a uniform draw falls within ~1e-7 of a bucket boundary (the runs are
deterministic, so a flip would fail every time, not at random). A resumed run repeats the uninterrupted one exactly
(atol 1e-6: same layout, same reduction order).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = HERE / "_rlhf_fsdp2_worker.py"
sys.path.insert(0, str(HERE.parent))
from _launch import run_all  # noqa: E402

TIMEOUT = 420
SINGLE = ["reward", "dpo"]  # compared with one process
ONLINE = ["ppo", "grpo", "rloo"]  # compared with 2-process DDP
TOL = {"rtol": 1e-5, "atol": 1e-5}
#: the models each module shards (parameter-name prefixes): policy, frozen reference, value model, reward model
MODELS = {
    "reward": ["backbone", "head"],
    "dpo": ["policy", "ref"],
    "ppo": ["policy", "ref", "value_backbone", "value_head", "reward_model.backbone", "reward_model.head"],
    "grpo": ["policy", "ref", "reward_model.backbone", "reward_model.head"],
    "rloo": ["policy", "ref", "reward_model.backbone", "reward_model.head"],
}
ALT_MODELS = {**MODELS, "ppo": ["policy", "ref", "value_head"], "grpo": ["policy"], "rloo": ["policy", "ref"]}


def _reward_checkpoint(path: Path) -> Path:
    """A (random) reward model checkpoint with the prompt data's character tokenizer, for the online modules."""
    from lightning_llm.data.prompts import PromptDataModule
    from lightning_llm.data.tokenizer import tokenizer_state
    from lightning_llm.modules.reward_model import RewardModel

    dm = PromptDataModule(num_train=32, num_val=16, batch_size=4)
    torch.manual_seed(0)
    rm = RewardModel(config={"vocab_size": dm.vocab_size, "block_size": 32, "n_layer": 2, "n_head": 4,
                             "n_kv_head": 2, "n_embd": 32})  # fmt: skip
    torch.save({"state_dict": rm.state_dict(), "transformer_config": rm.config.to_dict(),
                **tokenizer_state(dm.tokenizer)}, path)  # fmt: skip
    return path


def _launch(out: Path, variant: str) -> dict[str, dict]:
    """Two launches in parallel: one process (RewardModel, DPO) and two processes (every module under FSDP2, the
    online ones under DDP too); ``{"<module>_<layout>": result}``."""
    ckpt = _reward_checkpoint(out / "rm.ckpt")
    two = [f"{m}:fsdp2" for m in SINGLE] + [f"{m}:{layout}" for m in ONLINE for layout in ("ddp", "fsdp2")]
    launches = {"one": [f"{m}:single" for m in SINGLE], "two": two}

    commands = {
        name: [sys.executable, str(WORKER), "--runs", ",".join(runs), "--variant", variant, "--reward-ckpt", str(ckpt),
               "--out", str(out)]
        for name, runs in launches.items()
    }  # fmt: skip
    run_all(commands, out, ROOT, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, TIMEOUT)
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    return _launch(tmp_path_factory.mktemp("rlhf_fsdp2"), "default")


#: fractions of tokens on the far side of a clip boundary: a count, so float rounding that differs between layouts
#: (all-reduce vs reduce-scatter order) may move ONE token across the boundary; 1/96 is one token of PPO's steps
COUNTED = ("clipfrac", "clip_ratio")
ONE_TOKEN = 1 / 96 + 1e-6  # (+ float32 rounding of the logged fractions)


def _assert_same_steps(got: list[dict], ref: list[dict], **tol) -> None:
    assert len(got) == len(ref) and got
    for step, (g, r) in enumerate(zip(got, ref), 1):
        assert sorted(g) == sorted(r), step
        counted = [k for k in r if any(c in k for c in COUNTED)]
        for k in counted:
            assert abs(g[k] - r[k]) <= max(ONE_TOKEN, tol.get("atol", 0.0)), (step, k, g[k], r[k])
        keys = sorted(k for k in r if k not in counted)
        torch.testing.assert_close(
            torch.tensor([g[k] for k in keys], dtype=torch.float64),
            torch.tensor([r[k] for k in keys], dtype=torch.float64),
            msg=lambda m, step=step, keys=keys: f"step {step} ({keys}): {m}",
            **tol,
        )


def _reference(module: str) -> str:
    return f"{module}_single" if module in SINGLE else f"{module}_ddp"


def _check_layouts(results: dict[str, dict], module: str) -> None:
    got, ref = results[f"{module}_fsdp2"], results[_reference(module)]
    assert got["world_size"] == 2 and ref["world_size"] == (1 if module in SINGLE else 2)
    assert len(got["steps"]) == 4 and len(got["steps"][0]) >= 3
    if module in ONLINE:  # the same tokens sampled on each rank; the two ranks sampled other prompts
        assert got["samples"] == ref["samples"] and len(got["samples"]) == 4
        assert all(len(set(per_rank)) == 2 for per_rank in got["samples"])
    _assert_same_steps(got["steps"], ref["steps"], **TOL)
    assert sorted(got["val"]) == sorted(ref["val"]) and got["val"]
    for key, value in ref["val"].items():
        assert got["val"][key] == pytest.approx(value, rel=TOL["rtol"], abs=TOL["atol"]), key


def _check_sharding(result: dict, models: list[str]) -> None:
    """Every parameter of every model is a DTensor sharded on dim 0 over the 2 data-parallel ranks, and rank 0 holds
    only its share: the first ceil(rows / 2) rows of each parameter (a scalar head's (1, C) weight is all on rank 0)."""
    for key in ("sharding", "resumed_sharding"):
        sharding = result[key]
        assert sorted(sharding) == sorted(models), key
        for model, row in sharding.items():
            assert row["dtensors"] == row["params"] > 0, (key, model, row)
            assert row["placements"] == ["(Shard(dim=0),)"] and row["mesh"] == [2], (key, model, row)
            assert row["local"] == row["first_half"], (key, model, row)
        assert sum(r["local"] for r in sharding.values()) < 0.51 * sum(r["full"] for r in sharding.values())


def _check_resume(result: dict) -> None:
    # saved after step 2 (mid epoch), resumed for steps 3 and 4 in fresh processes' Trainer
    _assert_same_steps(result["resumed_steps"], result["steps"][2:], rtol=0, atol=1e-6)
    assert result["resumed_samples"] == result["samples"][2:]  # each rank resumed its own sampler stream


# ---------------------------------------------------------------------------------------------------- default
@pytest.mark.parametrize("module", SINGLE + ONLINE)
def test_fsdp2_matches_reference_layout(runs, module):
    _check_layouts(runs, module)


@pytest.mark.parametrize("module", SINGLE + ONLINE)
def test_every_model_is_sharded(runs, module):
    # the frozen reference and reward models are sharded too (not offloaded): see OnlineRLModule's docstring
    _check_sharding(runs[f"{module}_fsdp2"], MODELS[module])


@pytest.mark.parametrize("module", SINGLE + ONLINE)
def test_sharded_checkpoint_resumes_exactly(runs, module):
    result = runs[f"{module}_fsdp2"]
    ckpt = Path(result["checkpoint"])
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # a sharded (DCP) folder
    _check_resume(result)
    if module in SINGLE:
        _check_resume(runs[f"{module}_single"])


def test_learning_happens(runs):
    """The compared trajectories are not trivially constant: the reward model and DPO learn, the online policies move
    away from their reference."""
    for module in SINGLE:
        steps = runs[f"{module}_fsdp2"]["steps"]
        assert steps[-1]["train/loss"] < steps[0]["train/loss"] - 0.05, module
    for module in ONLINE:
        assert abs(runs[f"{module}_fsdp2"]["steps"][-1]["train/kl"]) > 1e-4, module  # PPO's k1 estimate is signed


def test_completions_are_logged_without_deadlock(runs):
    """Rank 0 writes the sample completions; every rank takes part in ``trainer.log_dir`` (a broadcast) first."""
    for module in ONLINE:
        for layout in ("fsdp2", "ddp"):
            with open(Path(runs[f"{module}_{layout}"]["root"]) / "completions.csv", newline="") as f:
                rows = list(csv.reader(f))
            assert rows[0][:3] == ["rollout", "prompt", "completion"], (module, layout)
            assert [r[0] for r in rows[1:]] == ["1"] * 4 + ["2"] * 4 + ["4"] * 4, (module, layout)  # every 2nd


def test_checkpoint_holds_every_ranks_sampler_state(runs):
    """Lightning writes the metadata of rank 0 only; the online modules gather each rank's generator state into it,
    so that rank 1 resumes its own random stream (without that the resumed GRPO steps differ by up to 0.5)."""
    for module in ONLINE:
        for layout in ("fsdp2", "ddp"):
            path = Path(runs[f"{module}_{layout}"]["checkpoint"])
            meta = torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=False)
            states = meta["generator_states"]
            assert len(states) == 2 and not torch.equal(states[0], states[1]), (module, layout)
            assert torch.equal(meta["generator_state"], states[0])


# ---------------------------------------------------------------------------------------------------- variants
@pytest.mark.slow
def test_alternative_paths_under_fsdp2(tmp_path):
    """The other code paths, with FSDP2 keeping gathered weights between forward and backward
    (``reshard_after_forward=False``): a centred reward loss, DPO with precomputed reference log-probabilities, PPO
    with a value head on the policy trunk and reward functions only, GRPO without a reference (``beta=0``, no model
    to shard but the policy) and the ``grpo`` loss, RLOO with gradient accumulation."""
    results = _launch(tmp_path, "alt")
    for module in SINGLE + ONLINE:
        _check_layouts(results, module)
        _check_sharding(results[f"{module}_fsdp2"], ALT_MODELS[module])
        _check_resume(results[f"{module}_fsdp2"])


# ---------------------------------------------------------------------------------------------------- guard
class _Dim:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


class _Mesh:
    """Stands for a (data_parallel=2, tensor_parallel=1) mesh, for the check that needs no process group."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __getitem__(self, name: str) -> _Dim:
        return _Dim(2 if name == "data_parallel" else 1)


def test_unsharded_trainable_parameter_is_refused():
    """A trainable parameter outside transformers() and heads() would never be averaged over the FSDP2 ranks."""
    from lightning_llm.config import TransformerConfig
    from lightning_llm.modules.reward_model import RewardModel

    rm = RewardModel(config=TransformerConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    rm.requires_grad_(False)  # here nothing is sharded (no process group): frozen plain parameters are allowed
    rm._device_mesh = _Mesh()
    rm._check_sharded()
    rm.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"\['extra.weight', 'extra.bias'\] are neither in a module of `transformers"):
        rm._check_sharded()
    rm._device_mesh = None  # one device: nothing to average
    rm._check_sharded()
