"""Worker of ``tests/modules/test_rlhf_fsdp2.py``: train tiny RLHF modules under given layouts, write what was measured.

Run as ``python tests/modules/_rlhf_fsdp2_worker.py --runs reward:fsdp2,ppo:ddp,ppo:fsdp2 --out DIR``; a 2-process
layout makes Lightning re-launch the script for rank 1 (2 CPU processes, gloo), and every later run of the list reuses
the two processes and their process group (``single`` runs need a launch of their own). For each ``module:layout``
the worker seeds everything, trains ``--steps`` training steps (saving a checkpoint after step ``--save-at``), records
the ``train/*`` statistics of every step (each averaged over the ranks) and, for the online modules, a digest of every
rank's sampled tokens; validates once; then resumes a fresh Trainer from the checkpoint and records the remaining
steps. Rank 0 writes ``DIR/<module>_<layout>.json``.

Layouts: ``single`` (one process, the global batch), ``fsdp2`` (:class:`~lightning_llm.parallel.FSDP2Strategy`,
data-parallel size 2, half the batch per rank), ``ddp`` (2 processes, half the batch per rank).

Data order: under ``fsdp2`` / ``ddp`` Lightning swaps the training sampler for a ``DistributedSampler`` (shuffled,
seeded by the global seed); the ``single`` layout gets the same sampler with one replica, so at every step it sees the
union of what the two ranks see.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from lightning_llm.checkpoint import ResumableDataLoader  # noqa: E402
from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.data.preference import PreferenceDataModule  # noqa: E402
from lightning_llm.data.prompts import PromptDataModule  # noqa: E402
from lightning_llm.data.synthetic import LetterShiftReward, TargetCharReward  # noqa: E402
from lightning_llm.parallel import FSDP2Strategy  # noqa: E402

SEED = 1234
#: the Trainer settings every layout run shares (also the presets worker's): quiet, and every statistic in
#: callback_metrics at every step (the runs are compared step by step)
QUIET_TRAINER = {
    "num_sanity_val_steps": 0,
    "logger": False,
    "log_every_n_steps": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "use_distributed_sampler": True,
}
IGNORED = ("train/lr", "train/rollout")  # not a result of the layout


class _SingleSampler:
    """``train_dataloader`` with a 1-replica ``DistributedSampler`` (the single layout's data order, see above)."""

    single = False

    def train_dataloader(self):
        if not self.single:
            return super().train_dataloader()
        ds = self.dataset("train")
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        bs = self.hparams.batch_size
        return ResumableDataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=self.collate_fn, drop_last=True)


class Preferences(_SingleSampler, PreferenceDataModule):
    pass


class Prompts(_SingleSampler, PromptDataModule):
    pass


