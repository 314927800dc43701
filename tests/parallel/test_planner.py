"""The memory planner against hand-derived byte counts and Korthikanti et al.'s activation formula; ``plan_command``
(the ``lightning-llm plan`` entry) against parameter counts of Hugging Face's own models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.nn.transformer import Transformer
from lightning_llm.parallel import activation_bytes, plan, plan_command

ROOT = Path(__file__).parents[2]
GPT2_PRESET = ROOT / "configs" / "model" / "gpt2_124m.yaml"


# ---------------------------------------------------------------------------------------------------- planner
def test_plan_hand_derived():
    cfg = TransformerConfig(
        vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, mlp="gelu", norm="layernorm"
    )
    # P by hand: wte 1000*64 + head 1000*64 = 128000; per block attention 4*64*64 = 16384, MLP 2*64*256 = 32768,
    # two LayerNorms 2*2*64 = 256 -> 49408; two blocks 98816; final LayerNorm 128 -> P = 226944
    p = 226944
    assert sum(t.numel() for t in Transformer(cfg).parameters()) == p
    res = plan(cfg, world_size=4, precision="32-true", micro_batch_size=2, seq_len=64, activation_checkpointing=False)
    rows = {r["strategy"]: r for r in res["rows"]}
    ddp_row, fs = rows["DDP"], rows["FSDP FULL_SHARD"]
    assert (ddp_row["params_bytes"], ddp_row["grads_bytes"], ddp_row["optimizer_bytes"]) == (4 * p, 4 * p, 8 * p)
    assert fs["sharded_params_bytes"] == 4 * p // 4 and fs["grads_bytes"] == p and fs["optimizer_bytes"] == 2 * p
    assert fs["gathered_bytes"] == 2 * 4 * 49408  # two unsharded fp32 blocks
    # FSDP2+TP d=2, t=2: block weights (49152 per block) split t=2 ways, the block LayerNorms (256 per block) stay
    # whole on each tensor-parallel rank, then everything (with wte, head, final norm = 128128) split d=2 ways
    tp = rows["FSDP2+TP (d=2, t=2)"]
    assert tp["optimizer_bytes"] == 8 * (2 * (49152 / 2 + 256) + 128128) / 2
    # bf16-mixed: fp32 masters + 2 fp32 AdamW states, same 16 bytes/parameter for DDP as 32-true
    mixed = {r["strategy"]: r for r in plan(cfg, 4, "bf16-mixed", activation_checkpointing=False)["rows"]}
    assert mixed["DDP"]["params_bytes"] + mixed["DDP"]["grads_bytes"] + mixed["DDP"]["optimizer_bytes"] == 16 * p


def test_activation_formula_korthikanti():
    cfg = TransformerConfig(vocab_size=1000, block_size=64, n_layer=3, n_head=4, n_embd=64)
    s, b, h, a = 64, 2, 64, 4
    head = 4 * b * s * 1000 + 2 * 2 * s * b * h
    # Korthikanti et al. eq. (2): sbh(34 + 5as/h) per layer in 16-bit; a fused kernel stores no attention matrix
    assert activation_bytes(cfg, b, s, 2, fused_attention=False) == int(3 * s * b * h * (34 + 5 * a * s / h) + head)
    assert activation_bytes(cfg, b, s, 2) == int(3 * s * b * h * 34 + head)
    # tensor parallel t=2: sbh(10 + 24/t) = 22 sbh; full recomputation keeps 2sbh per layer + one layer in flight
    assert activation_bytes(cfg, b, s, 2, tensor_parallel_size=2) == int(3 * s * b * h * 22 + head)
    assert activation_bytes(cfg, b, s, 2, activation_checkpointing=True) == int(
        3 * 2 * s * b * h + 34 * s * b * h + head
    )


def test_plan_recommendation():
    cfg = TransformerConfig(vocab_size=32000, block_size=2048, n_layer=24, n_head=16, n_embd=2048)
    res = plan(cfg, world_size=8, micro_batch_size=4, device_memory_gib=16)
    fitting = [r for r in res["rows"] if r["fits"]]
    assert res["recommendation"] == fitting[0]
    assert not res["rows"][0]["fits"]  # DDP of a 1.3B model (21 GB of states) does not fit in 16 GB
    with pytest.raises(ValueError, match="precision"):
        plan(cfg, 2, precision="fp8")


# ---------------------------------------------------------------------------------------------------- plan_command
def _hf_parameters(hf_config) -> int:
    """Parameters of the Hugging Face model itself (built on the meta device: no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def test_plan_command_requires_a_vocabulary():
    # issue 17: the preset has no vocabulary; a silent default (4096) reported GPT-2 124M as 89M parameters
    with pytest.raises(ValueError, match="sets no vocabulary.*vocab_size.*tokenizer"):
        plan_command(str(GPT2_PRESET), world_size=8)


def test_plan_command_gpt2_124m(tmp_path, capsys):
    from transformers import GPT2Config

    out = tmp_path / "plan.json"
    result = plan_command(str(GPT2_PRESET), world_size=8, vocab_size=50257, device_memory_gib=80, json=str(out))
    assert result["parameters"] == _hf_parameters(GPT2Config()) == 124_439_808
    table = capsys.readouterr().out
    assert "FSDP FULL_SHARD" in table and "P=124,439,808" in table and "recommended: DDP" in table
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    # the packaged preset by name gives the same plan
    by_name = plan_command("gpt2_124m", world_size=8, vocab_size=50257, device_memory_gib=80)
    assert by_name["rows"] == result["rows"]


def test_plan_command_vocabulary_from_a_tokenizer(tmp_path, capsys):
    from lightning_llm.data.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["hello world, hello planner tokens"] * 20, vocab_size=300)
    tok.save(tmp_path / "tok")
    preset = tmp_path / "m.yaml"
    preset.write_text("model:\n  init_args:\n    config:\n      n_layer: 2\n      n_embd: 64\n      n_head: 4\n")
    result = plan_command(str(preset), world_size=2, tokenizer=str(tmp_path / "tok"), device_memory_gib=1)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4)
    assert result["config"]["vocab_size"] == tok.vocab_size
    assert result["parameters"] == sum(p.numel() for p in Transformer(cfg).parameters())
    assert "recommended: DDP" in capsys.readouterr().out
    with pytest.raises(ValueError, match="disagrees"):
        plan_command(str(preset), tokenizer=str(tmp_path / "tok"), vocab_size=tok.vocab_size + 1)
    with pytest.raises(FileNotFoundError, match="gpt2_124m"):
        plan_command(str(tmp_path / "missing.yaml"), vocab_size=100)


