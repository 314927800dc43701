"""Strategy presets: the factories' settings and errors, and the atomic replacement of a sharded checkpoint folder."""

from __future__ import annotations

import os

import pytest

from lightning_llm.parallel import BlockFSDPStrategy, FSDP2Strategy, ddp, fsdp, fsdp2
from lightning_llm.parallel.presets import _mesh_sizes, _replace_dir


def test_strategy_factories():
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_llm.nn.transformer import Block

    assert isinstance(ddp(), DDPStrategy)
    s = fsdp("SHARD_GRAD_OP", state_dict_type="sharded")
    assert isinstance(s, BlockFSDPStrategy) and s._state_dict_type == "sharded"
    assert s.kwargs["auto_wrap_policy"].__class__.__name__ == "ModuleWrapPolicy" or Block in str(s.kwargs)
    assert s._activation_checkpointing_kwargs  # activation checkpointing policy {Block}
    s2 = fsdp2(tensor_parallel_size=2, activation_checkpointing=True, mp_policy={"param_dtype": "bfloat16"})
    assert isinstance(s2, FSDP2Strategy) and s2._tensor_parallel_size == 2
    assert s2.parallelize_kwargs["activation_checkpointing"] is True
    with pytest.raises(ValueError, match="sharding_strategy"):
        fsdp("ZERO3")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        fsdp2(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="mp_policy"):
        fsdp2(mp_policy={"param_dtype": "bfloat17"})


@pytest.mark.parametrize(
    ("world", "pipeline", "data", "tensor", "auto_tensor", "expected"),
    [
        (8, 1, "auto", "auto", 4, (2, 4)),  # FSDP2 + TP on 2 nodes of 4: TP inside a node, DP across nodes
        (8, 1, "auto", 2, 4, (4, 2)),
        (8, 2, "auto", "auto", 1, (4, 1)),  # pipelining: TP off unless asked, DP takes the rest (8 / 2)
        (8, 2, 2, 2, 1, (2, 2)),
        (1, 1, "auto", "auto", 1, (1, 1)),
    ],
)
def test_mesh_sizes(world, pipeline, data, tensor, auto_tensor, expected):
    assert _mesh_sizes(world, pipeline, data, tensor, auto_tensor) == expected


def test_mesh_sizes_errors():
    with pytest.raises(
        ValueError, match=r"pipeline_parallel_size=2 x tensor_parallel_size=3 must divide the world size 8"
    ):
        _mesh_sizes(8, 2, "auto", 3, 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the world size 4"):
        _mesh_sizes(4, 1, "auto", "auto", 3)  # 'auto' TP = devices per node, not a divisor of the world here
    with pytest.raises(
        ValueError, match=r"data_parallel_size=3 x tensor_parallel_size=2 = 12 must equal the world size 8"
    ):
        _mesh_sizes(8, 2, 3, 2, 1)


def test_sharded_save_replaces_folder_whole(tmp_path, monkeypatch):
    dst = tmp_path / "last.ckpt"
    dst.mkdir()
    (dst / "shard").write_text("old")
    src = tmp_path / ".new"
    src.mkdir()
    (src / "shard").write_text("new")
    calls = []
    real = os.replace

    def crash_second(a, b):  # the old folder was moved aside, then the process dies before the new one is in place
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(KeyboardInterrupt):
        _replace_dir(src, dst)
    monkeypatch.undo()
    aside = calls[0][1]
    assert (aside / "shard").read_text() == "old"  # the previous checkpoint survives, complete
    _replace_dir(src, dst)
    assert (dst / "shard").read_text() == "new" and not src.exists()


def test_pipeline_strategy_settings_and_errors():
    from lightning_llm.parallel import PipelineStrategy, pipeline_parallel

    s = pipeline_parallel(2, "interleaved_1f1b", n_microbatches=8, stages_per_rank=2, tensor_parallel_size=2)
    assert isinstance(s, PipelineStrategy) and isinstance(s, FSDP2Strategy) and s.pipeline_parallel_size == 2
    assert s.parallelize_kwargs["pipeline"] == {
        "schedule": "interleaved_1f1b",
        "n_microbatches": 8,
        "stages_per_rank": 2,
        "balance": "layers",
        "layers_per_stage": None,
    }
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        PipelineStrategy(schedule="1F1B-typo")
    with pytest.raises(ValueError, match="exactly 2 stage"):
        PipelineStrategy(schedule="zbv_zero_bubble", stages_per_rank=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        PipelineStrategy(pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="n_microbatches"):
        PipelineStrategy(n_microbatches=0)
    with pytest.raises(ValueError, match="balance"):
        PipelineStrategy(balance="flops")
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False"):
        PipelineStrategy(save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="meta_init"):
        PipelineStrategy(meta_init=True)


def test_pipeline_presets_parse(capsys):
    """Every pipeline YAML preset is read by the real CLI and names PipelineStrategy with its settings."""
    from pathlib import Path

    import yaml

    from lightning_llm.cli import main

    root = Path(__file__).parents[2] / "configs"
    for preset in ("cpu_pp", "cpu_pp_fsdp2", "gpu_pp", "gpu_pp_fsdp2_tp"):
        status = main(["fit", "--config", str(root / "quickstart.yaml"), "--config",
                       str(root / f"trainer/{preset}.yaml"), "--print_config"])  # fmt: skip
        out = yaml.safe_load(capsys.readouterr().out)
        assert status == 0
        strategy = out["trainer"]["strategy"]
        assert strategy["class_path"] == "lightning_llm.parallel.PipelineStrategy"
        expected = yaml.safe_load((root / f"trainer/{preset}.yaml").read_text())["trainer"]["strategy"]["init_args"]
        for key, value in expected.items():
            assert strategy["init_args"][key] == value, (preset, key)
