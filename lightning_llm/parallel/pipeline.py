"""Pipeline parallelism for a Transformer with ``torch.distributed.pipelining`` (stages by layer, torch's schedules).

How the model is cut (torchtitan's manual split, Megatron-LM's layer placement):

* the ``n_layer`` blocks are split into ``S = p * v`` contiguous stages (p pipeline ranks, v stages per rank);
  ``balance="layers"`` gives every stage ``n_layer / S`` blocks and refuses a count that does not divide;
  ``balance="params"`` places the cuts so the largest stage (blocks, plus the embeddings on the first stage and the
  final norm + output head on the last) holds as few parameters as possible; ``layers_per_stage=[...]`` sets them;
* the **first stage** also holds the token (and learned position) embeddings, the embedding norm and dropout; the
  **last stage** holds the final norm and the output head, and the **loss is computed there** (cross-entropy summed
  over the micro-batch's scored tokens, divided by the whole batch's scored-token count, so the sum over micro-batches
  is exactly the single-process mean loss and its gradients);
* stage ``s`` lives on pipeline rank ``s % p`` (looped placement: GPipe, 1F1B, interleaved 1F1B, looped BFS,
  interleaved zero bubble) or, for the V-shaped schedules (ZBV zero bubble), rank r holds stages r and 2p - 1 - r.

:func:`split_model` prunes a :class:`~lightning_llm.nn.Transformer` **in place** to the modules this rank owns, under
their original names (``blocks.7.attn...`` stays ``blocks.7.attn...``), so state dicts, DCP checkpoints and their
consolidation give the same keys as the unsplit model. It attaches a :class:`PipelineRunner` as ``model.pipeline``,
which builds ``PipelineStage`` objects and the schedule lazily (one per micro-batch shape) and runs training steps
(forward + backward, ``schedule.step``) and forward-only evaluation. Tied input/output embeddings cannot be split
across ranks and are refused.

Notation: p pipeline-parallel size, v stages per rank, S = p v stages, m micro-batches, B batch, T tokens, C width,
V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_llm.nn.transformer import Transformer, sinusoidal_embedding
from lightning_llm.ops import IGNORE_INDEX

__all__ = [
    "SCHEDULES",
    "PipelineRunner",
    "PipelinedTransformer",
    "TransformerStage",
    "bubble_fraction",
    "split_layers",
    "split_model",
    "stages_of_rank",
]

#: schedule name -> (torch class name, stages per rank it needs: 1, "any" (>= 1, default 2) or 2 (V-shaped))
SCHEDULES: dict[str, tuple[str, Any]] = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "any"),
    "looped_bfs": ("ScheduleLoopedBFS", "any"),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", "any"),
    "zbv_zero_bubble": ("ScheduleZBVZeroBubble", 2),
}


# ================================================================================================ planning helpers
def available_schedules() -> list[str]:
    """The schedule names the installed torch provides (zero-bubble schedules need a recent torch)."""
    import torch.distributed.pipelining as pipelining

    return [name for name, (cls, _) in SCHEDULES.items() if hasattr(pipelining, cls)]


def check_schedule(schedule: str, stages_per_rank: int | None) -> int:
    """Validate a schedule name against the installed torch; return the stages per rank it will use."""
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {sorted(SCHEDULES)}, got {schedule!r}.")
    if schedule not in available_schedules():
        raise ValueError(
            f"schedule={schedule!r} needs torch.distributed.pipelining.{SCHEDULES[schedule][0]}, which torch "
            f"{torch.__version__} lacks; choose one of {available_schedules()} or upgrade torch."
        )
    need = SCHEDULES[schedule][1]
    if need == "any":
        v = 2 if stages_per_rank is None else stages_per_rank
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`stages_per_rank` must be a positive int, got {stages_per_rank!r}.")
        return v
    if stages_per_rank not in (None, need):
        raise ValueError(
            f"schedule={schedule!r} runs exactly {need} stage(s) per rank, got stages_per_rank={stages_per_rank}; "
            f"leave it unset or pick an interleaved schedule (interleaved_1f1b, looped_bfs, interleaved_zero_bubble)."
        )
    return need


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of the ideal schedule (equal stage times, no communication cost).

    GPipe and 1F1B: ``(p - 1) / (m + p - 1)``; interleaved with v stages per rank: ``(p - 1) / (v m + p - 1)`` (the
    bubble shrinks by v); zero-bubble schedules split the backward into input and weight gradients and fill the bubble
    with the latter: ZB-H1 leaves about a third of 1F1B's, taken here as ``(p - 1) / (3 (v m + p - 1))`` (0 in theory
    for ZB-V with enough micro-batches; this is the conservative figure).
    """
    if p <= 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (3 * (v * m + p - 1))


