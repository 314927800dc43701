"""Hardware presets for the planner: peak FLOP/s, memory, and the alpha-beta constants of the intra- and inter-node links.

A :class:`Hardware` is what :func:`~lightning_llm.parallel.planner.plan` needs to turn FLOPs and bytes into seconds:
``time = FLOPs / (peak * compute_efficiency)`` and, per collective step, ``alpha + bytes / beta`` (latency ``alpha``,
bandwidth ``beta``). Bandwidths are in GB/s (gigaBYTES, 1e9 bytes, per direction, per device): the "bus bandwidth" a
ring collective reaches, as ``nccl-tests`` reports it, not the bidirectional marketing figure and not gigabits.

The presets are nominal datasheet / commonly measured values (stated next to each); every field can be overridden
(``hardware_preset("h100_nvlink", intra_node_gbps=400)``, or ``--hardware h100_nvlink --intra_node_gbps 400`` on the
command line). ``compute_efficiency`` is the fraction of peak a well-tuned run reaches (model FLOPs utilisation): the
project measured 30% (eager) and 42% (``torch.compile``) on one H200 for a GPT-2-124M-shaped model; published nanoGPT
reaches 37% on an A100 (REFERENCES.md, "Training throughput").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["HARDWARE", "Hardware", "hardware_preset"]


@dataclass(frozen=True)
class Hardware:
    """One device type and the links between devices.

    Args:
        name: preset name (or ``"custom"``).
        peak_tflops: dense 16-bit (bf16 / fp16) matmul peak per device, TFLOP/s.
        peak_tflops_fp32: 32-bit matmul peak per device (``32-true`` training), TFLOP/s.
        memory_gib: memory per device, GiB.
        intra_node_gbps: bus bandwidth between devices of one node, GB/s per direction.
        inter_node_gbps: bandwidth per device across nodes (its share of the node's NICs), GB/s per direction.
        intra_node_latency_us: latency of one collective step inside a node, microseconds.
        inter_node_latency_us: latency of one collective step across nodes, microseconds.
        devices_per_node: devices that share the fast intra-node link.
        compute_efficiency: fraction of peak FLOP/s a training step reaches (MFU), in (0, 1].
        backend: the process-group backend (``nccl`` or ``gloo``), informative.
    """

    name: str
    peak_tflops: float
    peak_tflops_fp32: float
    memory_gib: float
    intra_node_gbps: float
    inter_node_gbps: float
    intra_node_latency_us: float
    inter_node_latency_us: float
    devices_per_node: int
    compute_efficiency: float
    backend: str = "nccl"

    def __post_init__(self) -> None:
        for name in ("peak_tflops", "peak_tflops_fp32", "memory_gib", "intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(
                    f"Hardware `{name}` must be a number > 0, got {value!r}; a zero {name} would make every step take "
                    f"forever. Pass a positive value (e.g. --{name} {asdict(HARDWARE['h100_nvlink'])[name]})."
                )
        for name in ("intra_node_latency_us", "inter_node_latency_us"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Hardware `{name}` must be a number >= 0 (microseconds), got {value!r}.")
        if (
            not isinstance(self.devices_per_node, int)
            or isinstance(self.devices_per_node, bool)
            or self.devices_per_node < 1
        ):
            raise ValueError(f"Hardware `devices_per_node` must be a positive int, got {self.devices_per_node!r}.")
        if not 0 < self.compute_efficiency <= 1:
            raise ValueError(
                f"Hardware `compute_efficiency` must be in (0, 1] (the achieved fraction of peak FLOP/s, e.g. 0.4), got "
                f"{self.compute_efficiency!r}."
            )

    def peak_flops(self, precision: str) -> float:
        """Peak FLOP/s for a Lightning precision string (32-bit runs use ``peak_tflops_fp32``)."""
        return 1e12 * (self.peak_tflops_fp32 if precision.startswith("32") else self.peak_tflops)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


HARDWARE: dict[str, Hardware] = {
    # H100 SXM: 989 TFLOP/s dense bf16, 67 fp32 (no TF32); 80 GB HBM3; NVLink 4 900 GB/s bidirectional = 450 per
    # direction; 8 x 400 Gb/s InfiniBand NDR per node = 50 GB/s per GPU
    "h100_nvlink": Hardware("h100_nvlink", 989.0, 67.0, 80.0, 450.0, 50.0, 5.0, 10.0, 8, 0.4),
    # H200 SXM: the H100's compute and links, 141 GB HBM3e (140 GiB as nvidia-smi reports it)
    "h200_nvlink": Hardware("h200_nvlink", 989.0, 67.0, 140.0, 450.0, 50.0, 5.0, 10.0, 8, 0.4),
    # A100 80GB PCIe: 312 TFLOP/s bf16, 19.5 fp32; PCIe 4.0 x16 about 25 GB/s achieved (32 nominal) between GPUs;
    # 100 Gb/s Ethernet / InfiniBand HDR-100 per node shared by 8 GPUs = 1.6 GB/s per GPU; nanoGPT's 37% MFU
    "a100_pcie": Hardware("a100_pcie", 312.0, 19.5, 80.0, 25.0, 1.6, 10.0, 20.0, 8, 0.37),
    # CPU processes with gloo over loopback TCP (this machine: 2 threads, fp32 matmul 163 GFLOP/s, 64% reached in
    # training; bf16 slower than fp32: no bf16 matrix units); nominal 2 GB/s loopback, 50 us per gloo step
    "cpu_gloo": Hardware("cpu_gloo", 0.08, 0.163, 16.0, 2.0, 0.1, 50.0, 100.0, 64, 0.64, "gloo"),
}


def hardware_preset(name: str | Hardware | None = None, **overrides: Any) -> Hardware:
    """A preset by name (or a given :class:`Hardware`), with any fields overridden; ``None`` values are ignored.

    Raises:
        ValueError: for an unknown preset name, an unknown field, or a field value out of range.
    """
    if name is None:
        base = None
    elif isinstance(name, Hardware):
        base = name
    elif name in HARDWARE:
        base = HARDWARE[name]
    else:
        raise ValueError(f"`hardware` must be one of {sorted(HARDWARE)} (or a Hardware), got {name!r}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"Unknown Hardware field(s) {unknown}; valid fields are {sorted(known)}.")
    if base is None:
        missing = sorted(known - set(given) - {"name", "backend"})
        if missing:
            raise ValueError(
                f"Without a `hardware` preset every field must be given; missing {missing}. Pass a preset "
                f"(one of {sorted(HARDWARE)}) and override what differs."
            )
        return Hardware(**{"name": "custom", **given})
    return replace(base, **given) if given else base
