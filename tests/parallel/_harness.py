"""Worker script for the distributed tests: train a tiny CausalLM under one strategy and write what was measured.

Run as ``python tests/parallel/_harness.py --strategy ddp --out result.json [...]``; Lightning re-launches the script
for the other ranks. The script trains ``--steps`` optimizer steps (recording the loss of every step, averaged over
data-parallel ranks, and saving a checkpoint after step ``--save-at``), validates, then, in the same processes,
resumes a fresh Trainer from that checkpoint and records the losses of the remaining steps. Rank 0 writes JSON.

Data: random token blocks (seeded), read in the order of a ``DistributedSampler`` (shuffled, seeded by the global
seed, re-shuffled each epoch). Under DDP / FSDP2 Lightning injects that sampler per rank; in the single-process run the
same sampler with one replica is given explicitly, so a single process with batch ``B * d`` sees, at every step, the
union of what the ``d`` data-parallel ranks see with batch ``B``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler  # noqa: E402

from lightning_llm.checkpoint import ResumableDataLoader  # noqa: E402
from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.modules.causal_lm import CausalLM  # noqa: E402
from lightning_llm.parallel import ddp, fsdp, fsdp2, sharded_state_bytes  # noqa: E402

SEED = 1234


class RandomBlocks(Dataset):
    def __init__(self, n: int, block_size: int, vocab_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # a learnable stream: token t+1 = (token t + small random step) mod V
        steps = torch.randint(0, 3, (n, block_size + 1), generator=g)
        start = torch.randint(0, vocab_size, (n, 1), generator=g)
        self.data = (start + steps.cumsum(1)) % vocab_size  # (n, T+1)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        return {"input_ids": row[:-1], "targets": row[1:]}


class BlocksData(L.LightningDataModule):
    def __init__(self, batch_size: int, n_train: int, n_val: int, block_size: int, vocab_size: int, single: bool):
        super().__init__()
        self.batch_size, self.single = batch_size, single
        self.train = RandomBlocks(n_train, block_size, vocab_size, seed=1)
        self.val = RandomBlocks(n_val, block_size, vocab_size, seed=2)

    def train_dataloader(self) -> DataLoader:
        if self.single:
            sampler = DistributedSampler(self.train, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        else:  # Lightning swaps it for DistributedSampler(shuffle=True, seed=SEED) per rank
            sampler = RandomSampler(self.train)
        return ResumableDataLoader(self.train, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


class Recorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.bytes: dict[str, int] | None = None
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
        self.losses.append(float(loss))
        self.times.append(time.perf_counter())
        if self.bytes is None:
            self.bytes = sharded_state_bytes(pl_module, trainer.optimizers[0])


def make_strategy(name: str, **kwargs):
    if name == "ddp":
        return ddp()
    if name == "fsdp2":
        return fsdp2(tensor_parallel_size=1, **kwargs)
    if name == "fsdp2_tp":
        return fsdp2(tensor_parallel_size=2, **kwargs)
    if name == "fsdp":  # FSDP v1, CUDA only
        return fsdp(**kwargs)
    return "auto"


def build_model(args) -> CausalLM:
    cfg = TransformerConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=4,
        n_kv_head=2,
        n_embd=args.n_embd,
        pos_encoding=args.pos_encoding,
        attention_backend="eager" if args.pos_encoding == "alibi" else "auto",
    )
    return CausalLM(config=cfg, learning_rate=3e-3, warmup_steps=2, weight_decay=0.1)


def trainer(args, callbacks, root: Path, **kw) -> L.Trainer:
    devices = 1 if args.strategy == "single" else args.devices
    return L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        strategy=make_strategy(args.strategy, **json.loads(args.strategy_kwargs)),
        precision="32-true",
        max_steps=args.steps,
        gradient_clip_val=1.0,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        val_check_interval=None if args.val_every is None else args.val_every,
        check_val_every_n_epoch=None if args.val_every is not None else 1000,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
        **kw,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="single")
    p.add_argument("--strategy-kwargs", default="{}")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--batch-size", type=int, default=4, help="per data-parallel rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-at", type=int, default=4)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--val-batches", type=int, default=2)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=96)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--pos-encoding", default="rope")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    root = out.parent / (out.stem + "_run")
    single = args.strategy == "single"

    L.seed_everything(SEED)
    rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=args.save_at, save_top_k=-1, save_last=False)
    t = trainer(args, [rec, ckpt], root)
    dm = BlocksData(args.batch_size, args.n_train, args.n_val, args.block_size, args.vocab_size, single)
    model = build_model(args)
    t.fit(model, datamodule=dm)
    result: dict = {"losses": rec.losses, "bytes": rec.bytes, "world_size": t.world_size}
    if len(rec.times) > 2:
        tokens = args.batch_size * args.block_size * (t.world_size if args.strategy != "fsdp2_tp" else 1)
        result["tokens_per_sec"] = tokens * (len(rec.times) - 2) / (rec.times[-1] - rec.times[1])
    val = t.validate(model, datamodule=dm, verbose=False)[0]
    result["val"] = {k: float(v) for k, v in val.items()}
    matches = sorted((root / "ckpt").glob(f"*step={args.save_at}.ckpt"))
    result["checkpoint"] = str(matches[0]) if matches else None
    if not args.no_resume:
        L.seed_everything(SEED)
        rec2 = Recorder()
        t2 = trainer(args, [rec2], root / "resume")
        t2.fit(
            build_model(args),
            datamodule=BlocksData(args.batch_size, args.n_train, args.n_val, args.block_size, args.vocab_size, single),
            ckpt_path=result["checkpoint"],
        )
        result["resumed_losses"] = rec2.losses
    if t.is_global_zero:
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    from lightning_llm._dist import destroy_process_group

    destroy_process_group()  # the Trainer's gloo group, left to interpreter finalization, can abort the process
