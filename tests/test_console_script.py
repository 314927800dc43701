"""The product as people run it: the installed ``lightning-llm`` executable, from an empty folder, its exit status and
the files each subcommand writes; and a wheel built from the repository that carries the presets.

One tiny ``fit`` (module-scoped) feeds validate / test / predict / export; every call goes through the console
script that ``pip install`` put beside the interpreter, never through ``main()`` in process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--trainer.max_steps", "4",
    "--trainer.val_check_interval", "4",
    "--trainer.limit_val_batches", "2",
    "--model.init_args.config.n_layer", "1",
    "--model.init_args.config.n_embd", "32",
    "--model.init_args.config.n_head", "2",
    "--data.init_args.vocab_size", "300",
]  # fmt: skip


def _executable() -> str:
    exe = Path(sys.executable).parent / "lightning-llm"
    found = str(exe) if exe.is_file() else shutil.which("lightning-llm")
    if found is None:
        pytest.fail("the `lightning-llm` console script is not installed beside the interpreter: `pip install -e .`")
    return found


def run(args: list[str], cwd: Path, exe: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    env.pop("LIGHTNING_LLM_DEBUG", None)
    return subprocess.run([exe or _executable(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """``lightning-llm fit --config quickstart`` (a packaged preset, by name) in an empty folder."""
    cwd = tmp_path_factory.mktemp("fit")
    proc = _ok(run(["fit", "--config", "quickstart", *TINY], cwd))
    assert "validation perplexity" in proc.stdout
    (metrics,) = list(cwd.rglob("fit_metrics.json"))
    (ckpt,) = list(cwd.rglob("*.ckpt"))
    return {"cwd": cwd, "metrics": metrics, "ckpt": ckpt, "log_dir": metrics.parent}


def test_fit_exits_zero_and_writes_metrics_checkpoint_tokenizer(fitted):
    metrics = json.loads(fitted["metrics"].read_text())
    assert metrics["val/ppl"] > 1.0 and metrics["data/val_unigram_ppl"] > 1.0
    assert (fitted["log_dir"] / "tokenizer" / "tokenizer.json").is_file()
    assert fitted["ckpt"].stat().st_size > 0


def test_a_fit_shorter_than_the_validation_interval_still_leaves_its_checkpoint(tmp_path):
    """The quickstart shortened below its preset's ``val_check_interval`` (250): Lightning's default checkpoint alone
    would write nothing; the CLI's FinalCheckpoint saves the final step, which ``export`` then reads."""
    from lightning_llm.checkpoint import load_checkpoint

    args = ["fit", "--config", "quickstart", "--trainer.max_steps", "3", *TINY[4:]]  # the preset validates at 250
    _ok(run(args, tmp_path))
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    assert load_checkpoint(ckpt)["global_step"] == 3 and "step=3" in ckpt.name
    _ok(run(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")], tmp_path))


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_from_the_checkpoint(fitted, stage, tmp_path):
    proc = _ok(run([stage, "--config", "quickstart", *TINY, "--ckpt_path", str(fitted["ckpt"])], tmp_path))
    (path,) = list(tmp_path.rglob(f"{stage}_metrics.json"))
    key = "val/ppl" if stage == "validate" else "test/ppl"
    assert json.loads(path.read_text())[key] > 1.0, proc.stdout[-2000:]


def test_predict_writes_one_row_per_prompt(fitted, tmp_path):
    prompts = ["def main", "The module"]
    args = ["predict", "--config", "quickstart", *TINY[6:-2], "--ckpt_path", str(fitted["ckpt"])]
    args += ["--model.init_args.generation", '{"max_new_tokens": 3, "temperature": 0}']
    args += ["--data", "lightning_llm.data.PromptDataModule", "--data.init_args.prompts", json.dumps(prompts)]
    args += ["--data.init_args.tokenizer", str(fitted["log_dir"] / "tokenizer")]
    _ok(run(args, tmp_path))
    (path,) = list(tmp_path.rglob("predictions.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(isinstance(r["completion"], str) for r in rows)


def test_export_gives_a_hugging_face_model_with_our_logits(fitted, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lightning_llm import load_pretrained

    out = tmp_path / "hf"
    _ok(run(["export", "--checkpoint", str(fitted["ckpt"]), "--output", str(out)], tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # the reference: transformers' own model
    ours, tokenizer = load_pretrained(fitted["ckpt"])
    ids = torch.tensor([tokenizer.encode("def main(argv):\n    return 0")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(out)("def main").input_ids == tokenizer.encode("def main")


def test_evaluate_writes_the_report(fitted, tmp_path):
    args = ["evaluate", "--config", "eval/fast", "--model", str(fitted["ckpt"]), "--out", str(tmp_path / "eval")]
    _ok(run([*args, "--plots", "false"], tmp_path))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["parts"] and all(part["status"] == "ok" for part in report["parts"].values())


def test_plan_and_presets(tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "model/gpt2_124m", "--vocab_size", "50257", "--world_size", "8", "--json", str(out)]
    proc = _ok(run(args, tmp_path))
    assert "fsdp" in proc.stdout.lower() and json.loads(out.read_text())["config"]["vocab_size"] == 50257
    names = _ok(run(["presets"], tmp_path)).stdout
    assert "quickstart" in names and "rlhf/ppo_quickstart" in names and "trainer/cpu_ddp" in names


def test_a_model_preset_stacks_onto_another_module(tmp_path):
    """Model presets name no class: the DPO quickstart with the ALiBi model preset stays a DPO module."""
    args = ["fit", "--config", "rlhf/dpo_quickstart", "--config", "model/alibi_small", "--print_config"]
    cfg = _ok(run(args, tmp_path)).stdout
    assert "class_path: lightning_llm.modules.dpo.DPO" in cfg and "pos_encoding: alibi" in cfg


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["fit", "--config", "quickstart", "--model.init_args.config.n_embd", "30"], "n_head (4) must divide n_embd"),
        (["fit", "--config", "no_such_preset"], "no packaged preset has that name"),
        (["export", "--checkpoint", "missing.ckpt", "--output", "out"], "does not exist"),
    ],
)
def test_failures_exit_nonzero_with_one_line(tmp_path, args, needle):
    proc = run(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lightning-llm: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    debug = run([*args, "--debug"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_command_line_exits_two(tmp_path):
    assert run(["fit", "--config", "quickstart", "--trainer.no_such_flag", "1"], tmp_path).returncode == 2
    assert run([], tmp_path).returncode == 2


def test_wheel_carries_the_presets_and_runs_from_an_empty_folder(tmp_path):
    """Build the wheel, install it (no -e) into a fresh target, and run `fit --config quickstart` from it."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = list(wheels.glob("lightning_llm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("quickstart.yaml", "rlhf/ppo_quickstart.yaml", "trainer/cpu_ddp.yaml", "eval/helm.yaml"):
        assert f"lightning_llm/configs/{preset}" in names, sorted(n for n in names if "configs" in n)
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PYTHONPATH": str(site)}  # the wheel's package first; torch, lightning... from this environment
    where = subprocess.run(
        [sys.executable, "-c", "import lightning_llm; print(lightning_llm.__file__)"],
        cwd=empty,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    proc = _ok(run(["fit", "--config", "quickstart", *TINY], empty, exe=str(site / "bin" / "lightning-llm"), env=env))
    assert list(empty.rglob("fit_metrics.json")), proc.stdout[-2000:]


@pytest.mark.distributed
def test_ddp_fit_under_torchrun_equals_lightnings_own_launcher(tmp_path):
    """The README's two ways to start a 2-process DDP fit, each from an empty folder with the installed executable:
    Lightning's own launcher (``lightning-llm fit ... --config trainer/cpu_ddp``) and ``torchrun --nproc-per-node 2
    lightning-llm fit ...`` (Lightning detects torchrun and starts no process itself). Both exit 0 (the program ends
    the gloo group it made, so no rank aborts at exit) and train the same model: equal losses, a checkpoint each."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _launch import run_all

    args = ["fit", "--config", "quickstart", "--config", "trainer/cpu_ddp", *TINY]
    exe = _executable()
    commands = {
        "launcher": [exe, *args],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", exe,
                     *args],
    }  # fmt: skip
    for name in commands:
        (tmp_path / name).mkdir()
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for name, command in commands.items():  # one after the other: each is 2 processes on the 2 cores
        run_all({name: command}, tmp_path, tmp_path / name, env, 300)
    metrics = {}
    for name in commands:
        (path,) = list((tmp_path / name).rglob("fit_metrics.json"))
        metrics[name] = json.loads(path.read_text())
        assert list((tmp_path / name).rglob("*step=4.ckpt")), f"{name}: no checkpoint"
    for key in ("train/loss", "val/loss", "val/ppl"):
        assert metrics["torchrun"][key] == metrics["launcher"][key], key