def test_plan_command_reads_hugging_face_dirs_and_checkpoints(tmp_path):
    from transformers import GPT2Config

    hf = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64)
    hf.save_pretrained(tmp_path / "hf")  # config.json only: the planner never reads weights
    assert plan_command(str(tmp_path / "hf"), world_size=2)["parameters"] == _hf_parameters(hf)
    cfg = TransformerConfig(vocab_size=77, block_size=32, n_layer=2, n_head=4, n_embd=32)
    expected = sum(p.numel() for p in Transformer(cfg).parameters())
    torch.save({"transformer_config": cfg.to_dict(), "state_dict": {}}, tmp_path / "m.ckpt")
    assert plan_command(str(tmp_path / "m.ckpt"), world_size=2)["parameters"] == expected
    (tmp_path / "sharded").mkdir()  # a sharded folder: only meta.pt (the non-tensor entries) is read
    torch.save({"transformer_config": cfg.to_dict()}, tmp_path / "sharded" / "meta.pt")
    assert plan_command(str(tmp_path / "sharded"), world_size=2)["parameters"] == expected


def test_plan_command_is_a_jsonargparse_command():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(plan_command)
    args = parser.parse_args(["--model", "X", "--world_size", "4"])
    assert (args.model, args.world_size, args.precision, args.vocab_size) == ("X", 4, "bf16-mixed", None)
    assert "number of devices N" in parser.format_help()  # the Google-style docstring is the --help text
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "X", "--precision", "fp8"])


# ---------------------------------------------------------------------------------------------------- step time
from lightning_llm.parallel.hardware import HARDWARE, Hardware, hardware_preset  # noqa: E402
from lightning_llm.parallel.planner import EXTRAPOLATION_PPL, plot_plan, positional_advice  # noqa: E402

# round numbers, so the expected times below are derived by hand: 100 TFLOP/s x 0.5, 100 GB/s and 10 us inside a node,
# 10 GB/s and 20 us across nodes, 4 devices per node
TOY_HW = Hardware("toy", 100.0, 50.0, 80.0, 100.0, 10.0, 10.0, 20.0, 4, 0.5)
GPT2 = TransformerConfig(
    vocab_size=50257,
    block_size=1024,
    n_layer=12,
    n_head=12,
    n_embd=768,
    mlp="gelu",
    norm="layernorm",
    bias=True,
    tie_embeddings=True,
    pos_encoding="learned",
)


