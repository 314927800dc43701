"""LoRA on any ``torch.nn.Module`` through ``peft`` (pure torch + peft; no Lightning).

``W x + s B A x`` with ``A (r, in)`` Kaiming-uniform, ``B (out, r)`` zero (training starts at the base model) and
``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Adapters are injected in place with ``peft.inject_adapter_in_model``
(the module keeps its class and its forward; each targeted ``nn.Linear`` becomes a ``peft`` ``lora.Linear``, as
:class:`LeanLoraLinear` below, whose base weight sits at ``<name>.base_layer.weight`` and adapters at ``<name>.lora_A.default.weight`` /
``<name>.lora_B.default.weight``). Only adapter weights are trainable afterwards: the frozen base has no gradients
(so no optimiser state either) and keeps its own dtype (no float32 copy).

Each adapted ``nn.Linear`` runs as :class:`LeanLoraLinear` (peft's layer, one method changed): in the common case it
adds ``s B A x`` into the base output in place with one ``addmm_``, so the ``B A x``, ``B A x * s`` and ``W x + ...``
copies of peft's forward (output-sized temporaries per layer, in the forward of every step) and the ``s * grad`` of its
backward do not exist.

* :func:`apply_lora` validates the settings (targets that match nothing, a rank larger than a layer) and injects;
* :func:`adapters_disabled` is a context manager running the base model (the reference model of DPO / PPO, no copy);
* :func:`merge_lora` folds ``s B A`` into the base weights and removes the adapter layers;
* :func:`lora_state_dict` / :func:`load_lora_checkpoint` store and restore adapters without the frozen base.

Notation: r rank, s scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_llm.ops import is_plain

__all__ = [
    "LoraSettings",
    "ReferenceView",
    "adapters_disabled",
    "apply_lora",
    "has_lora",
    "load_lora_checkpoint",
    "lora_layers",
    "merge_lora",
]

#: the linear layers of :class:`~lightning_llm.nn.Transformer` LoRA may target
TRANSFORMER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft's names in brackets).

    Args:
        r: rank (``r``; peft default 8).
        alpha: scale numerator (``lora_alpha``; default 8 like peft): the update is ``alpha / r * B A``.
        dropout: dropout on the adapter's input (``lora_dropout``).
        target_modules: module names (the last part of the name, e.g. ``q_proj``) or ``"all-linear"`` (every
            projection of the blocks).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False

    @classmethod
    def from_any(cls, value: LoraSettings | dict[str, Any]) -> LoraSettings:
        if isinstance(value, LoraSettings):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"`lora` must be a dict of LoraSettings fields, got {type(value).__name__}.")
        aliases = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}
        value = {aliases.get(k, k): v for k, v in value.items()}
        unknown = set(value) - {"r", "alpha", "dropout", "target_modules", "use_rslora"}
        if unknown:
            raise ValueError(
                f"`lora` has unknown keys {sorted(unknown)}; expected r, alpha, dropout, target_modules, use_rslora."
            )
        out = cls(**value)
        if isinstance(out.target_modules, str):
            out.target_modules = (
                [n for n in TRANSFORMER_LINEARS if n != "lm_head"]
                if out.target_modules == "all-linear"
                else [out.target_modules]
            )
        if isinstance(out.r, bool) or not isinstance(out.r, int) or out.r < 1:
            raise ValueError(f"`lora.r` (the rank) must be a positive integer, got {out.r!r}.")
        if not 0.0 <= float(out.dropout) < 1.0:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {out.dropout!r}.")
        if not out.target_modules:
            raise ValueError("`lora.target_modules` is empty; name at least one layer, e.g. [q_proj, v_proj].")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peft_config(self, target_modules: Sequence[str] | None = None, **kwargs: Any):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(target_modules or self.target_modules),
            use_rslora=self.use_rslora,
            **kwargs,
        )


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside ``model``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def apply_lora(model: nn.Module, settings: LoraSettings | dict[str, Any]) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place (``peft.inject_adapter_in_model``); only adapters stay trainable.

    Raises:
        ValueError: a target that matches no ``nn.Linear`` of the model (names the linear layers it has), a rank
            larger than ``min(in_features, out_features)`` of a targeted layer, or the ``lm_head`` of our
            :class:`~lightning_llm.nn.Transformer` (which projects with ``output_weight``, never calling the layer).
    """
    from peft import inject_adapter_in_model

    settings = LoraSettings.from_any(settings)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    available = sorted({name.rsplit(".", 1)[-1] for name in linears})
    for target in settings.target_modules:
        hits = [name for name in linears if _matches(name, target)]
        if not hits:
            raise ValueError(
                f"`lora.target_modules` entry {target!r} matches no linear layer of the model; it has {available}. "
                "Use those names (e.g. [q_proj, v_proj]) or 'all-linear'."
            )
        for name in hits:
            lin = linears[name]
            if settings.r > min(lin.in_features, lin.out_features):
                raise ValueError(
                    f"`lora.r`={settings.r} is larger than the layer {name!r} ({lin.in_features} -> "
                    f"{lin.out_features}): a rank-r update cannot exceed min(in, out)="
                    f"{min(lin.in_features, lin.out_features)}. Use r <= {min(lin.in_features, lin.out_features)}."
                )
        if "lm_head" in hits and hasattr(model, "output_weight"):
            raise ValueError(
                "`lora.target_modules` includes 'lm_head', but lightning_llm's Transformer computes its loss and logits "
                "from `output_weight` directly, so an adapter there would never be used. Adapt the block projections "
                "(e.g. 'all-linear') or train the output layer fully."
            )
    model.requires_grad_(False)
    inject_adapter_in_model(settings.peft_config(), model)
    lean = _lean_linear_class()
    for layer in lora_layers(model):  # peft's own freezing marks only adapters trainable; make it explicit
        for p in layer.lora_A.parameters():
            p.requires_grad_(True)
        for p in layer.lora_B.parameters():
            p.requires_grad_(True)
        if type(layer) is lean.__base__ and type(layer.get_base_layer()) is nn.Linear:
            layer.__class__ = lean
    return model


