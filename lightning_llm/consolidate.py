"""Turn a sharded (torch.distributed.checkpoint) Lightning checkpoint folder into one ordinary checkpoint file.

``python -m lightning_llm.consolidate CKPT_DIR OUT.ckpt`` or :func:`consolidate_checkpoint`. No process group is
needed: the shards are read with DCP's no-dist loader (Lightning's ``_load_distributed_checkpoint``), which assembles
full tensors from the DTensor shards of FSDP2 / tensor parallelism. The result has the layout the Trainer writes on a
single device: ``state_dict`` with full tensors, ``optimizer_states`` as a list with torch's integer parameter ids,
and every other entry of the folder's ``meta.pt`` (epoch, global step, loops, hyper-parameters, config, tokenizer), so
``CausalLM.load_from_checkpoint(OUT)`` works and ``Trainer(...).fit(ckpt_path=OUT)`` resumes on one device.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_llm.checkpoint import atomic_torch_save

__all__ = ["consolidate_checkpoint", "load_sharded_checkpoint", "main"]


def _to_plain(value: Any) -> Any:
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def _rekey_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """DCP optimizer state keyed by parameter names -> torch's format keyed by position across param groups."""
    groups = state.get("param_groups", [])
    if not groups or not groups[0].get("params") or not isinstance(groups[0]["params"][0], str):
        return state
    index: dict[str, int] = {}
    new_groups = []
    for group in groups:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        new_groups.append({**group, "params": ids})
    return {"state": {index[k]: v for k, v in state.get("state", {}).items() if k in index}, "param_groups": new_groups}


def load_sharded_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read a Lightning sharded checkpoint folder into one dict in the single-device Trainer layout."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise ValueError(
            f"`checkpoint_dir` must be a sharded checkpoint folder (with a .metadata file), got {str(path)!r}, which "
            f"{'is a file: it is already consolidated' if path.is_file() else 'does not exist'}."
        )
    if not (path / ".metadata").is_file():
        raise ValueError(
            f"{str(path)!r} has no .metadata file: it is not a torch.distributed.checkpoint folder (or its save was "
            "interrupted). Pass a folder written by FSDP2Strategy / ModelParallelStrategy / FSDPStrategy(sharded)."
        )
    checkpoint = _to_plain(_load_distributed_checkpoint(path))
    if "state_dict" not in checkpoint and "model" in checkpoint:  # FSDPStrategy (v1) sharded layout
        checkpoint["state_dict"] = checkpoint.pop("model")
    keys = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_[0-9]+", k)), key=lambda k: int(k.split("_")[1]))
    if keys:
        checkpoint["optimizer_states"] = [_rekey_optimizer(checkpoint.pop(k)) for k in keys]
    if not (path / _METADATA_FILENAME).is_file():
        raise ValueError(f"{str(path)!r} lacks {_METADATA_FILENAME}: it was not written by a Lightning Trainer.")
    return checkpoint


def consolidate_checkpoint(checkpoint_dir: str | Path, output_file: str | Path, overwrite: bool = False) -> Path:
    """Write ``checkpoint_dir`` (sharded) as the single file ``output_file`` (atomically) and return its path."""
    out = Path(output_file)
    if out.exists() and not overwrite:
        raise FileExistsError(f"`output_file` {str(out)!r} exists; pass overwrite=True (--overwrite) or another path.")
    atomic_torch_save(load_sharded_checkpoint(checkpoint_dir), out)
    return out


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_llm.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint_dir", help="sharded checkpoint folder (e.g. .../checkpoints/epoch=0-step=100.ckpt)")
    parser.add_argument("output_file", help="the single checkpoint file to write")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    out = consolidate_checkpoint(args.checkpoint_dir, args.output_file, args.overwrite)
    print(f"[lightning-llm] consolidated {args.checkpoint_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