def split_layers(
    n_layer: int,
    n_stages: int,
    balance: Literal["layers", "params"] = "layers",
    layer_costs: Sequence[float] | None = None,
    first_cost: float = 0.0,
    last_cost: float = 0.0,
    layers_per_stage: Sequence[int] | None = None,
) -> list[range]:
    """Contiguous block ranges, one per stage.

    Args:
        n_layer: number of blocks.
        n_stages: S, total number of stages (pipeline ranks x stages per rank).
        balance: ``"layers"``: ``n_layer / S`` blocks each (must divide); ``"params"``: minimise the largest stage's
            cost (``layer_costs`` per block, ``first_cost`` added to stage 0, ``last_cost`` to stage S - 1).
        layer_costs: cost of each block (default 1 each).
        first_cost, last_cost: cost of the embeddings (first stage) and of the final norm + head (last stage).
        layers_per_stage: explicit block counts (sum ``n_layer``, every entry >= 1); overrides ``balance``.

    Raises:
        ValueError: fewer blocks than stages, a count that does not divide under ``balance="layers"``, or bad
            ``layers_per_stage``.
    """
    if n_stages < 1:
        raise ValueError(f"`n_stages` must be >= 1, got {n_stages}.")
    if n_layer < n_stages:
        raise ValueError(
            f"Cannot split a model with n_layer={n_layer} blocks into {n_stages} pipeline stages (each stage needs at "
            f"least one block); use pipeline_parallel_size * stages_per_rank <= {n_layer}."
        )
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != n_stages or sum(counts) != n_layer or min(counts) < 1:
            raise ValueError(
                f"`layers_per_stage` must hold {n_stages} counts >= 1 summing to n_layer={n_layer}, got {counts}."
            )
    elif balance == "layers":
        if n_layer % n_stages:
            raise ValueError(
                f"n_layer={n_layer} is not divisible by the {n_stages} pipeline stages (pipeline_parallel_size x "
                f"stages_per_rank); choose a stage count dividing n_layer, or balance='params' (uneven stages balanced "
                f"by parameter count), or give layers_per_stage=[...] explicitly."
            )
        counts = [n_layer // n_stages] * n_stages
    elif balance == "params":
        counts = _min_max_partition(list(layer_costs or [1.0] * n_layer), n_stages, float(first_cost), float(last_cost))
    else:
        raise ValueError(f"`balance` must be 'layers' or 'params', got {balance!r}.")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def _min_max_partition(costs: list[float], k: int, first: float, last: float) -> list[int]:
    """Block counts of the contiguous k-way split minimising the largest stage cost (exact dynamic programme)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int, s: int) -> float:  # blocks [i, j) as stage s
        return prefix[j] - prefix[i] + (first if s == 0 else 0.0) + (last if s == k - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]  # best[s][j]: first j blocks in s stages
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(i, j, s - 1))
                if value < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = value, i
    counts, j = [], n
    for s in range(k, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def stages_of_rank(rank: int, p: int, v: int, style: Literal["loop", "v"] = "loop") -> list[int]:
    """Stage indices held by pipeline rank ``rank``: ``r, r + p, ...`` (loop) or ``r, 2p - 1 - r`` (V shape)."""
    if style == "v":
        return [rank, 2 * p - 1 - rank]
    return [rank + i * p for i in range(v)]


# ================================================================================================ the stage module
class TransformerStage(nn.Module):
    """One pipeline stage of a Transformer: ``input_ids -> hidden`` (first), ``hidden -> hidden``, ``hidden -> logits``
    (last). Holds the SAME module objects as the pruned model, under the same names (built by :class:`PipelineRunner`).

    Positions and the causal mask are recomputed from the shapes on every stage (``Transformer.attention_inputs``),
    so nothing but the hidden states ``(B, T, C)`` travels between stages; padding masks are not supported.
    """

    def __init__(self, model: Transformer, stage_index: int, n_stages: int, block_keys: Sequence[str]) -> None:
        super().__init__()
        self.config = model.config
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        if self.is_first:
            self.wte, self.wpe, self.emb_norm, self.drop = model.wte, model.wpe, model.emb_norm, model.drop
        self.blocks = nn.ModuleDict({k: model.blocks[k] for k in block_keys})
        if self.is_last:
            self.norm_f, self.lm_head = model.norm_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b, t = x.shape[:2]
        if self.is_first:
            Transformer._check_ids(self, x)
        inputs = Transformer.attention_inputs(self, b, t, x.device, None, None, None)
        if self.is_first:
            x = self.wte(x)  # (B, T, C)
            if self.wpe is not None:
                x = x + self.wpe(inputs.q_pos)
            elif cfg.pos_encoding == "sinusoidal":
                x = x + sinusoidal_embedding(inputs.q_pos, cfg.n_embd).to(x.dtype)
            if self.emb_norm is not None:
                x = self.emb_norm(x)
            x = self.drop(x)
        for block in self.blocks.values():
            x = block(x, inputs)
        if not self.is_last:
            return x  # (B, T, C)
        x = self.norm_f(x)
        bias = self.lm_head.bias if self.lm_head is not None else None
        logits = F.linear(x, self.lm_head.weight, bias)  # (B, T, V_padded)
        return logits[..., : cfg.vocab_size] if cfg.padded_vocab_size != cfg.vocab_size else logits


class PipelinedTransformer(Transformer):
    """The class of a Transformer pruned by :func:`split_model`: it holds only this rank's stages and runs through
    ``self.pipeline`` (a :class:`PipelineRunner`); calling it directly is an error."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            f"This Transformer was split for pipeline parallelism and holds only stages {self.pipeline.stage_ids} of "
            f"{self.pipeline.n_stages}; run it with model.pipeline.train_step(...) / model.pipeline.eval_logits(...) "
            "(CausalLM does), or consolidate the checkpoint and load the full model."
        )


