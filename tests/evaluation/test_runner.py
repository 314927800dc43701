"""The runner end to end: our Transformer, a CausalLM checkpoint and a local Hugging Face model (each path read by
``load_pretrained``); the packaged YAML configs parsed by jsonargparse as ``lightning-llm evaluate`` parses them;
reports, plots, switchable parts, failed parts and setting errors."""

import argparse
import dataclasses
import inspect
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import lightning_llm
from lightning_llm.config import TransformerConfig
from lightning_llm.data.tokenizer import Tokenizer
from lightning_llm.evaluation import (
    BiasPart,
    EfficiencyPart,
    EmbeddingsPart,
    FairnessPart,
    HarnessPart,
    LambadaPart,
    LanguageModel,
    MultipleChoicePart,
    PerplexityPart,
    RobustnessPart,
    evaluate,
    tasks,
)

EVAL_CONFIGS = Path(lightning_llm.__file__).parent / "configs" / "eval"
FAST, HELM, LAMBADA_OPENAI = (EVAL_CONFIGS / f"{n}.yaml" for n in ("fast", "helm", "lambada_openai"))
PARTS = {
    "perplexity": PerplexityPart,
    "lambada": LambadaPart,
    "multiple_choice": MultipleChoicePart,
    "robustness": RobustnessPart,
    "fairness": FairnessPart,
    "efficiency": EfficiencyPart,
    "bias": BiasPart,
    "embeddings": EmbeddingsPart,
    "harness": HarnessPart,  # off by default: the default report stays offline
}


def fast_settings(**disabled_parts: bool) -> dict:
    """fast.yaml as keyword arguments of ``evaluate``, with some parts switched off (``lambada=False``)."""
    settings = yaml.safe_load(FAST.read_text())
    for part, enabled in disabled_parts.items():
        settings[part] = {**settings.get(part, {}), "enabled": enabled}
    return settings


def cli_parser() -> ArgumentParser:
    """The parser ``lightning-llm evaluate`` builds: the function's typed arguments plus ``--config FILE``."""
    parser = ArgumentParser(prog="lightning-llm evaluate", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate)
    return parser


def run_cli(argv: list[str]) -> dict:
    parser = cli_parser()
    init = parser.instantiate(parser.parse_args(argv)).as_dict()
    init.pop("config")
    return evaluate(**init)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(tasks.embedded_texts("train")[:200], vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    from lightning_llm.nn import Transformer

    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))


def reference_perplexity(network: torch.nn.Module, tok: Tokenizer, settings: dict) -> tuple[float, dict[int, float]]:
    """The perplexity part's numbers, computed directly on ``network`` with the same texts and windows."""
    ppl = settings["perplexity"]
    texts = tasks.embedded_texts("test")
    lm = LanguageModel(network, device="cpu")
    out = tasks.text_perplexity(lm, tok, texts, ppl["max_length"], ppl["stride"], 16, ppl["max_chars"])
    curve = tasks.perplexity_vs_context(lm, tok, texts, ppl["context_lengths"], 16, ppl["max_chars"])
    return out["ppl"], curve


