"""``lightning-llm``: ONE command line program.

* ``fit | validate | test | predict``: a LightningCLI (model and data by ``class_path``; the data's vocabulary is
  linked to the model's ``vocab_size``; :class:`~lightning_llm.callbacks.MetricsFile` writes
  ``<log_dir>/<stage>_metrics.json`` and ``predictions.jsonl``);
* ``evaluate``: the HELM-style evaluation suite (:func:`lightning_llm.evaluation.evaluate`);
* ``plan``: the parallel-layout planner: memory, bytes per collective, step time, a ranked recommendation
  (:func:`lightning_llm.parallel.planner.plan_command`);
* ``export``: any checkpoint of ours (a ``.ckpt`` file or a sharded folder) to a Hugging Face directory, or a sharded
  folder to one ``.ckpt`` file (:func:`export`);
* ``presets``: the packaged YAML presets.

Every subcommand takes ``--config FILE`` (several stack, later ones win); a name that is not a file is looked up
among the packaged presets (``--config quickstart``, ``--config rlhf/ppo_quickstart``, ``--config
configs/trainer/cpu_ddp.yaml`` from any folder). Arguments are typed and documented (``lightning-llm CMD --help``).

Exit status: 0 on success; 1 with one line ``lightning-llm: error: ...`` on stderr when the run fails (the full
traceback with ``--debug`` or ``LIGHTNING_LLM_DEBUG=1``); 2 for a command line that does not parse; 130 when
interrupted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_llm._dist import destroy_process_group, process_group_initialized

__all__ = ["LightningLLMCLI", "export", "main", "preset_path", "presets", "run"]

PRESETS_DIR = Path(__file__).resolve().parent / "configs"
_DEBUG_ENV = "LIGHTNING_LLM_DEBUG"


# ------------------------------------------------------------------------------------------------ presets
def _preset_names() -> list[str]:
    return sorted(str(p.relative_to(PRESETS_DIR).with_suffix("")) for p in PRESETS_DIR.rglob("*.yaml"))


def preset_path(name: str) -> Path:
    """The packaged preset called ``name`` (``quickstart``, ``rlhf/ppo_quickstart``, ``trainer/cpu_ddp.yaml``,
    ``configs/quickstart.yaml`` or a unique file name such as ``ppo_quickstart``)."""
    key = name.removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    candidate = PRESETS_DIR / f"{key}.yaml"
    if candidate.is_file():
        return candidate
    matches = [n for n in _preset_names() if n.rsplit("/", 1)[-1] == key]
    if len(matches) == 1:
        return PRESETS_DIR / f"{matches[0]}.yaml"
    hint = f"it matches several presets: {matches}" if matches else "no packaged preset has that name"
    raise FileNotFoundError(
        f"--config {name!r}: no such file, and {hint}. Pass a YAML path, or one of the presets listed by "
        "`lightning-llm presets`."
    )


def presets() -> list[str]:
    """Print the packaged presets (name and first comment line) and return their names."""
    names = _preset_names()
    for name in names:
        first = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{name:32s} {about}")
    return names


def _resolve_configs(argv: list[str]) -> list[str]:
    """Replace every ``--config NAME`` whose NAME is not an existing file by the packaged preset's path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            value, j = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, j = arg.split("=", 1)[1], None
        else:
            continue
        if value.lstrip().startswith(("{", "[")) or os.path.exists(value):
            continue
        path = str(preset_path(value))
        if j is None:
            out[i] = f"--config={path}"
        else:
            out[j] = path
    return out