def _param_count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def split_model(
    model: Transformer,
    pp_mesh: Any,
    schedule: str = "1f1b",
    n_microbatches: int | None = None,
    stages_per_rank: int | None = None,
    balance: Literal["layers", "params"] = "layers",
    layers_per_stage: Sequence[int] | None = None,
) -> PipelinedTransformer:
    """Prune ``model`` in place to this pipeline rank's stages and attach ``model.pipeline`` (a :class:`PipelineRunner`).

    Args:
        model: a full :class:`~lightning_llm.nn.Transformer` (identical on every rank: same seed or same checkpoint).
        pp_mesh: the 1-D ``"pipeline_parallel"`` DeviceMesh (or a ProcessGroup's mesh) of this rank's pipeline.
        schedule: one of :data:`SCHEDULES`.
        n_microbatches: m, micro-batches per step (default: the number of stages S); must divide the batch.
        stages_per_rank: v (interleaved schedules; default 2 there, 1 for GPipe / 1F1B, 2 for ZBV).
        balance, layers_per_stage: how blocks are placed, see :func:`split_layers`.

    Raises:
        ValueError: tied embeddings, too few blocks, a stage count that does not divide ``n_layer`` (``balance=
            "layers"``), a bad schedule or micro-batch count.
        TypeError: ``model`` is not a Transformer.
    """
    if not isinstance(model, Transformer) or not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise TypeError(
            f"split_model expects an unsplit lightning_llm Transformer (with a `blocks` ModuleList), got "
            f"{type(model).__name__}; other modules cannot be split into pipeline stages here."
        )
    cfg = model.config
    p, r = pp_mesh.size(), pp_mesh.get_local_rank()
    v = check_schedule(schedule, stages_per_rank)
    n_stages = p * v
    if cfg.tie_embeddings and n_stages > 1:
        raise ValueError(
            "Cannot split a model with tie_embeddings=True into pipeline stages: the input embedding (first stage) "
            "and the output head (last stage) would be one tensor on two ranks. Use tie_embeddings=False, or FSDP2 / "
            "tensor parallelism instead of pipeline parallelism."
        )
    m = n_stages if n_microbatches is None else n_microbatches
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"`n_microbatches` must be a positive int, got {n_microbatches!r}.")
    costs = [_param_count(b) for b in model.blocks]
    first = _param_count(model.wte) + _param_count(model.wpe) + _param_count(model.emb_norm)
    last = _param_count(model.norm_f) + _param_count(model.lm_head)
    ranges = split_layers(cfg.n_layer, n_stages, balance, costs, first, last, layers_per_stage)
    style = "v" if schedule == "zbv_zero_bubble" else "loop"
    mine = stages_of_rank(r, p, v, style)
    keep = sorted(i for s in mine for i in ranges[s])
    model.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in keep})  # keys = original indices
    if 0 not in mine:
        model.wte = model.wpe = model.emb_norm = None
    if n_stages - 1 not in mine:
        model.norm_f = model.lm_head = None
    model.__class__ = PipelinedTransformer
    model.pipeline = PipelineRunner(model, pp_mesh, schedule, m, mine, n_stages, ranges)
    return model