def test_full_report_files_and_summary(model, tok, tmp_path):
    rep = evaluate(model, tok, out=tmp_path, device="cpu", verbose=False, **fast_settings())
    assert all(p["status"] == "ok" for p in rep["parts"].values()), {k: v.get("error") for k, v in rep["parts"].items()}
    assert set(rep["parts"]) == set(PARTS) - {"harness"}
    for name in (
        "report.json",
        "report.md",
        "reliability_diagram.png",
        "perturbation_accuracy.png",
        "ppl_vs_context.png",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"] == pytest.approx(rep["summary"])
    assert saved["config"]["perplexity"]["max_length"] == 64 and saved["config"]["lambada"]["limit"] == 16
    s = rep["summary"]
    # a random model over V tokens: perplexity near V, and worst case <= unperturbed accuracy by construction
    assert 0.3 * tok.vocab_size < s["perplexity/ppl"] < 3 * tok.vocab_size
    mc = rep["parts"]["multiple_choice"]
    base_acc = sum(mc["correct"]) / len(mc["correct"])
    for group in ("robustness", "fairness"):
        assert s[f"{group}/worst_case_acc"] <= base_acc
        assert s[f"{group}/drop"] == pytest.approx(base_acc - s[f"{group}/worst_case_acc"])
    assert set(rep["parts"]["perplexity"]["ppl_vs_context"]) == {"16", "32", "64"}
    assert s["efficiency/tokens_per_sec"] > 0 and s["efficiency/peak_memory_mb"] > 0
    assert "| perplexity/ppl |" in (tmp_path / "report.md").read_text()


def test_parts_switch_off_and_failures_are_reported(model, tok):
    rep = evaluate(
        model,
        tok,
        out=None,
        perplexity=PerplexityPart(enabled=False),
        lambada={"enabled": False},
        efficiency=EfficiencyPart(enabled=False),
        fairness=FairnessPart(enabled=False),
        bias=BiasPart(enabled=False),
        embeddings={"enabled": False},
        multiple_choice=MultipleChoicePart(path="/nonexistent/mc.jsonl"),
        verbose=False,
    )
    assert set(rep["parts"]) == {"multiple_choice", "robustness"}
    assert rep["parts"]["multiple_choice"]["status"] == "error"
    assert "FileNotFoundError" in rep["parts"]["multiple_choice"]["error"]
    assert rep["parts"]["robustness"]["status"] == "error"  # needs the multiple-choice part


def test_setting_errors_name_the_setting(model, tok):
    with pytest.raises(ValueError, match=r"lambada\.limt.*valid keys"):
        evaluate(model, tok, out=None, lambada={"limt": 3}, verbose=False)
    with pytest.raises(ValueError, match=r"robustness\.perturbations.*shout"):
        RobustnessPart(perturbations=("shout",))
    with pytest.raises(ValueError, match=r"efficiency\.repeats.*positive integer, got 0"):
        EfficiencyPart(repeats=0)
    with pytest.raises(ValueError, match=r"multiple_choice\.template"):
        MultipleChoicePart(template="no placeholder")
    with pytest.raises(TypeError, match="`fairness` must be a FairnessPart"):
        evaluate(model, tok, out=None, fairness=3, verbose=False)
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        evaluate(model, None, out=None, verbose=False)
    with pytest.raises(FileNotFoundError, match="`model`='/nonexistent/model.ckpt' does not exist"):
        evaluate("/nonexistent/model.ckpt", tok, out=None, verbose=False)


def test_packaged_configs_parse_as_the_command_line_does(tmp_path):
    parser = cli_parser()
    defaults = inspect.signature(evaluate).parameters
    # helm.yaml spells out the defaults: parsing it must give exactly the function's defaults
    helm = parser.instantiate(parser.parse_args(["--config", str(HELM), "--model", "m"]))
    for name, cls in PARTS.items():
        assert helm[name] == cls() == defaults[name].default, name
    for name in ("out", "seed", "batch_size", "plots"):
        assert helm[name] == defaults[name].default, name
    # fast.yaml changes some fields, keeps the others; the command line wins over the files; configs stack
    argv = ["--config", str(HELM), "--config", str(FAST), "--config", str(LAMBADA_OPENAI), "--model", "m"]
    cfg = parser.instantiate(parser.parse_args([*argv, "--lambada.limit", "5", "--fairness.enabled", "false"]))
    fast = yaml.safe_load(FAST.read_text())
    assert cfg.perplexity == PerplexityPart(**{**fast["perplexity"], "context_lengths": (16, 32, 64)})
    assert cfg.lambada == LambadaPart(path=yaml.safe_load(LAMBADA_OPENAI.read_text())["lambada"]["path"], limit=5)
    assert cfg.fairness == FairnessPart(enabled=False) and cfg.efficiency.repeats == fast["efficiency"]["repeats"]
    # a misspelt key in a YAML file is an error, not a silently ignored setting; so is a wrong value
    (tmp_path / "bad.yaml").write_text("lambada:\n  limt: 3\n")
    with pytest.raises(argparse.ArgumentError, match="limt"):
        parser.parse_args(["--model", "m", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match=r"robustness\.perturbations.*shout"):
        parser.instantiate(parser.parse_args(["--model", "m", "--robustness.perturbations", "[shout]"]))


def test_cli_on_local_hf_model_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    hf_dir = tmp_path / "tiny-llama"
    hf_model.save_pretrained(hf_dir)
    tok.save(hf_dir)  # the tokenizer travels in the model directory: no --tokenizer
    out = tmp_path / "eval"
    argv = ["--config", str(FAST), "--model", str(hf_dir), "--out", str(out), "--device", "cpu", "--verbose", "false"]
    for part in ("lambada", "multiple_choice", "robustness", "fairness", "efficiency", "bias", "embeddings"):
        argv += [f"--{part}.enabled", "false"]
    rep = run_cli(argv)
    assert rep["model"]["kind"] == "lightning_llm" and rep["model"]["name"] == "tiny-llama"  # converted on load
    assert list(rep["parts"]) == ["perplexity"] and rep["parts"]["perplexity"]["status"] == "ok"
    assert (out / "report.md").is_file()
    # the independent reference: the transformers model itself on the same windows
    ppl, curve = reference_perplexity(hf_model, tok, fast_settings())
    assert rep["summary"]["perplexity/ppl"] == pytest.approx(ppl, rel=1e-4)
    assert rep["parts"]["perplexity"]["ppl_vs_context"] == pytest.approx(
        {str(k): v for k, v in curve.items()}, rel=1e-4
    )


def test_causal_lm_checkpoint_and_module_give_the_same_report(tok, tmp_path):
    from lightning_llm.modules.causal_lm import CausalLM

    cfg = TransformerConfig(
        vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32, pos_encoding="learned"
    )
    module = CausalLM(config=cfg)
    ids = torch.randint(0, tok.vocab_size, (4, 129))
    data = torch.utils.data.DataLoader([{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}], batch_size=None)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    module.tokenizer = tok  # saved into the checkpoint with the weights
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    tok_dir = tok.save(tmp_path / "tok")
    off = {part: False for part in ("lambada", "multiple_choice", "robustness", "fairness", "efficiency")}
    settings = fast_settings(**off)
    reports = {
        "path, stored tokenizer": evaluate(str(ckpt), out=None, device="cpu", verbose=False, **settings),
        "path, tokenizer dir": evaluate(ckpt, tok_dir, out=None, device="cpu", verbose=False, **settings),
        "module": evaluate(module, out=None, device="cpu", verbose=False, **settings),
    }
    ppl, _ = reference_perplexity(module.model, tok, settings)
    for name, rep in reports.items():
        assert rep["parts"]["perplexity"]["status"] == "ok", (name, rep["parts"]["perplexity"].get("error"))
        assert rep["model"]["kind"] == "lightning_llm" and rep["model"]["max_length"] == 128, name  # learned table
        assert rep["model"]["num_parameters"] == sum(p.numel() for p in module.model.parameters()), name
        assert rep["model"]["tokenizer_vocab_size"] == tok.vocab_size, name
        assert rep["summary"]["perplexity/ppl"] == pytest.approx(ppl, rel=1e-5), name


def test_part_defaults_are_documented():
    """Every field of every part has a line in its dataclass docstring (the command's --help text)."""
    for cls in PARTS.values():
        for field in dataclasses.fields(cls):
            assert f"    {field.name}: " in cls.__doc__, f"{cls.__name__}.{field.name}"


def test_perturbed_parts_score_each_distinct_text_once(model, tok, monkeypatch):
    """Robustness / fairness reuse the scores of questions a perturbation left unchanged: the same accuracies as
    scoring every perturbed list in full (the reference below, computed without the runner), with fewer forwards."""
    from lightning_llm.evaluation import runner
    from lightning_llm.evaluation.perturbations import Perturbation

    cfg = MultipleChoicePart(limit=24)
    examples, _ = runner._mc_examples(cfg, seed=0)
    lm = LanguageModel(model, device="cpu")
    base = runner._mc(lm, tok, examples, cfg, 8)
    names = ("misspellings", "dialect", "gender_pronouns")
    scored = []
    real_mc = runner._mc
    monkeypatch.setattr(
        runner, "_mc", lambda lm_, tok_, exs, *a: scored.append(len(exs)) or real_mc(lm_, tok_, exs, *a)
    )
    out = runner._part_perturbed(lm, tok, names, examples, base, cfg, 0, 8)
    worst = list(base["correct"])
    for name in names:  # reference: every perturbed example scored, nothing shared
        p = Perturbation(name, 0)
        full = real_mc(
            lm, tok, [tasks.MultipleChoiceExample(p(e.question), e.choices, e.answer) for e in examples], cfg, 8
        )
        assert out["perturbations"][name]["acc"] == sum(full["correct"]) / len(examples), name
        worst = [min(a, b) for a, b in zip(worst, full["correct"])]
        changed = round(out["perturbations"][name]["changed_fraction"] * len(examples))
        assert out["perturbations"][name]["scored"] <= changed
    assert out["worst_case_acc"] == sum(worst) / len(examples)
    assert sum(scored) == sum(out["perturbations"][n]["scored"] for n in names) < len(names) * len(examples)


def test_markdown_cells_hold_pipes_and_line_breaks():
    """A string with `|` and line breaks (a chat template) stays one cell of one row of report.md's table."""
    import re

    from lightning_llm.evaluation.report import render_markdown

    template = "{% for m in messages %}{{ m['content'] | trim }}\n{% endfor %}"
    report = {"model": {}, "summary": {}, "parts": {"harness": {"status": "ok", "chat_template": template}}}
    rows = [line for line in render_markdown(report).splitlines() if line.startswith("| chat_template")]
    assert len(rows) == 1
    cell = template.replace("|", "\\|").replace("\n", " ")  # the pipe escaped, the line break a space
    assert re.split(r"(?<!\\)\|", rows[0]) == ["", " chat_template ", f" {cell} ", ""]
