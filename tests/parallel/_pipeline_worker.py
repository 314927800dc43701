"""Worker script for the pipeline tests: train a tiny CausalLM under PipelineStrategy (or one process) and record it.

Run as ``python tests/parallel/_pipeline_worker.py --pp 2 --schedule 1f1b --out result.json [...]``; Lightning
re-launches the script for the other ranks. It trains ``--steps`` optimizer steps (loss of every step, and every
parameter's gradient before the first optimizer step, written per rank to ``<out stem>_grads_rank<r>.pt``), saves a
checkpoint after step ``--save-at``, validates, then resumes a fresh Trainer from that checkpoint in the same processes
and records the losses of the remaining steps. ``--pp 0`` is the single-process reference. Data and model come from
``_harness.py`` (the DDP / FSDP2 tests' worker), so the batches are the same as there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from _harness import SEED, BlocksData, Recorder  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_llm.config import TransformerConfig  # noqa: E402
from lightning_llm.modules.causal_lm import CausalLM  # noqa: E402
from lightning_llm.parallel import PipelineStrategy  # noqa: E402


class GradDump(Callback):
    """Save every local parameter's (full) gradient before the first optimizer step."""

    def __init__(self, path: Path) -> None:
        self.path, self.done = path, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.done:
            return
        grads = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.detach().cpu().clone()
        torch.save(grads, self.path.parent / f"{self.path.stem}_grads_rank{trainer.global_rank}.pt")
        self.done = True


def build_model(args) -> CausalLM:
    cfg = TransformerConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=4,
        n_kv_head=2,
        n_embd=args.n_embd,
        pos_encoding="rope",
    )
    return CausalLM(config=cfg, learning_rate=3e-3, warmup_steps=2, weight_decay=0.1)


def make_trainer(args, callbacks, root: Path) -> L.Trainer:
    if args.pp == 0:
        strategy, devices = "auto", 1
    else:
        kwargs = json.loads(args.strategy_kwargs)
        strategy = PipelineStrategy(pipeline_parallel_size=args.pp, schedule=args.schedule, **kwargs)
        devices = args.devices
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision="32-true",
        max_steps=args.steps,
        gradient_clip_val=1.0,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1000,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks; 0 = one process, no strategy")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--strategy-kwargs", default="{}")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="per data-parallel rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--save-at", type=int, default=4)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-val", type=int, default=10)
    p.add_argument("--val-batches", type=int, default=2)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=96)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    root = out.parent / (out.stem + "_run")
    single = args.pp == 0

    def data() -> BlocksData:
        return BlocksData(args.batch_size, args.n_train, args.n_val, args.block_size, args.vocab_size, single)

    L.seed_everything(SEED)
    rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=args.save_at, save_top_k=-1, save_last=False)
    t = make_trainer(args, [rec, ckpt, GradDump(out)], root)
    model = build_model(args)
    t.fit(model, datamodule=data())
    result: dict = {"losses": rec.losses, "bytes": rec.bytes, "world_size": t.world_size}
    if args.val_batches:
        val = t.validate(model, datamodule=data(), verbose=False)[0]
        result["val"] = {k: float(v) for k, v in val.items()}
    matches = sorted((root / "ckpt").glob(f"*step={args.save_at}.ckpt"))
    result["checkpoint"] = str(matches[0]) if matches else None
    if not args.no_resume:
        L.seed_everything(SEED)
        rec2 = Recorder()
        t2 = make_trainer(args, [rec2], root / "resume")
        t2.fit(build_model(args), datamodule=data(), ckpt_path=result["checkpoint"])
        result["resumed_losses"] = rec2.losses
    if t.is_global_zero:
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    from lightning_llm._dist import destroy_process_group

    destroy_process_group()  # the Trainer's gloo group, left to interpreter finalization, can abort the process