def _rows(res):
    return {(r["strategy"], r["activation_checkpointing"]): r for r in res["rows"]}


def test_gpt2_parameters_and_flops_per_token():
    assert GPT2.num_parameters(non_embedding=False) == 124_439_808
    # PaLM appendix B: 6 N + 12 L H Q T; N = non-embedding parameters + the tied output projection (V h)
    n = 124_439_808 - 50257 * 768 - 1024 * 768 + 50257 * 768
    assert GPT2.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_compute_time_is_flops_over_peak():
    b, s, n = 4, 1024, 8
    res = plan(GPT2, n, "bf16-mixed", b, s, hardware=TOY_HW, global_batch_size=b * n, tensor_parallel_sizes=())
    rows = _rows(res)
    ddp, ddp_ac = rows[("DDP", False)], rows[("DDP", True)]
    tokens = b * s  # per device
    assert ddp["compute_s"] == pytest.approx(tokens * GPT2.flops_per_token(s) / (100e12 * 0.5), rel=1e-9)
    # checkpointing recomputes each block's forward: + 2 N_blk + 4 L H Q T per token (the head is not recomputed)
    n_blk = GPT2.num_parameters() - 2 * 768  # non-embedding parameters (tied: no head) minus the final LayerNorm
    extra = tokens * (2 * n_blk + 4 * 12 * 12 * 64 * s)
    assert ddp_ac["compute_s"] - ddp["compute_s"] == pytest.approx(extra / 50e12, rel=1e-9)
    assert ddp["tokens_per_s"] == pytest.approx(b * n * s / ddp["step_s"])
    assert ddp["binding"] == "compute"


def test_ring_volumes_and_alpha_beta_time():
    cfg = TransformerConfig(
        vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, mlp="gelu", norm="layernorm"
    )
    p = 226944  # test_plan_hand_derived
    res = plan(
        cfg,
        4,
        "32-true",
        2,
        64,
        hardware=TOY_HW,
        global_batch_size=8,
        tensor_parallel_sizes=(2,),
        pipeline_sizes=(2,),
        activation_checkpointing=False,
    )
    rows = _rows(res)
    ar = rows[("DDP", False)]["comm"]["all_reduce"]
    # one bucket (< 25 MiB) of 4P bytes over n=4 ranks inside one node: 2 (n-1)/n S bytes sent in 2 (n-1) steps
    assert (ar["payload_bytes"], ar["calls"]) == (4 * p, 1)
    assert ar["wire_bytes"] == int(2 * 3 / 4 * 4 * p)
    assert ar["time_s"] == pytest.approx(6 * 10e-6 + 2 * 3 / 4 * 4 * p / 100e9)
    fs = rows[("FSDP FULL_SHARD", False)]["comm"]
    # ZeRO-3 gathers each of 3 units (2 blocks + root) in the forward and again in the backward: 2 x 4P; scatters 4P
    assert (fs["all_gather"]["payload_bytes"], fs["all_gather"]["calls"]) == (8 * p, 6)
    assert fs["all_gather"]["time_s"] == pytest.approx(6 * 3 * 10e-6 + 3 / 4 * 8 * p / 100e9)
    assert (fs["reduce_scatter"]["payload_bytes"], fs["reduce_scatter"]["calls"]) == (4 * p, 3)
    # TP t=2, d=2: m = 8 / (2 x 2) = 2 micro-batches x 2 blocks x (2 forward + 4 backward, GELU) all-reduces of b s h
    tp = rows[("FSDP2+TP (d=2, t=2)", False)]["comm"]["all_reduce"]
    assert (tp["calls"], tp["payload_bytes"]) == (2 * 2 * 6, 2 * 2 * 6 * 2 * 64 * 64 * 4)
    # PP p=2, d=2: stage 0 sends activations forward, stage 1 gradients back
    pp = rows[("PP 1F1B (p=2, d=2)", False)]["comm"]["send_recv"]
    # p = 2: each rank holds one end, so it sends one way only: m = 2 messages of b s h fp32 values
    assert (pp["calls"], pp["payload_bytes"]) == (2, 2 * 2 * 64 * 64 * 4)
    assert pp["time_s"] == pytest.approx(2 * 10e-6 + pp["payload_bytes"] / 100e9)