# ================================================================================================ running it
class PipelineRunner:
    """Runs this rank's stages with a ``torch.distributed.pipelining`` schedule.

    ``PipelineStage`` objects and schedules are created on first use for each micro-batch shape (validation batches
    may be shorter than training ones) and reused afterwards; call :meth:`build_stage_modules` before FSDP so that
    ``fully_shard`` can wrap each stage module (``parallelize`` does).
    """

    def __init__(
        self,
        model: PipelinedTransformer,
        pp_mesh: Any,
        schedule: str,
        n_microbatches: int,
        stage_ids: list[int],
        n_stages: int,
        ranges: list[range],
    ) -> None:
        self.model, self.pp_mesh, self.schedule_name = model, pp_mesh, schedule
        self.n_microbatches, self.stage_ids, self.n_stages, self.ranges = n_microbatches, stage_ids, n_stages, ranges
        self.group = pp_mesh.get_group()
        self.has_first, self.has_last = 0 in stage_ids, n_stages - 1 in stage_ids
        self.stage_modules: list[TransformerStage] | None = None
        self._cache: dict[tuple, tuple[list[Any], Any]] = {}
        self._denominator = torch.tensor(1.0)
        self._last_rank: int | None = None

    # ------------------------------------------------------------------------------------------- construction
    def build_stage_modules(self) -> list[TransformerStage]:
        """One :class:`TransformerStage` per local stage, over the (possibly wrapped) blocks of the pruned model."""
        if self.stage_modules is None:
            self.stage_modules = [
                TransformerStage(self.model, s, self.n_stages, [str(i) for i in self.ranges[s]]) for s in self.stage_ids
            ]
        return self.stage_modules

    def _device(self) -> torch.device:
        p = next(self.model.parameters())
        return p.to_local().device if hasattr(p, "to_local") else p.device

    def _schedule_class(self, train: bool) -> Any:
        """The training schedule; forward-only evaluation uses GPipe (one stage per rank) or looped BFS (several):
        without a backward they are the same all-forward order and accept any micro-batch count."""
        import torch.distributed.pipelining as pipelining

        if train:
            return getattr(pipelining, SCHEDULES[self.schedule_name][0])
        if self.schedule_name == "zbv_zero_bubble":
            raise ValueError(
                "schedule='zbv_zero_bubble' has no forward-only mode in torch.distributed.pipelining (its V-shaped "
                "stage placement only runs with a backward), so validation / test cannot run through it: train with "
                "limit_val_batches=0, or use schedule='interleaved_zero_bubble' (zero bubble, looped placement)."
            )
        single = SCHEDULES[self.schedule_name][1] == 1
        return pipelining.ScheduleGPipe if single else pipelining.ScheduleLoopedBFS

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Micro-batch cross-entropy sum / the whole batch's scored tokens: the micro-batch losses add up to the mean."""
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll / self._denominator.to(nll.device)

    def _get(self, train: bool, shape: tuple[int, int], m: int) -> tuple[list[Any], Any]:
        key = (train, shape, m)
        if key in self._cache:
            return self._cache[key]
        from torch.distributed.pipelining import PipelineStage

        device = self._device()
        modules = self.build_stage_modules()
        cfg = self.model.config
        mb, t = shape[0] // m, shape[1]
        ref = next(iter(modules[0].parameters()))
        dtype = ref.dtype
        out_dtype = dtype
        if torch.is_autocast_enabled(device.type):
            out_dtype = torch.get_autocast_dtype(device.type)
        stages = []
        needs_examples = inspect.signature(PipelineStage).parameters["input_args"].default is inspect.Parameter.empty
        for module in modules:
            if not needs_examples:  # torch >= 2.6 infers the shapes on the first step (our cache is per shape)
                stages.append(PipelineStage(module, module.stage_index, self.n_stages, device, group=self.group))
                continue
            # torch 2.5: static example tensors (float inputs require grad so that their gradients flow back)
            if module.is_first:
                example_in = torch.zeros(mb, t, dtype=torch.long, device=device)
            else:
                example_in = torch.zeros(mb, t, cfg.n_embd, dtype=dtype, device=device, requires_grad=train)
            if module.is_last:
                example_out = torch.zeros(mb, t, cfg.vocab_size, dtype=out_dtype, device=device)
            else:
                example_out = torch.zeros(mb, t, cfg.n_embd, dtype=dtype, device=device)
            stages.append(
                PipelineStage(
                    module,
                    module.stage_index,
                    self.n_stages,
                    device,
                    input_args=example_in,
                    output_args=example_out,
                    group=self.group,
                )
            )
        cls = self._schedule_class(train)
        single = cls.__name__ in ("ScheduleGPipe", "Schedule1F1B")
        kwargs: dict[str, Any] = {"loss_fn": self._loss if train else None}
        if "scale_grads" in inspect.signature(cls.__init__).parameters:
            kwargs["scale_grads"] = False  # our loss is already divided by the batch's token count
        schedule = cls(stages[0] if single else stages, m, **kwargs)
        self._cache[key] = (stages, schedule)
        return stages, schedule

    # ------------------------------------------------------------------------------------------- steps
    def last_stage_rank(self) -> int:
        """Global rank holding the last stage in this rank's pipeline."""
        if self._last_rank is None:
            import torch.distributed as dist

            p = self.pp_mesh.size()
            local = 0 if self.schedule_name == "zbv_zero_bubble" else (self.n_stages - 1) % p
            self._last_rank = dist.get_global_rank(self.group, local)
        return self._last_rank

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's value of ``tensor`` on every rank of this pipeline (same shape and dtype everywhere)."""
        import torch.distributed as dist

        tensor = tensor.detach().clone()
        dist.broadcast(tensor, src=self.last_stage_rank(), group=self.group)
        return tensor

    def _check_batch(self, input_ids: torch.Tensor, m: int) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}.")
        if input_ids.shape[0] % m:
            raise ValueError(
                f"The batch size {input_ids.shape[0]} is not divisible by n_microbatches={m}: every micro-batch must "
                f"have the same size under pipeline parallelism; set the data batch_size to a multiple of {m} (or "
                "n_microbatches to a divisor of the batch size)."
            )

    def train_step(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch through the pipeline; gradients accumulate into this rank's parameters.

        Returns:
            The batch's mean next-token loss (a detached scalar), the same on every rank of the pipeline.
        """
        m = self.n_microbatches
        self._check_batch(input_ids, m)
        _, schedule = self._get(True, tuple(input_ids.shape), m)
        self._denominator = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        kwargs: dict[str, Any] = {"target": targets, "losses": losses} if self.has_last else {}
        if "return_outputs" in inspect.signature(schedule.step).parameters:
            kwargs["return_outputs"] = False
        schedule.step(*args, **kwargs)
        loss = torch.stack([x.detach().float() for x in losses]).sum() if losses else torch.zeros(())
        return self.broadcast_from_last(loss.to(self._device()))

    def eval_logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Forward only: the logits ``(B, T, V)`` on the rank holding the last stage, ``None`` on the others.

        Uses the training micro-batch count when it divides the batch, else the largest divisor of the batch below it
        (a last, shorter validation batch), with a forward-only GPipe / looped-BFS order.
        """
        b = input_ids.shape[0]
        m = max(d for d in range(1, min(self.n_microbatches, b) + 1) if b % d == 0)
        _, schedule = self._get(False, tuple(input_ids.shape), m)
        args = (input_ids,) if self.has_first else ()
        with torch.no_grad():
            out = schedule.step(*args)
        return out if self.has_last else None
