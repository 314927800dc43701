"""Callbacks for any LightningModule: evaluation monitors, throughput/MFU, embedding health, loss-spike guard,
generation samples, the heap trim of CPU steps, metric files and the final checkpoint of a fit. Each takes a ``batch_fn(module, batch) -> (logits, targets)`` or ``forward_fn(module, ids) ->
logits`` for models this package never saw.

From YAML no Python object is needed: data are named (``dataset: embedded`` or a local file path), the tokenizer is
the module's or the datamodule's, and ``configs/callbacks/*.yaml`` stack onto any ``fit`` (``trainer.callbacks+``
appends), e.g. ``lightning-llm fit --config configs/quickstart.yaml --config configs/callbacks/monitoring.yaml``."""

from lightning_llm.callbacks._utils import default_batch_fn, default_forward_fn
from lightning_llm.callbacks.calibration_monitor import CalibrationMonitor
from lightning_llm.callbacks.embedding_probe import EmbeddingProbe, embedding_stats, nearest_neighbours
from lightning_llm.callbacks.eval_subset import EvalSubsetMonitor, subset_metrics
from lightning_llm.callbacks.final_checkpoint import FinalCheckpoint
from lightning_llm.callbacks.generation_samples import GenerationSamples
from lightning_llm.callbacks.heap_trim import CPUHeapTrim
from lightning_llm.callbacks.lambada_monitor import LambadaMonitor
from lightning_llm.callbacks.learning_curves import LearningCurves, plot_metrics_csv
from lightning_llm.callbacks.loss_spike_guard import LossSpikeGuard, SpikeEvent
from lightning_llm.callbacks.metrics_file import MetricsFile
from lightning_llm.callbacks.perplexity_monitor import PerplexityMonitor
from lightning_llm.callbacks.throughput import LLMThroughputMonitor, palm_flops_per_token

__all__ = [
    "CPUHeapTrim",
    "CalibrationMonitor",
    "LearningCurves",
    "EmbeddingProbe",
    "EvalSubsetMonitor",
    "FinalCheckpoint",
    "GenerationSamples",
    "LLMThroughputMonitor",
    "LambadaMonitor",
    "LossSpikeGuard",
    "MetricsFile",
    "PerplexityMonitor",
    "SpikeEvent",
    "default_batch_fn",
    "default_forward_fn",
    "embedding_stats",
    "nearest_neighbours",
    "palm_flops_per_token",
    "plot_metrics_csv",
    "subset_metrics",
]