_LEAN_LINEAR: type | None = None


def _lean_linear_class() -> type:
    """:class:`LeanLoraLinear`, defined on first use (``peft`` is imported only when LoRA is used)."""
    global _LEAN_LINEAR
    if _LEAN_LINEAR is None:
        from peft.tuners.lora.layer import Linear

        class LeanLoraLinear(Linear):
            """peft's LoRA ``Linear`` whose forward, for one active plain adapter (not merged, not DoRA or another
            variant, input already in the adapter's dtype, no extra arguments), is the same value (up to rounding)
            and gradients as peft's ``W x + b + B A dropout(x) * s`` with fewer output-sized temporaries:

            * no dropout, dense tensors of one dtype, no autocast: :class:`_LoraLinearFunction` (one ``addmm_`` adds
              the update into the base output; the backward sums the input gradient of both paths in one buffer);
            * otherwise ``add_`` of ``B A dropout(x)`` into the base output, in place (the base output is not saved
              for backward), or peft's own forward where even that does not apply.
            """

            def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                active = self.active_adapters
                if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
                    return super().forward(x, *args, **kwargs)
                name = active[0]
                if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
                    return super().forward(x)
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                if x.dtype != lora_a.weight.dtype:
                    return super().forward(x)
                scale = self.scaling[name]
                base = self.base_layer
                tensors = (x, base.weight, base.bias, lora_a.weight, lora_b.weight)
                if (
                    x.dim() >= 1
                    and isinstance(self.lora_dropout[name], nn.Identity)
                    and lora_a.bias is None
                    and lora_b.bias is None
                    and not (base._forward_hooks or base._forward_pre_hooks)
                    and all(t is None or (is_plain(t) and t.dtype == x.dtype and t.device == x.device) for t in tensors)
                    and not _autocast_on(x.device.type)
                ):
                    rows = x.reshape(-1, x.shape[-1])  # (N, in), a view of a contiguous x
                    out = _LoraLinearFunction.apply(rows, base.weight, base.bias, lora_a.weight, lora_b.weight, scale)
                    return out.view(*x.shape[:-1], out.shape[-1])
                result = base(x)
                update = lora_b(lora_a(self.lora_dropout[name](x)))
                if update.dtype != result.dtype:
                    return super().forward(x)
                return result.add_(update, alpha=scale)  # the base output is not saved for backward

        LeanLoraLinear.__module__ = __name__
        LeanLoraLinear.__qualname__ = "LeanLoraLinear"  # pickles as lightning_llm.nn.lora.LeanLoraLinear
        _LEAN_LINEAR = LeanLoraLinear
    return _LEAN_LINEAR


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no per-device query
        return torch.is_autocast_enabled() or (device_type == "cpu" and torch.is_autocast_cpu_enabled())