def test_groups_that_span_nodes_use_the_inter_node_link():
    cfg = TransformerConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64)
    rows = _rows(
        plan(
            cfg,
            8,
            "32-true",
            1,
            64,
            hardware=TOY_HW,
            activation_checkpointing=False,
            tensor_parallel_sizes=(2,),
            pipeline_sizes=(),
        )
    )
    # 8 devices, 4 per node: the DDP ring crosses nodes; the t=2 group of FSDP2+TP sits in one node
    assert rows[("DDP", False)]["comm"]["all_reduce"]["groups"][0]["link"] == "inter"
    tp_groups = rows[("FSDP2+TP (d=4, t=2)", False)]["comm"]["all_reduce"]["groups"]
    assert {g["link"] for g in tp_groups} == {"intra"}
    hybrid = rows[("FSDP HYBRID_SHARD (g=4)", False)]["comm"]
    assert hybrid["all_gather"]["groups"][0]["link"] == "intra" and hybrid["all_reduce"]["groups"][0]["link"] == "inter"


def test_pipeline_bubble_fractions():
    cfg = TransformerConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=64)
    p, m = 4, 8
    res = plan(
        cfg,
        4,
        "32-true",
        1,
        64,
        hardware=TOY_HW,
        global_batch_size=m,
        pipeline_sizes=(p,),
        tensor_parallel_sizes=(),
        activation_checkpointing=False,
    )
    rows = {r["schedule"]: r for r in res["rows"] if r["pipeline_parallel_size"] == p}
    # REFERENCES.md: (p-1)/(m+p-1) for GPipe and 1F1B; interleaved divides the bubble by v; ZB-H1 a third of 1F1B's
    assert rows["gpipe"]["bubble_fraction"] == pytest.approx(3 / 11)
    assert rows["1f1b"]["bubble_fraction"] == pytest.approx(3 / 11)
    assert rows["interleaved"]["bubble_fraction"] == pytest.approx(3 / (2 * 8 + 3))
    assert rows["zero_bubble"]["bubble_fraction"] == pytest.approx(3 / 11 / 3)
    # 1F1B keeps at most p micro-batches of activations, GPipe all m
    assert rows["gpipe"]["activations_bytes"] > rows["1f1b"]["activations_bytes"]
    assert rows["interleaved"]["comm"]["send_recv"]["calls"] == 2 * rows["1f1b"]["comm"]["send_recv"]["calls"]


def test_recommendation_says_which_limit_binds():
    # two nodes of A100 PCIe (1.6 GB/s per GPU across nodes): DDP's all-reduce of 0.5 GB crosses the slow link
    res = plan(GPT2, 16, "bf16-mixed", 8, 1024, hardware="a100_pcie", activation_checkpointing=False)
    rows = _rows(res)
    assert rows[("DDP", False)]["binding"] == "communication"
    rec = res["recommendation"]
    assert rec["step_s"] == pytest.approx(min(r["step_s"] for r in res["rows"] if r["fits"]), rel=0.02)
    assert "bound" in res["reason"] and res["ranking"][0].startswith(rec["strategy"])
    # on NVLink inside one node the same model is compute-bound and DDP-like layouts win
    fast = plan(GPT2, 8, "bf16-mixed", 8, 1024, hardware="h100_nvlink", activation_checkpointing=False)
    assert fast["recommendation"]["binding"] == "compute"
    assert fast["recommendation"]["tensor_parallel_size"] == 1
    assert fast["recommendation"]["pipeline_parallel_size"] == 1
    # memory binds: a 7B-shaped model does not fit DDP in 80 GiB; the reason names the faster, too-big layout
    big = TransformerConfig(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096)
    res = plan(big, 8, "bf16-mixed", 1, 4096, hardware="h100_nvlink", activation_checkpointing=True)
    ddp = _rows(res)[("DDP", True)]
    assert not ddp["fits"] and ddp["binding"] == "memory" and res["recommendation"]["fits"]
    assert "memory binds" in res["reason"] and "DDP" in res["reason"]