# ------------------------------------------------------------------------------------------------ LightningCLI
class LightningLLMCLI(LightningCLI):
    """LightningCLI with the data's vocabulary linked to the model, metric files written, the tokenizer saved, and a
    checkpoint of the final weights when ``fit`` ends past the last validation (:class:`FinalCheckpoint`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` with :func:`~lightning_llm.checkpoint.load_checkpoint` first: a hostile or damaged
        file gets our one clear error (nothing in it runs) instead of torch's paragraphs."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            from lightning_llm.checkpoint import load_checkpoint

            load_checkpoint(path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        from lightning_llm.callbacks.final_checkpoint import FinalCheckpoint
        from lightning_llm.callbacks.metrics_file import MetricsFile

        trainer = super().instantiate_trainer(**kwargs)
        for kind in (MetricsFile, FinalCheckpoint):
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.append(kind())
        return trainer

    def after_fit(self) -> None:
        """A final validation of the trained weights (so ``fit_metrics.json`` always holds the closing validation
        perplexity), the unigram baseline beside it, and the tokenizer saved beside the checkpoints."""
        from lightning_llm.callbacks.metrics_file import MetricsFile

        trainer, datamodule = self.trainer, self.datamodule
        if trainer.interrupted:
            return
        if trainer.limit_val_batches != 0 and datamodule is not None and hasattr(datamodule, "val_dataloader"):
            fit_metrics = dict(trainer.callback_metrics)
            trainer.validate(self.model, datamodule=datamodule, verbose=False)
            fit_metrics.update(trainer.callback_metrics)
            trainer.callback_metrics.update(fit_metrics)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        tokenizer = getattr(datamodule, "tokenizer", None)
        if trainer.is_global_zero and hasattr(tokenizer, "save"):
            tokenizer.save(os.path.join(log_dir, "tokenizer"))
        for callback in trainer.callbacks:
            if isinstance(callback, MetricsFile):
                callback.write(trainer, "fit")
        if trainer.is_global_zero and "val/ppl" in trainer.callback_metrics:
            line = f"[lightning-llm] validation perplexity {float(trainer.callback_metrics['val/ppl']):.2f}"
            if "data/val_unigram_ppl" in trainer.callback_metrics:
                line += f" (unigram baseline {float(trainer.callback_metrics['data/val_unigram_ppl']):.2f})"
            print(line)


def _lightning(argv: list[str]) -> int:
    cli = LightningLLMCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
    return 130 if cli.trainer is not None and cli.trainer.interrupted else 0


# ------------------------------------------------------------------------------------------------ export
def export(
    checkpoint: str,
    output: str,
    tokenizer: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    merge: bool = False,
    chat_template: str | None = None,
) -> str:
    """Export a checkpoint of ours to a Hugging Face directory (or a sharded folder to one ``.ckpt`` file).

    A LoRA checkpoint (adapters + a reference to its base) exports as the base model in ``output`` and the adapters in
    ``output/adapter`` (``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(output),
    output/adapter)`` gives the fine-tuned model; Llama-shaped bases), or, with ``merge``, as one model with the
    adapters folded in.

    Args:
        checkpoint: a ``.ckpt`` file written by any lightning_llm module, or a sharded checkpoint folder.
        output: a directory for a Hugging Face model (``config.json``, safetensors weights, tokenizer files with a
            chat template), or a path ending in ``.ckpt`` to consolidate a sharded folder into one Lightning
            checkpoint file (which resumes on one device).
        tokenizer: a tokenizer directory to save with the model instead of the one stored in the checkpoint.
        dtype: weight dtype of the export (``float32``, ``bfloat16``, ``float16``); default: as trained.
        overwrite: replace an existing ``output``.
        merge: for a LoRA checkpoint, fold the adapters into the weights instead of writing them separately.
        chat_template: a Jinja chat template for the exported tokenizer (default: the tokenizer's own; for this
            project's tokenizers the default format its data modules render conversations with).

    Returns:
        The path written.
    """
    out = Path(output)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"`output`={output!r} exists and is not empty; pass --overwrite true or another path.")
    if out.suffix == ".ckpt":
        from lightning_llm.parallel.consolidate import consolidate_checkpoint

        path = consolidate_checkpoint(checkpoint, out, overwrite=overwrite)
        print(f"[lightning-llm] consolidated {checkpoint} -> {path}")
        return str(path)
    from lightning_llm.hf import save_hf, save_lora_adapter
    from lightning_llm.loading import load_pretrained
    from lightning_llm.nn.lora import has_lora

    model, tok = load_pretrained(checkpoint, dtype=dtype, tokenizer=tokenizer, merge=merge)
    if has_lora(model):
        path = save_lora_adapter(model, out, tokenizer=tok, chat_template=chat_template)
        print(f"[lightning-llm] exported {checkpoint} -> {path} (base) + {path / 'adapter'} (peft LoRA adapter)")
        return str(path)
    path = save_hf(model, out, tokenizer=tok, chat_template=chat_template)
    print(f"[lightning-llm] exported {checkpoint} -> {path} (Hugging Face format)")
    return str(path)


# ------------------------------------------------------------------------------------------------ dispatch
def _function_commands() -> dict[str, Callable[..., Any]]:
    from lightning_llm.evaluation import evaluate
    from lightning_llm.parallel.planner import plan_command

    return {"evaluate": evaluate, "plan": plan_command, "export": export}


def _run_function(name: str, fn: Callable[..., Any], argv: list[str]) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"lightning-llm {name}", description=(fn.__doc__ or "").split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file (or packaged preset) of arguments")
    parser.add_function_arguments(fn, as_positional=False)
    cfg = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49 renamed it
    kwargs = instantiate(cfg).as_dict()
    kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    result = fn(**kwargs)
    parts = result.get("parts", {}) if isinstance(result, dict) else {}  # evaluate's report: one status per part
    failed = [part for part, value in parts.items() if isinstance(value, dict) and value.get("status", "ok") != "ok"]
    if failed:
        print(f"lightning-llm: error: {name} finished, but these parts failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


USAGE = """usage: lightning-llm {fit,validate,test,predict,evaluate,plan,export,presets} [--config FILE|PRESET ...] [--debug]

  fit, validate, test, predict   Lightning Trainer stages (lightning-llm fit --config quickstart)
  evaluate                       HELM-style evaluation report of a model (lightning-llm evaluate --model PATH)
  plan                           memory, communication and step time of DDP / FSDP / TP / pipeline layouts
  export                         a checkpoint of ours to a Hugging Face directory (or a sharded folder to one .ckpt)
  presets                        list the packaged YAML presets
Each subcommand's arguments: lightning-llm CMD --help"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program on ``argv`` (default ``sys.argv[1:]``) and return its exit status (see the module docstring).

    A torch.distributed process group that the command created (the Trainer's under ``torchrun``, HarnessLM's) is
    destroyed before returning: a gloo group left to interpreter finalization can abort the process after a run that
    succeeded (:mod:`lightning_llm._dist`). A group that was there before the call is left to its owner."""
    owned = not process_group_initialized()
    try:
        return _main(argv)
    finally:
        if owned:
            destroy_process_group()


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        rest = _resolve_configs(rest)
        if command == "presets":
            presets()
            return 0
        if command in ("evaluate", "plan", "export"):
            return _run_function(command, _function_commands()[command], rest)
        return _lightning(argv[:1] + rest)
    except KeyboardInterrupt:
        print("lightning-llm: interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:  # argument parsing: jsonargparse has printed the usage and the reason
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line, the traceback only on request
        if debug:
            raise
        print(f"lightning-llm: error: {_one_line(err)}", file=sys.stderr)
        print(f"  (run again with --debug or {_DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """The innermost cause's type and first message line (jsonargparse wraps errors raised while instantiating)."""
    while err.__cause__ is not None and str(err.__cause__):
        err = err.__cause__
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''}".strip()


def run() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