class _LoraLinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` for rows ``x (N, in)``, ``W (out, in)``, ``A (r, in)``, ``B (out, r)``.

    Forward: ``low = x A^T`` (N, r), ``y = x W^T + b``, then ``y.addmm_(low, B^T, alpha=s)`` in place: no ``B A x``
    or ``B A x * s`` temporary. Saves ``x`` and ``low`` (autograd over the same expression keeps the same two).
    Backward, with ``g = dL/dy`` and ``g_low = s g B`` (N, r):
    ``dx = g W + g_low A`` in one ``(N, in)`` buffer (``addmm_``; autograd computes the two terms as separate
    ``(N, in)`` tensors and then a third for their sum), ``dA = g_low^T x``, ``dB = s g^T low``,
    ``dW = g^T x`` and ``db = sum_rows g`` (only when the base trains).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):  # noqa: D102
        low = torch.mm(x, lora_a.t())  # (N, r)
        out = torch.nn.functional.linear(x, weight, bias)  # (N, out)
        out.addmm_(low, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, low)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, lora_a, lora_b, low = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        scale = ctx.scale
        grad = grad.contiguous()
        grad_low = torch.mm(grad, lora_b).mul_(scale) if (need_x or need_a) else None  # (N, r)
        grad_x = torch.mm(grad, weight).addmm_(grad_low, lora_a) if need_x else None  # (N, in)
        grad_w = torch.mm(grad.t(), x) if need_w else None  # (out, in)
        grad_bias = grad.sum(0) if need_bias else None
        grad_a = torch.mm(grad_low.t(), x) if need_a else None  # (r, in)
        grad_b = torch.mm(grad.t(), low).mul_(scale) if need_b else None  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def __getattr__(name: str) -> Any:  # ``LeanLoraLinear`` is created on first use (and when unpickled)
    if name == "LeanLoraLinear":
        return _lean_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base (every LoRA layer off) inside the block; restores the adapters afterwards."""
    layers = lora_layers(model)
    grads = [[p.requires_grad for p in layer.parameters()] for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, flags in zip(layers, grads, strict=True):
            layer.enable_adapters(True)
            for p, flag in zip(layer.parameters(), flags, strict=True):
                p.requires_grad_(flag)


class ReferenceView:
    """The frozen base of a LoRA model, without a copy: calls run ``model`` with its adapters disabled, under no grad.

    Not an ``nn.Module`` on purpose: assigning it to a LightningModule attribute registers no second set of weights.
    ``eval()`` / ``train()`` / ``requires_grad_()`` are no-ops returning the view (the model's own mode is kept).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.model, name)
        if name in ("forward", "logits", "generate") and callable(attr):

            def call(*args: Any, **kwargs: Any) -> Any:
                with torch.no_grad(), adapters_disabled(self.model):
                    return attr(*args, **kwargs)

            return call
        return attr

    def eval(self) -> ReferenceView:
        return self

    def train(self, mode: bool = True) -> ReferenceView:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> ReferenceView:
        return self

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return iter(())

    def compile(self, *args: Any, **kwargs: Any) -> None:  # the policy is compiled once, as itself
        return None


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W + s B A``) and put the plain ``nn.Linear`` back; returns ``model``
    (changed in place) with every parameter trainable again, as a model without LoRA."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    model.requires_grad_(True)
    return model


def lora_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter entries (``lora_A`` / ``lora_B``) of a state dict under ``prefix``."""
    return {k: v for k, v in state.items() if k.startswith(prefix) and (".lora_A." in k or ".lora_B." in k)}


def load_lora_checkpoint(
    checkpoint: dict[str, Any],
    load_base: Callable[[str], tuple[nn.Module, Any]],
    prefixes: Sequence[str] = ("model.", "policy.", "backbone."),
    where: str = "the checkpoint",
    merge: bool = True,
) -> tuple[nn.Module, Any]:
    """Rebuild the model of a LoRA checkpoint of ours: its base (``checkpoint["lora"]["base"]``, read with
    ``load_base``), the adapters it stores, merged (``merge=True``) or not.

    Returns:
        ``(model, base tokenizer)``.
    """
    info = checkpoint.get("lora")
    if not isinstance(info, dict) or "settings" not in info:
        raise ValueError(f"{where} is not a LoRA checkpoint of ours (no 'lora' entry).")
    if info.get("base") is None:
        raise ValueError(
            f"{where} stores LoRA adapters without a base reference; it was trained from a config, so its base weights "
            "are in the checkpoint itself: load it as an ordinary checkpoint."
        )
    state = checkpoint.get("state_dict", {})
    prefix = next((p for p in prefixes if any(k.startswith(p) and ".lora_A." in k for k in state)), None)
    if prefix is None:
        raise ValueError(f"{where}: no LoRA adapter weights under any of the prefixes {list(prefixes)}.")
    model, tokenizer = load_base(info["base"])
    apply_lora(model, info["settings"])
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    unexpected = [k for k in sub if k not in own]
    if unexpected:
        raise ValueError(f"{where}: adapter weights {unexpected[:4]} do not fit the base model {info['base']!r}.")
    model.load_state_dict(sub, strict=False)
    if merge:
        merge_lora(model)
    return model, tokenizer