def test_rlhf_modules_and_lora():
    cfg = TransformerConfig(
        vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, mlp="gelu", norm="layernorm"
    )
    p = 226944
    kw = dict(
        precision="32-true",
        micro_batch_size=2,
        seq_len=64,
        activation_checkpointing=False,
        tensor_parallel_sizes=(),
        pipeline_sizes=(),
        hardware=TOY_HW,
    )
    causal = _rows(plan(cfg, 2, **kw))[("DDP", False)]
    dpo = _rows(plan(cfg, 2, module="dpo", **kw))[("DDP", False)]
    # DPO: a frozen reference (4P bytes of weights, no gradients / AdamW), pairs = 2 sequences per example
    assert dpo["params_bytes"] == 2 * causal["params_bytes"] and dpo["optimizer_bytes"] == causal["optimizer_bytes"]
    assert dpo["comm"]["all_reduce"]["payload_bytes"] == 4 * p  # only the policy's gradients
    assert dpo["micro_batches"] == 2 * causal["micro_batches"]
    # LoRA r=8 on q, k, v, o, up, down: 8 x (4 x 128 + 2 x (64 + 256)) = 9216 adapters per block
    lora = _rows(plan(cfg, 2, module="dpo", lora_rank=8, **kw))[("DDP", False)]
    assert lora["comm"]["all_reduce"]["payload_bytes"] == 4 * 2 * 9216
    assert lora["optimizer_bytes"] == 8 * 2 * 9216
    assert lora["params_bytes"] == 4 * (p + 2 * 9216)  # the reference is the base with adapters off: no copy
    ppo = plan(cfg, 2, module="ppo", **kw)
    assert [m["name"] for m in ppo["models"]] == ["policy", "value", "reference", "reward"]
    ppo_row = _rows(ppo)[("DDP", False)]
    assert ppo_row["compute_s"] > 4 * causal["compute_s"]  # 4 PPO epochs of policy and value, plus 5 forwards
    assert ppo_row["comm"]["all_reduce"]["calls"] == 2 * 4  # policy + value, one all-reduce per optimizer step
    for module in ("grpo", "reward_model"):
        assert plan(cfg, 2, module=module, **kw)["rows"]
    with pytest.raises(ValueError, match="module"):
        plan(cfg, 2, module="sft_ppo", **kw)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="world_size.*8.*multiple of 3"):
        plan(GPT2, 8, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size.*5.*n_head=12"):
        plan(GPT2, 10, tensor_parallel_size=5)
    with pytest.raises(ValueError, match="pipeline_parallel_size.*16.*n_layer=12"):
        plan(GPT2, 16, pipeline_parallel_size=16)
    with pytest.raises(ValueError, match="untied embeddings"):  # GPT-2 ties them: pipeline.split_model refuses
        plan(GPT2, 8, pipeline_parallel_size=2)
    assert not [r for r in plan(GPT2, 8)["rows"] if r["pipeline_parallel_size"] > 1]
    with pytest.raises(ValueError, match="intra_node_gbps.*> 0"):
        plan(GPT2, 8, hardware="h100_nvlink", intra_node_gbps=0)
    with pytest.raises(ValueError, match="device_memory_gib"):
        plan(GPT2, 8, device_memory_gib=0)
    with pytest.raises(ValueError, match="memory_gib.*> 0"):
        hardware_preset("h100_nvlink", memory_gib=0)
    with pytest.raises(ValueError, match="global_batch_size=3"):
        plan(GPT2, 2, global_batch_size=3, tensor_parallel_sizes=(), pipeline_sizes=())
    with pytest.raises(ValueError, match="hardware.*h100_nvlink"):
        plan(GPT2, 2, hardware="tpu")


def test_hardware_presets_and_overrides():
    assert set(HARDWARE) >= {"h100_nvlink", "h200_nvlink", "a100_pcie", "cpu_gloo"}
    h = hardware_preset("h100_nvlink", intra_node_gbps=400)
    assert (h.intra_node_gbps, h.peak_tflops) == (400, 989.0)  # REFERENCES: H100/H200 SXM dense bf16 989 TFLOP/s
    slow = plan(GPT2, 8, micro_batch_size=8, hardware="h100_nvlink", intra_node_gbps=40, activation_checkpointing=False)
    fast = plan(GPT2, 8, micro_batch_size=8, hardware="h100_nvlink", activation_checkpointing=False)
    assert _rows(slow)[("DDP", False)]["comm_s"] > 5 * _rows(fast)[("DDP", False)]["comm_s"]
    assert slow["device_memory_gib"] == 80.0


# ---------------------------------------------------------------------------------------------------- positions
def _readme_extrapolation() -> dict[str, dict[str, tuple[float, ...]]]:
    table: dict[str, dict[str, tuple[float, ...]]] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1] in ("RoPE", "ALiBi"):
            table.setdefault(cells[0], {})[cells[1].lower()] = tuple(float(c) for c in cells[2:])
    return table