def _config(vocab_size: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def _preferences(batch_size: int, single: bool) -> Preferences:
    dm = Preferences(num_train=64, num_val=16, max_length=24, max_prompt_length=12, batch_size=batch_size)
    dm.single = single
    return dm


def _prompts(batch_size: int, single: bool) -> Prompts:
    dm = Prompts(num_train=32, num_val=16, batch_size=batch_size)
    dm.single = single
    return dm


def build(name: str, batch_size: int, single: bool, reward_ckpt: str | None, variant: str = "default"):
    """``(data module, module, optimiser steps per training step)`` of one module, at tiny size.

    ``variant="alt"`` takes the other code paths: a centred reward loss, DPO with precomputed reference
    log-probabilities, PPO with a value head on the policy trunk and no reward model, GRPO without a reference
    (``beta=0``) and with the ``grpo`` loss, RLOO with gradient accumulation."""
    alt = variant == "alt"
    if name in ("reward", "dpo"):
        dm = _preferences(batch_size, single)
        cfg = _config(dm.vocab_size)
        if name == "reward":
            from lightning_llm.modules.reward_model import RewardModel

            extra = {"center_rewards_coef": 0.01} if alt else {}
            return dm, RewardModel(config=cfg, learning_rate=3e-3, warmup_steps=1, **extra), 1
        from lightning_llm.modules.dpo import DPO

        return dm, DPO(config=cfg, beta=0.1, learning_rate=3e-3, warmup_steps=1, precompute_ref_logprobs=alt), 1
    dm = _prompts(batch_size, single)
    cfg = _config(dm.vocab_size)
    # completions logged at rollouts 1, 2, 4 (rank 0 writes <root>/completions.csv; every rank must get there)
    common = {"log_completions_every_n_steps": 2, "learning_rate": 3e-3, "reward_model": None if alt else reward_ckpt}
    if name == "ppo":
        from lightning_llm.modules.ppo import PPO

        # with the reward model: a separate value model initialised from it; the reference is a frozen copy
        module = PPO(
            config=cfg, reward_functions=[TargetCharReward("a", 6)], max_new_tokens=6, ppo_epochs=2,
            num_minibatches=2, kl_coef=0.05, value_model="head" if alt else None, **common,
        )  # fmt: skip
        return dm, module, 4
    from lightning_llm.modules.grpo import GRPO, RLOO

    kwargs = {"num_generations": 4, "max_new_tokens": 4, "beta": 0.04, "num_minibatches": 2}
    if alt and name == "grpo":
        kwargs.update(beta=0.0, loss_type="grpo")
    elif alt:
        kwargs.update(num_minibatches=1, gradient_accumulation_steps=2)
    module = (GRPO if name == "grpo" else RLOO)(config=cfg, reward_functions=[LetterShiftReward(1)], **kwargs, **common)
    return dm, module, kwargs["num_minibatches"]


def sharding(module: torch.nn.Module) -> dict[str, dict]:
    """Per model (``policy``, ``ref``, ``reward_model.backbone``...): how its parameters are held on this rank."""
    from torch.distributed.tensor import DTensor

    out: dict[str, dict] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "reward_model" else parts[0]
        row = out.setdefault(
            key, {"params": 0, "dtensors": 0, "placements": [], "mesh": [], "local": 0, "full": 0, "first_half": 0}
        )
        row["params"] += 1
        row["full"] += p.numel()
        # rank 0's share of a dim-0 shard over 2 ranks: the first ceil(rows / 2) rows
        row["first_half"] += -(-p.shape[0] // 2) * (p.numel() // max(1, p.shape[0])) if p.dim() else p.numel()
        if isinstance(p, DTensor):
            row["dtensors"] += 1
            row["local"] += p.to_local().numel()
            row["placements"] = sorted({*row["placements"], str(tuple(p.placements))})
            row["mesh"] = sorted({*row["mesh"], p.device_mesh.size()})
        else:
            row["local"] += p.numel()
    return out


def record_samples(module) -> None:
    """Make an online module keep a digest of the tokens of every rollout it samples (``module.sampled``): each row's
    attended tokens (prompt and completion up to its EOS), independent of padding and of where decoding stopped."""
    module.sampled = []
    sample = module.sample

    def wrapped(prompt_ids, temperature=None):
        out = sample(prompt_ids, temperature)
        rows = [row[m.bool()].tolist() for row, m in zip(out.sequences, out.attention_mask)]
        module.sampled.append(hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16])
        return out

    module.sample = wrapped


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.samples: list[list[str]] = []  # per step: every rank's rollout digest
        self.sharding: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.sharding = sharding(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {}
        for key in sorted(trainer.callback_metrics):  # the same keys, in the same order, on every rank
            if key.startswith("train/") and key not in IGNORED:
                value = trainer.callback_metrics[key].detach().float().clone()
                row[key] = float(trainer.strategy.reduce(value, reduce_op="mean"))
        self.steps.append(row)
        if hasattr(pl_module, "sampled"):
            digests = [pl_module.sampled[-1]]
            if trainer.world_size > 1:
                digests = [None] * trainer.world_size
                torch.distributed.all_gather_object(digests, pl_module.sampled[-1])
            self.samples.append(digests)


def make_trainer(
    layout: str, steps: int, root: Path, callbacks: list, variant: str = "default", clip: float | None = None
) -> L.Trainer:
    if layout == "fsdp2":  # the alt variant keeps gathered weights from the forward to the backward (ZeRO-2-like)
        strategy = FSDP2Strategy(reshard_after_forward=variant != "alt")
    else:  # DDP as the presets run it: every trainable parameter gets a gradient (scalar-head backbones freeze lm_head)
        strategy = {"single": "auto", "ddp": "ddp"}[layout]
    return L.Trainer(
        accelerator="cpu",
        devices=1 if layout == "single" else 2,
        strategy=strategy,
        precision="32-true",
        max_steps=steps,
        gradient_clip_val=clip,  # the online modules clip inside their update (max_grad_norm)
        limit_val_batches=1,
        check_val_every_n_epoch=1000,
        default_root_dir=str(root),
        callbacks=callbacks,
        **QUIET_TRAINER,
    )


def run(name: str, layout: str, args) -> dict:
    single = layout == "single"
    batch_size = args.batch_size * (2 if single else 1)  # the same global batch
    root = Path(args.out) / f"{name}_{layout}_run"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # a rerun starts clean (no stale checkpoint of the same step)
        shutil.rmtree(root, ignore_errors=True)
    L.seed_everything(SEED)
    dm, module, per_step = build(name, batch_size, single, args.reward_ckpt, args.variant)
    if hasattr(module, "sample"):
        record_samples(module)
    clip = 1.0 if module.automatic_optimization else None
    rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=args.save_at * per_step, save_top_k=-1)
    trainer = make_trainer(layout, args.steps * per_step, root, [rec, ckpt], args.variant, clip)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    result: dict = {"steps": rec.steps, "samples": rec.samples, "sharding": rec.sharding}
    result["world_size"], result["root"] = trainer.world_size, str(root)
    result["fit_seconds"] = time.perf_counter() - start
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    result["val"] = {k: float(v) for k, v in val.items()}
    matches = sorted((root / "ckpt").glob(f"*step={args.save_at * per_step}.ckpt"))
    result["checkpoint"] = str(matches[0]) if matches else None
    if layout in args.resume.split(",") and matches:
        L.seed_everything(SEED)
        dm2, module2, _ = build(name, batch_size, single, args.reward_ckpt, args.variant)
        if hasattr(module2, "sample"):
            record_samples(module2)
        rec2 = Recorder()
        trainer2 = make_trainer(layout, args.steps * per_step, root / "resume", [rec2], args.variant, clip)
        trainer2.fit(module2, datamodule=dm2, ckpt_path=result["checkpoint"])
        result["resumed_steps"] = rec2.steps
        result["resumed_samples"] = rec2.samples
        result["resumed_sharding"] = rec2.sharding
    return result if trainer.is_global_zero else {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="module:layout,... (layouts: single, or ddp / fsdp2 mixed)")
    p.add_argument("--batch-size", type=int, default=4, help="per rank of a 2-process layout (single: twice)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-at", type=int, default=2)
    p.add_argument("--resume", default="single,fsdp2", help="layouts that also resume from the mid-run checkpoint")
    p.add_argument("--reward-ckpt", default=None)
    p.add_argument("--variant", choices=["default", "alt"], default="default")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    for item in args.runs.split(","):
        name, layout = item.split(":")
        result = run(name, layout, args)
        if result:
            (Path(args.out) / f"{name}_{layout}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    from lightning_llm._dist import destroy_process_group

    destroy_process_group()  # the Trainer's gloo group, left to interpreter finalization, can abort the process
