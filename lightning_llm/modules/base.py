"""``LLMModule``: the one small base of every LightningModule here (CausalLM, RewardModel, DPO, PPO, ...).

It owns the glue each module would otherwise write again:

* **backbone**: :meth:`build_backbone` gives our :class:`~lightning_llm.nn.Transformer` from ``config`` (with
  ``vocab_size`` linked from the data), or from ``pretrained``: anything :func:`lightning_llm.load_pretrained` reads
  (a Hugging Face directory, a checkpoint of any of our modules, a sharded checkpoint folder), in ``dtype``;
* **configure_model**: builds the module's models once (:meth:`build`, idempotent), then, under Lightning's
  ``ModelParallelStrategy`` (FSDP2 / tensor parallel), applies :func:`lightning_llm.parallel.parallelize` to every
  transformer the module lists in :meth:`transformers` and :func:`lightning_llm.parallel.shard_heads` to the small
  modules of :meth:`heads` (a trainable parameter left out of both is an error: nothing would average its gradient);
  on one device, ``compile=True`` compiles them;
* **tokenizer**: taken over from the data module in ``setup`` after checking the vocabulary and the context length;
  stored in and restored from checkpoints as plain strings (safe under ``torch.load(weights_only=True)``);
* **LoRA** (``lora``, through ``peft``): adapters injected into the backbone :meth:`build_backbone` returns; a
  checkpoint then holds only the adapters (and their optimiser state) plus a reference to the base (``pretrained``),
  never the frozen base; :meth:`make_reference` gives DPO / PPO their reference model (the base with adapters
  disabled, no second copy); :meth:`merge_lora` folds the adapters in;
* **gradient_checkpointing**: every block of the backbone recomputed in the backward (any strategy);
* **optimiser**: LightningCLI-style ``optimizer`` / ``scheduler`` callables, or by default AdamW (weight decay on
  matrices only; torch's fused kernel where it exists for the parameters) with linear warmup and cosine decay to
  ``min_lr_ratio`` over the run.

A subclass sets :attr:`defaults` (its own learning rate, weight decay, warmup), implements :meth:`build` and
:meth:`transformers`, and passes its other arguments to ``super().__init__(**kwargs)`` (jsonargparse follows the
``**kwargs`` to this signature, so the CLI sees every argument).

Notation: "matrices" are parameters with ``dim() >= 2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer, tokenizer_from_state, tokenizer_state
from lightning_llm.loading import load_pretrained
from lightning_llm.nn.transformer import Transformer
from lightning_llm.ops import is_plain

__all__ = ["LLMModule", "check_data_fits", "frozen_copy", "fused_adamw_supported", "warmup_cosine_lambda"]

# checkpoints store the config dataclass in `hyper_parameters`; allow it under torch.load(weights_only=True) (resume)
torch.serialization.add_safe_globals([TransformerConfig])


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """Multiplier for ``LambdaLR``: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def frozen_copy(module: torch.nn.Module, trainable: bool = False) -> torch.nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` (reference models); ``trainable=True`` gives a trainable
    copy in train mode instead (e.g. a value model initialised from the frozen reward model)."""
    import copy

    out = copy.deepcopy(module)
    out.train(trainable)
    out.requires_grad_(trainable)
    return out


class LLMModule(L.LightningModule):
    """Base LightningModule: backbone, tokenizer, optimiser and scheduler, checkpoint hooks, ``configure_model``.

    Args:
        config: architecture of a backbone built here (ignored when ``pretrained`` is given).
        pretrained: a Hugging Face causal-LM directory (or hub name, online), a checkpoint of any of our modules, or a
            sharded checkpoint folder: the backbone's weights (see :func:`lightning_llm.load_pretrained`).
        vocab_size: the data's vocabulary (the CLI links it from ``data.vocab_size``): overrides ``config.vocab_size``
            when the config gives none, must equal it when it gives one; with ``pretrained`` it must not exceed the
            model's.
        dtype: parameter dtype of the backbone (``"float32"``, ``"bfloat16"``, ``"float16"``; default float32 for a
            config, the stored dtype for ``pretrained``).
        learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio: the default AdamW (weight decay on matrices
            only) with linear warmup then cosine decay to ``min_lr_ratio * lr`` over the run; ``None`` takes the
            module's own default (:attr:`defaults`).
        optimizer, scheduler: LightningCLI callables (``class_path`` of any torch optimizer / scheduler) that replace
            the default AdamW / warmup-cosine.
        compile: ``torch.compile`` the transformers: ``True``, or a dict of ``torch.compile`` keyword arguments
            (``{mode: max-autotune}``, ``{backend: aot_eager}``, ...). Single device and DDP; the FSDP2 presets
            compile per block instead (their ``compile`` option).
        parallel: keyword arguments of :func:`lightning_llm.parallel.parallelize` that override the strategy's.
        lora: LoRA adapters on the backbone (:class:`~lightning_llm.nn.lora.LoraSettings` fields: ``r``, ``alpha``,
            ``dropout``, ``target_modules``, ``use_rslora``), e.g. ``{r: 8, alpha: 16, target_modules: [q_proj,
            v_proj]}``; ``None``: full fine-tuning.
        gradient_checkpointing: recompute each block's activations in the backward instead of storing them.
    """

    #: hyper-parameter defaults used where the argument is ``None``; subclasses override
    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 3e-4, "weight_decay": 0.1, "warmup_steps": 100}
    #: constructor arguments kept out of ``hparams`` (callables)
    hparams_ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config: TransformerConfig | None = None,
        pretrained: str | None = None,
        vocab_size: int | None = None,
        dtype: str | None = None,
        learning_rate: float | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        compile: bool | dict[str, Any] = False,
        parallel: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(compile, (bool, dict)):
            raise TypeError(
                f"`compile` must be true/false or a dict of torch.compile keyword arguments, got {compile!r}. "
                "Fix: e.g. compile: true, or compile: {mode: max-autotune}."
            )
        if lora is not None:
            from lightning_llm.nn.lora import LoraSettings

            lora = LoraSettings.from_any(lora).to_dict()  # validated now, not after minutes of loading
        if isinstance(config, dict):
            config = TransformerConfig.from_dict(config)
        if config is not None and not isinstance(config, TransformerConfig):
            raise TypeError(
                f"`config` must be a TransformerConfig or a dict of its fields, got {type(config).__name__}."
            )
        if pretrained is None:
            config = config if config is not None else TransformerConfig()
            default_vocab = TransformerConfig.__dataclass_fields__["vocab_size"].default
            if vocab_size is not None and config.vocab_size not in (vocab_size, default_vocab):
                raise ValueError(
                    f"`config.vocab_size`={config.vocab_size} but the data's tokenizer has vocab_size={vocab_size} "
                    "(the CLI links it to the model). Remove vocab_size from the model config (the data's is used), "
                    "or train the tokenizer with that vocabulary."
                )
            if vocab_size is not None and vocab_size != config.vocab_size:
                config = TransformerConfig.from_dict(
                    {**config.to_dict(), "vocab_size": vocab_size, "padded_vocab_size": None}
                )
        self.config: TransformerConfig | None = None if pretrained is not None else config
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *self.hparams_ignore])
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.tokenizer: Tokenizer | None = None
        self._lora_model: torch.nn.Module | None = None
        self._lora_merged = False
        if lora is not None:
            self.strict_loading = False  # a LoRA checkpoint holds only the adapters; the base comes from `pretrained`
        self._built = False
        self._parallelized = False

    # -------------------------------------------------------------------------------------------- settings
    def setting(self, name: str) -> Any:
        """``hparams[name]``, or the module's default (:attr:`defaults`) where it is ``None``."""
        value = self.hparams.get(name)
        return self.defaults.get(name) if value is None else value

    # -------------------------------------------------------------------------------------------- building
    def build_backbone(self) -> Transformer:
        """Our :class:`Transformer` from ``config`` or ``pretrained`` (see the class docstring), with LoRA adapters
        (``lora``) and gradient checkpointing (``gradient_checkpointing``) applied."""
        model = self._load_backbone()
        hp = self.hparams
        if hp.get("lora") is not None:
            from lightning_llm.nn.lora import apply_lora

            apply_lora(model, hp.lora)
            object.__setattr__(self, "_lora_model", model)  # a plain reference: not a second registered submodule
        if hp.get("gradient_checkpointing"):
            from lightning_llm.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        return model

    def _load_backbone(self) -> Transformer:
        hp = self.hparams
        if hp.pretrained is None:
            model = Transformer(self.config)
            return model if hp.dtype is None else model.to(_dtype(hp.dtype))
        model, tokenizer = load_pretrained(hp.pretrained, dtype=hp.dtype)
        if hp.vocab_size is not None and hp.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {hp.vocab_size} tokens but the pretrained model {hp.pretrained!r} only "
                f"{model.config.vocab_size}; use the model's own tokenizer (data tokenizer={hp.pretrained!r})."
            )
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        else:
            check_data_fits(model.config, self.tokenizer, None)
        self.config = model.config
        return model.train()

    def build(self) -> None:
        """Create the module's models (called once, by :meth:`configure_model`)."""
        raise NotImplementedError

    def make_reference(self, policy: torch.nn.Module) -> Any:
        """The frozen reference model of ``policy`` (DPO, PPO): under LoRA the policy itself with its adapters
        disabled (:class:`~lightning_llm.nn.lora.ReferenceView`, no second copy of the weights); otherwise a frozen
        deep copy (:func:`frozen_copy`)."""
        from lightning_llm.nn.lora import ReferenceView, has_lora

        return ReferenceView(policy) if has_lora(policy) else frozen_copy(policy)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the base weights (``W + s B A``); the module trains and saves as a full model
        afterwards."""
        from lightning_llm.nn.lora import merge_lora

        if self._lora_model is None:
            raise ValueError(f"{type(self).__name__}.merge_lora: the module has no LoRA adapters (`lora` is None).")
        merge_lora(self._lora_model)
        self._lora_merged = True
        self.strict_loading = True

    def transformers(self) -> list[torch.nn.Module]:
        """The transformers that ``configure_model`` shards or compiles (policy, reference, value, reward...).

        May list a LoRA reference (:class:`~lightning_llm.nn.lora.ReferenceView`, not a module): :meth:`_models`
        skips it, since sharding or compiling the policy covers it."""
        raise NotImplementedError

    def _models(self) -> list[torch.nn.Module]:
        return [m for m in self.transformers() if isinstance(m, torch.nn.Module)]

    def heads(self) -> list[torch.nn.Module]:
        """Modules outside :meth:`transformers` that hold parameters (the scalar heads of reward and value models).

        Under a sharding strategy ``configure_model`` shards them too (:func:`~lightning_llm.parallel.shard_heads`),
        so that their gradients are averaged over the data-parallel ranks. Default: none."""
        return []

    def configure_model(self) -> None:
        """Build the models once; then shard them under a model-parallel strategy, or compile them on one device.

        Under a sharding strategy this runs inside its init context (meta device), and is idempotent.
        """
        if not self._built:
            self.build()
            self._built = True
        if self._parallelized:
            return
        hp = self.hparams
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2 / tensor parallel
            from lightning_llm.parallel import parallelize, shard_heads

            strategy = self._trainer.strategy if self._trainer is not None else None
            options = {**getattr(strategy, "parallelize_kwargs", {}), **(hp.parallel or {})}  # the module's win
            for model in self._models():
                parallelize(model, self._device_mesh, **options)
            shard_heads(self.heads(), self._device_mesh, **options)
            self._check_sharded()
            self._parallelized = True
        elif hp.compile:
            kwargs = dict(hp.compile) if isinstance(hp.compile, dict) else {}
            for model in self._models():
                model.compile(**kwargs)
            self._parallelized = True

    def _check_sharded(self) -> None:
        """Raise when FSDP2 shards over several ranks but a trainable parameter stayed a plain tensor: nothing would
        average its gradient, and every rank would train its own copy."""
        from torch.distributed.tensor import DTensor

        from lightning_llm.parallel.parallelize import _data_parallel_mesh

        dp_mesh = _data_parallel_mesh(self._device_mesh)
        if dp_mesh is None or dp_mesh.size() == 1:
            return
        plain = [n for n, p in self.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if plain:
            raise ValueError(
                f"{type(self).__name__}: under FSDP2 the trainable parameters {plain[:5]}{' ...' if len(plain) > 5 else ''}"
                " are neither in a module of `transformers()` nor of `heads()`, so they are not sharded and their "
                "gradients would not be averaged over the data-parallel ranks. List their modules in `heads()`."
            )

    # -------------------------------------------------------------------------------------------- tokenizer
    def setup(self, stage: str) -> None:
        """Take the data module's tokenizer after checking it against the architecture (vocabulary and context).

        Runs before ``configure_model`` (which may build on the meta device), so it checks ``self.config``; a
        ``pretrained`` backbone is checked when it is built (:meth:`build_backbone`).
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        self.tokenizer = tokenizer
        if self.config is not None:
            check_data_fits(self.config, tokenizer, getattr(datamodule, "block_size", None))

    # -------------------------------------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The ``optimizer`` callable, or AdamW with weight decay on matrices only.

        The default AdamW is torch's fused one (one kernel per step for all parameters: what TRL's
        ``adamw_torch_fused`` default runs, the same update up to rounding) wherever this torch has it for every
        parameter (:func:`fused_adamw_supported`: dense floating-point tensors on a device with the kernel; CPU since
        torch 2.4); otherwise, or if torch still refuses, its default (``foreach``) implementation.
        """
        params = [p for p in params if p.requires_grad]
        if self.optimizer_fn is not None:
            return self.optimizer_fn(params)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.setting("weight_decay")},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kwargs = {"lr": self.setting("learning_rate"), "betas": tuple(self.hparams.betas)}
        if fused_adamw_supported(params):
            try:
                return torch.optim.AdamW(groups, fused=True, **kwargs)
            except (RuntimeError, ValueError, TypeError):  # a device / dtype / version this check did not foresee
                pass
        return torch.optim.AdamW(groups, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer(self.trainable_parameters())
        if self.scheduler_fn is not None:
            scheduler = self.scheduler_fn(optimizer)
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
            warmup = min(self.setting("warmup_steps"), max(0, total // 2))
            lr_lambda = warmup_cosine_lambda(warmup, total, self.hparams.min_lr_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_lr(self, batch_size: int) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what rebuilds the backbone and tokenizer without this class: the config dict and tokenizer JSON."""
        if self.config is not None:
            checkpoint["transformer_config"] = self.config.to_dict()
        checkpoint.update(tokenizer_state(self.tokenizer) or {})
        self._save_lora(checkpoint)

    def _save_lora(self, checkpoint: dict[str, Any]) -> None:
        """Under LoRA with a ``pretrained`` base: keep only the adapters of the backbone (drop its frozen base weights)
        and record the settings and the base (an absolute path when it is local)."""
        model, hp = self._lora_model, self.hparams
        if model is None or self._lora_merged or hp.get("lora") is None:
            return
        prefix = next((f"{name}." for name, m in self.named_modules() if m is model and name), None)
        base = hp.pretrained
        if base is not None and Path(base).expanduser().exists():
            base = str(Path(base).expanduser().resolve())
        checkpoint["lora"] = {"settings": dict(hp.lora), "base": base, "prefix": prefix}
        state = checkpoint.get("state_dict")
        if base is None or prefix is None or state is None:
            return  # a base built from `config` is not reproducible from a reference: keep its weights
        for key in [k for k in state if k.startswith(prefix) and ".lora_A." not in k and ".lora_B." not in k]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is None:
            self.tokenizer = tokenizer_from_state(checkpoint)


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(..., fused=True)`` can take ``params``: every one a plain dense tensor (not a
    DTensor or another subclass), of a floating-point dtype, on a device this torch has the fused kernel for (CUDA
    and, since torch 2.4, CPU; torch's own list where it exposes one)."""
    params = list(params)
    if not params:
        return False
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: CUDA only
        devices = {"cuda"}
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        devices.discard("cpu")  # the CPU kernel arrived in torch 2.4
    return all(
        is_plain(p) and p.layout == torch.strided and p.dtype.is_floating_point and p.device.type in devices
        for p in params
    )


def check_data_fits(config: TransformerConfig, tokenizer: Any, block_size: int | None, what: str = "model") -> None:
    """Raise when the data's tokenizer has more ids than ``config``'s vocabulary, or its blocks are longer than the
    model's context (``what`` names the model in the message)."""
    n = getattr(tokenizer, "vocab_size", None)
    if n is not None and n > config.vocab_size:
        raise ValueError(
            f"Tokenizer/model vocabulary mismatch: the tokenizer has {n} tokens but the {what}'s vocab_size is "
            f"{config.vocab_size}. Set model vocab_size={n} (the CLI links it from data.vocab_size)."
        )
    if isinstance(block_size, int) and block_size > config.block_size:
        raise ValueError(
            f"Context mismatch: the data's block_size is {block_size} but the {what}'s block_size is "
            f"{config.block_size}. Set data block_size <= {config.block_size}, or the model's config.block_size >= "
            f"{block_size} (the CLI links model config.block_size from data.block_size when the config omits it)."
        )


def _dtype(name: str) -> torch.dtype:
    from lightning_llm.loading import resolve_dtype

    return resolve_dtype(name)
