"""Worker of ``tests/modules/test_rlhf_presets.py``: RLHF modules under the project's CPU trainer presets.

Run as ``python tests/modules/_rlhf_presets_worker.py --runs ppo:ddp,reward:ddp --out DIR``. Layouts:

* ``single``: one process, batch B;
* ``ddp``: ``configs/trainer/cpu_ddp.yaml`` (2 processes, gloo, ``find_unused_parameters: false``), B per rank;
* ``tp``: ``configs/trainer/cpu_fsdp2_tp.yaml`` (2 processes, tensor-parallel size 2, so ONE data-parallel rank: both
  processes read the same batch B, and ``single`` with batch B is the same run in one process).

The strategy is built from the preset file itself (its ``class_path`` and ``init_args``), with the preset's
accelerator, devices and precision, so the test runs what ``--config configs/trainer/<preset>.yaml`` gives. A
2-process layout makes Lightning re-launch this script for rank 1; later runs of the list reuse both processes.

The modules are those of ``_rlhf_fsdp2_worker.build`` (2 layers, width 32, 4 query heads and ``--n-kv-head`` key-value
heads, 2 there; the reward model checkpoint has its own config): PPO with a
separate value model initialised from a reward model checkpoint (policy, reference, value model, reward model),
GRPO with a reference (``beta=0.04``) and the reward model, the reward model itself. For each run, rank 0 writes
``DIR/<module>_<layout>.json`` (every step's ``train/*`` statistics averaged over the ranks, every rank's digest of
the sampled tokens, per rank the same statistics unaveraged, the parameter names, sizes and which are trainable, and
the key/value heads of the KV cache the policy allocates for generation on rank 0) and ``DIR/<module>_<layout>.pt``:

* ``initial`` / ``final``: every parameter of the module, whole (a tensor-parallel shard is gathered), flattened, in
  ``named_parameters`` order, before the first and after the last step;
* ``replicas``: per rank, the flattened parameters that rank holds as a full copy (under DDP: all of them; under
  tensor parallelism: the parameters that are not split, i.e. embeddings, norms, LM heads, scalar heads), after the
  last step: they must be equal on every rank, or the ranks have drifted apart.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _rlhf_fsdp2_worker import QUIET_TRAINER, SEED, Recorder, build, record_samples  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"ddp": "cpu_ddp", "tp": "cpu_fsdp2_tp"}


def preset_trainer_args(layout: str) -> dict:
    """``Trainer`` arguments of a layout: the preset's accelerator, devices, precision and strategy (instantiated from
    its ``class_path`` / ``init_args``), or one CPU process for ``single``."""
    if layout == "single":
        return {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}
    trainer = yaml.safe_load((ROOT / "configs" / "trainer" / f"{PRESETS[layout]}.yaml").read_text())["trainer"]
    spec = trainer["strategy"]
    module, name = spec["class_path"].rsplit(".", 1)
    strategy = getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    return {"accelerator": trainer["accelerator"], "devices": trainer["devices"], "strategy": strategy,
            "precision": trainer["precision"]}  # fmt: skip


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p  # a tensor-parallel shard: gathered (collective)


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole, flattened in ``named_parameters`` order (every rank must call it: it gathers)."""
    return torch.cat([_full(p).detach().float().flatten().cpu() for p in module.parameters()])


def flat_replicas(module: torch.nn.Module) -> torch.Tensor:
    """The parameters this rank holds whole (not split over ranks), flattened."""
    parts = []
    for p in module.parameters():
        if hasattr(p, "placements") and not all(pl.is_replicate() for pl in p.placements):
            continue  # a shard: the other rank holds other values
        parts.append((p.to_local() if hasattr(p, "to_local") else p).detach().float().flatten().cpu())
    return torch.cat(parts)


class Snapshots(Callback):
    """Parameters before the first and after the last step, and every rank's statistics of every step."""

    def __init__(self) -> None:
        self.initial: torch.Tensor | None = None
        self.per_rank: list[list[dict[str, float]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = flat_parameters(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("train/")}
        rows = [row]
        if trainer.world_size > 1:
            rows = [None] * trainer.world_size
            torch.distributed.all_gather_object(rows, row)
        self.per_rank.append(rows)


def run(name: str, layout: str, args) -> None:
    root = Path(args.out) / f"{name}_{layout}_run"
    L.seed_everything(SEED)
    dm, module, per_step = build(name, args.batch_size, layout == "single", args.reward_ckpt)
    if hasattr(module, "sample"):
        record_samples(module)
    rec, snap = Recorder(), Snapshots()
    trainer = L.Trainer(
        **preset_trainer_args(layout),
        max_steps=args.steps * per_step,
        gradient_clip_val=1.0 if module.automatic_optimization else None,
        limit_val_batches=0,
        enable_checkpointing=False,
        default_root_dir=str(root),
        callbacks=[rec, snap],
        **QUIET_TRAINER,
    )
    trainer.fit(module, datamodule=dm)
    final = flat_parameters(module)
    replicas = [flat_replicas(module)]
    if trainer.world_size > 1:
        replicas = [None] * trainer.world_size
        torch.distributed.all_gather_object(replicas, flat_replicas(module))
    if trainer.is_global_zero:
        out = Path(args.out)
        result = {"steps": rec.steps, "samples": rec.samples, "per_rank": snap.per_rank}
        result["world_size"] = trainer.world_size
        if hasattr(module, "policy"):  # the key/value heads of the KV cache generation allocates on this rank
            result["kv_cache_heads"] = module.policy.new_kv_cache(1, 1).k[0].shape[1]
        result["names"] = [n for n, _ in module.named_parameters()]
        result["numels"] = [p.numel() for p in module.parameters()]  # a DTensor's numel is the whole parameter's
        result["trainable"] = [n for n, p in module.named_parameters() if p.requires_grad]
        (out / f"{name}_{layout}.json").write_text(json.dumps(result, indent=1))
        torch.save({"initial": snap.initial, "final": final, "replicas": replicas}, out / f"{name}_{layout}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="module:layout,... (layouts: single, or ddp / tp mixed)")
    p.add_argument("--batch-size", type=int, default=4, help="per data-parallel rank")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--reward-ckpt", default=None)
    p.add_argument("--n-kv-head", type=int, default=2, help="key/value heads of the policy (4 query heads)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.n_kv_head != 2:
        import _rlhf_fsdp2_worker

        from lightning_llm.config import TransformerConfig

        def config(vocab_size: int) -> TransformerConfig:
            return TransformerConfig(
                vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=args.n_kv_head, n_embd=32
            )

        _rlhf_fsdp2_worker._config = config  # build() reads it
    for item in args.runs.split(","):
        run(*item.split(":"), args)


if __name__ == "__main__":
    main()
    from lightning_llm._dist import destroy_process_group

    destroy_process_group()  # the Trainer's gloo group, left to interpreter finalization, can abort the process