def test_extrapolation_figures_are_the_readmes():
    """The planner's figures are the README's table, which is generated from the saved benchmark output."""
    assert _readme_extrapolation() == EXTRAPOLATION_PPL
    saved = json.loads((ROOT / "benchmarks" / "results" / "extrapolation_cpu.json").read_text())
    names = {"embedded": "embedded", "tinyshakespeare": "Tiny Shakespeare"}
    for row in saved["rows"]:
        if row["encoding"] in ("rope", "alibi"):
            ppl = tuple(round(row[f"ppl@{n}"], 2) for n in saved["eval_lengths"])
            assert EXTRAPOLATION_PPL[names[row["data"]]][row["encoding"]] == ppl, row


def test_positional_advice():
    adv = positional_advice(2048, [4096, 8192], "rope")
    # 8192 / 2048 = 4: YaRN at factor 4 from the training length, attention factor 0.1 ln 4 + 1
    assert adv["factor"] == 4
    assert adv["rope"]["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    assert "1.139" in adv["rope"]["text"]
    assert "73.86" in adv["rope"]["text"] and "103.11" in adv["rope"]["text"]  # measured RoPE at 4x
    assert "66.93" in adv["alibi"] and "92.96" in adv["alibi"]  # measured ALiBi at 4x
    TransformerConfig(rope_scaling=adv["rope"]["rope_scaling"])  # a valid config entry
    for alt in adv["rope"]["alternatives"]:
        TransformerConfig(rope_scaling=alt)
    assert positional_advice(1024, 512)["rope"]["rope_scaling"] is None
    with pytest.raises(ValueError, match="serve_lengths"):
        positional_advice(1024, [0])


# ---------------------------------------------------------------------------------------------------- outputs
def test_plan_command_hardware_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    result = plan_command(
        "gpt2_124m",
        world_size=8,
        vocab_size=50257,
        micro_batch_size=8,
        seq_len=1024,
        hardware="h100_nvlink",
        intra_node_gbps=400,
        serve_lengths=[4096],
        json=str(out),
        plot=str(png),
        plot_world_sizes=[1, 2, 4, 8],
    )
    table = capsys.readouterr().out
    assert "step ms" in table and "recommended:" in table and "bound" in table and "yarn" in table
    assert result["hardware"]["intra_node_gbps"] == 400
    assert json.loads(out.read_text())["recommendation"]["strategy"] == result["recommendation"]["strategy"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = result["plot"]["series"]
    assert [n for n, _ in series["DDP"]] == [1, 2, 4, 8] and [n for n, _ in series["FSDP2+TP (t=2)"]] == [2, 4, 8]
    with pytest.raises(ValueError, match="--hardware"):
        plan_command("gpt2_124m", vocab_size=50257, intra_node_gbps=100)
    with pytest.raises(ValueError, match="needs step times"):
        plot_plan(GPT2, tmp_path / "x.png", (1, 2))


def test_plan_command_cli_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(plan_command)
    args = parser.parse_args(
        [
            "--model",
            "X",
            "--hardware",
            "h100_nvlink",
            "--intra_node_gbps",
            "400",
            "--module",
            "dpo",
            "--lora_rank",
            "8",
            "--serve_lengths",
            "[4096, 8192]",
        ]
    )
    assert (args.hardware, args.intra_node_gbps, args.module, args.lora_rank) == ("h100_nvlink", 400.0, "dpo", 8)
    assert args.serve_lengths == [4096, 8192]
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "X", "--hardware", "tpu_v9"])


@pytest.mark.parametrize("tied", [False, True])
def test_scalar_head_model_counts_match_the_module(tied):
    """The planner's reward-model row holds what RewardModel builds: every parameter (its untied lm_head kept, frozen)
    in the weights, only the trainable ones in gradients and AdamW state (counted on the module itself)."""
    from lightning_llm.modules import RewardModel

    cfg = TransformerConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, tie_embeddings=tied)
    kw = dict(precision="32-true", micro_batch_size=2, seq_len=64, activation_checkpointing=False)
    row = _rows(plan(cfg, 2, module="reward_model", tensor_parallel_sizes=(), pipeline_sizes=(), **kw))[("DDP", False)]
    module = RewardModel(config=cfg)
    module.configure_model()
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert (total > trainable) is not tied  # untied: the frozen lm_head
    assert row["params_bytes"] == 4 * total
    assert row["grads_bytes"] == 4 * trainable and row["optimizer_bytes"] == 8 * trainable
