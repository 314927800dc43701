"""Turn a sharded (torch.distributed.checkpoint) Lightning checkpoint folder into one ordinary checkpoint file.

:func:`consolidate_checkpoint` (the command line has it as ``lightning-llm export``). No process group is needed: the
shards are read with DCP's no-dist loader (Lightning's ``_load_distributed_checkpoint``), which assembles
full tensors from the DTensor shards of FSDP2 / tensor parallelism. The result has the layout the Trainer writes on a
single device: ``state_dict`` with full tensors, ``optimizer_states`` as a list with torch's integer parameter ids,
and every other entry of the folder's ``meta.pt`` (epoch, global step, loops, hyper-parameters, config, tokenizer), so
``CausalLM.load_from_checkpoint(OUT)`` works and ``Trainer(...).fit(ckpt_path=OUT)`` resumes on one device.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning_llm.checkpoint import atomic_torch_save

__all__ = ["consolidate_checkpoint", "load_sharded_checkpoint"]


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


def _canonical_order(checkpoint: dict[str, Any]) -> list[str]:
    """Parameter names in the order the unsplit model registers them (what a single-device optimizer sees).

    A pipeline-parallel checkpoint lists each rank's parameters in turn (rank 0 may hold the first and the last stage),
    so the order is rebuilt: every ``<prefix>.<Transformer parameter>`` key is placed by the parameter's position in a
    :class:`~lightning_llm.nn.Transformer` built (on the meta device) from the stored ``transformer_config``; other keys
    keep their stored order.
    """
    keys = list(checkpoint.get("state_dict", {}))
    config = checkpoint.get("transformer_config")
    if not isinstance(config, dict):
        return keys
    import torch

    from lightning_llm.config import TransformerConfig
    from lightning_llm.nn.transformer import Transformer

    with torch.device("meta"):
        names = [n for n, _ in Transformer(TransformerConfig.from_dict(config)).named_parameters()]
    position = {n: i for i, n in enumerate(names)}
    prefixes: dict[str, int] = {}

    def sort_key(item: tuple[int, str]) -> tuple[int, int, int]:
        index, key = item
        parts = key.split(".")
        for cut in range(len(parts)):
            prefix, name = ".".join(parts[:cut]), ".".join(parts[cut:])
            if name in position:
                group = prefixes.setdefault(prefix, len(prefixes))
                return (group, position[name], index)
        return (len(keys), 0, index)

    return [key for _, key in sorted(enumerate(keys), key=sort_key)]


def _unflatten_optimizer(state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """DCP's flat optimizer layout (``state.<fqn>.<key>``, ``param_groups.<fqn>.<key>``, written under pipeline
    parallelism) -> torch's layout with integer ids in the unsplit model's parameter order (``order``)."""
    per_param: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    names = sorted(order, key=len, reverse=True)  # longest first: "a.weight" vs "a.weight_x" style prefixes

    def split(rest: str) -> tuple[str, str]:
        for name in names:
            if rest.startswith(name + "."):
                return name, rest[len(name) + 1 :]
        raise ValueError(f"Optimizer entry {rest!r} names no parameter of the checkpoint's state_dict.")

    for key, value in state.items():
        kind, _, rest = key.partition(".")
        if kind == "state":
            fqn, field = split(rest)
            per_param.setdefault(fqn, {})[field] = value
        elif kind == "param_groups":
            fqn, field = split(rest)
            groups.setdefault(fqn, {})[field] = value
    position = {n: i for i, n in enumerate(order)}
    distinct: list[tuple[dict[str, Any], list[str]]] = []
    for fqn in sorted(groups, key=lambda n: position.get(n, len(position))):
        for hparams, members in distinct:
            if hparams == groups[fqn]:
                members.append(fqn)
                break
        else:
            distinct.append((groups[fqn], [fqn]))
    new_groups, new_state, next_id = [], {}, 0
    for hparams, members in distinct:
        ids = []
        for fqn in members:
            if fqn in per_param:
                new_state[next_id] = per_param[fqn]
            ids.append(next_id)
            next_id += 1
        new_groups.append({**hparams, "params": ids})
    return {"state": new_state, "param_groups": new_groups}


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
        states = [checkpoint.pop(k) for k in keys]
        if any("state" not in st and "param_groups" not in st for st in states):  # flat layout (pipeline parallel)
            order = _canonical_order(checkpoint)
            checkpoint["state_dict"] = {k: checkpoint["state_dict"][k] for k in order}
            checkpoint["optimizer_states"] = [_unflatten_optimizer(st, order) for st in states]
        else:
            checkpoint["optimizer_states"] = [_rekey_optimizer(st) for st in states]
    if not (path / _METADATA_FILENAME).is_file():
        raise ValueError(f"{str(path)!r} lacks {_METADATA_FILENAME}: it was not written by a Lightning Trainer.")
    return checkpoint


def consolidate_checkpoint(checkpoint_dir: str | Path, output_file: str | Path, overwrite: bool = False) -> Path:
    """Write a sharded checkpoint folder as one ordinary checkpoint file, atomically.

    Args:
        checkpoint_dir: the sharded folder (e.g. ``.../checkpoints/epoch=0-step=100.ckpt/``, with a ``.metadata`` file).
        output_file: the single ``.ckpt`` file to write.
        overwrite: replace ``output_file`` when it exists.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``output_file`` exists and ``overwrite`` is False.
        ValueError: ``checkpoint_dir`` is not a sharded Lightning checkpoint folder.
    """
    out = Path(output_file)
    if out.exists() and not overwrite:
        raise FileExistsError(f"`output_file` {str(out)!r} exists; pass overwrite=True or another path.")
    atomic_torch_save(load_sharded_checkpoint(checkpoint_dir), out)
    return out
