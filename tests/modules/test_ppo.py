"""PPO module: one update lowers the surrogate loss, bad input gets clear errors, checkpoints resume exactly."""

import json

import lightning as L
import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.data.synthetic import TargetCharReward
from lightning_llm.modules.ppo import PPO
from lightning_llm.modules.reward_model import RewardModel
from lightning_llm.nn.generation import generate


def _prompts(n=16, batch=8):
    dm = PromptDataModule(num_train=n, num_val=8, batch_size=batch)
    dm.setup("fit")
    return dm


def _ppo(dm, **kw):
    cfg = TransformerConfig(vocab_size=dm.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16)
    args = {"reward_functions": [TargetCharReward("a", 6)], "max_new_tokens": 6, "log_completions_every_n_steps": 0}
    args.update(kw)
    m = PPO(config=cfg, **args)
    m.tokenizer = dm.tokenizer
    return m


class _ManualOpt:
    """Stand-in for Lightning's optimizer plumbing so ppo_update can run outside a Trainer."""

    def __init__(self, module, lr):
        self.opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)

    def install(self, module):
        module.optimizers = lambda: self.opt
        module.manual_backward = lambda loss: loss.backward()
        module.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], gradient_clip_val
        )


def test_one_ppo_update_lowers_the_surrogate_loss():
    dm = _prompts()
    m = _ppo(dm, ppo_epochs=1, num_minibatches=1, vf_coef=0.0)
    _ManualOpt(m, lr=0.5).install(m)
    batch = next(iter(dm.train_dataloader()))
    roll = m.rollout(batch["prompt"], batch["prompt_ids"])
    with torch.no_grad():
        before, _ = m.ppo_losses(roll)
    # at the sampling policy the ratio is 1, so the clipped surrogate is -mean(A) over valid tokens (whitened -> ~0)
    assert float(before) == pytest.approx(-float(roll.advantages[roll.response_mask].mean()), abs=1e-5)
    m.ppo_update(roll)
    with torch.no_grad():
        after, stats = m.ppo_losses(roll)
    assert float(after) < float(before) - 1e-3
    assert float(stats["approx_kl"]) > 0


def test_rollout_logprobs_match_sampling_and_masks():
    dm = _prompts()
    m = _ppo(dm, temperature=0.7)
    batch = next(iter(dm.train_dataloader()))
    m._generator = torch.Generator().manual_seed(7)
    roll = m.rollout(batch["prompt"], batch["prompt_ids"])
    out = generate(
        m.policy,
        batch["prompt_ids"],
        max_new_tokens=6,
        temperature=0.7,
        eos_id=dm.tokenizer.eos_id,
        pad_id=dm.tokenizer.pad_id,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(out.sequences, roll.sequences)
    # rescoring with the same temperature reproduces the sampler's log-probabilities (KV cache vs full forward)
    torch.testing.assert_close(roll.logprobs, out.logprobs, rtol=1e-4, atol=1e-4)
    # policy == reference at the start: k1 KL is zero
    assert float(roll.kl.abs().max()) < 1e-4
    expected = TargetCharReward("a", 6)(
        batch["prompt"], [dm.tokenizer.decode(r[mk]) for r, mk in zip(out.responses, out.response_mask.bool())]
    )
    torch.testing.assert_close(roll.raw_scores, torch.tensor(expected))
    assert roll.advantages[~roll.response_mask].abs().sum() == 0


def test_missing_eos_penalty():
    dm = _prompts()
    m = _ppo(dm, missing_eos_penalty=2.0)
    batch = next(iter(dm.train_dataloader()))
    roll = m.rollout(batch["prompt"], batch["prompt_ids"])
    torch.testing.assert_close(roll.scores, roll.raw_scores - 2.0 * (~roll.finished).float())


def test_bad_input_errors():
    dm = _prompts()
    m = _ppo(dm)
    long_prompt = [[2] * 20]  # 20 + 6 new tokens > block_size 24
    with pytest.raises(ValueError, match="exceeds the policy's context"):
        m.rollout(["x"], long_prompt)
    batch = next(iter(dm.train_dataloader()))
    m.reward_functions = [lambda prompts, completions, **kw: [0.0] * (len(completions) - 1)]
    with pytest.raises(ValueError, match="returned 7 values for 8 completions"):
        m.rollout(batch["prompt"], batch["prompt_ids"])
    m.reward_functions = [lambda prompts, completions, **kw: [float("nan")] * len(completions)]
    with pytest.raises(ValueError, match="non-finite"):
        m.rollout(batch["prompt"], batch["prompt_ids"])
    with pytest.raises(ValueError, match="reward_model"):
        PPO(config=TransformerConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="temperature"):
        _ppo(dm, temperature=0.0)


def test_tokenizer_mismatch_between_policy_and_reward_model(tmp_path):
    # reward model trained on a char tokenizer built from other text (a different vocabulary / fingerprint)
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "xyz", "rejected": "zz"}) for i in range(8)))
    prefs = PreferenceDataModule(
        dataset=str(path), tokenizer="char", val_fraction=0.25, batch_size=4, max_length=16, max_prompt_length=8
    )
    dm = _prompts()
    rm = RewardModel(config=TransformerConfig(vocab_size=dm.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16))
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(rm, datamodule=prefs)
    ckpt = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(ckpt)
    ppo = _ppo(dm, reward_model=str(ckpt), reward_functions=None)
    ppo._trainer = L.Trainer(logger=False, enable_progress_bar=False)
    ppo._trainer.datamodule = dm
    with pytest.raises(ValueError, match="tokenizer mismatch between policy and reward model"):
        ppo.setup("fit")
    small = RewardModel(config=TransformerConfig(vocab_size=8, block_size=24, n_layer=1, n_head=2, n_embd=16))
    torch.save({"state_dict": small.state_dict(), "transformer_config": small.config.to_dict()}, tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        _ppo(dm, reward_model=str(tmp_path / "s.ckpt"), reward_functions=None)


class _Capture(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.kl = pl_module.kl_ctl.state_dict()
        self.opt_state = {k: v["exp_avg"].clone() for k, v in trainer.optimizers[0].state_dict()["state"].items()}
        self.rollouts = pl_module.rollouts_done


def test_checkpoint_resume_restores_kl_controller_and_optimizer(tmp_path):
    dm = _prompts(n=16, batch=8)
    kw = {"adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 10.0, "ppo_epochs": 1}
    trainer_kw = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": tmp_path,
    }
    m = _ppo(dm, **kw)
    init_coef = m.kl_ctl.value
    trainer = L.Trainer(max_epochs=1, enable_checkpointing=False, **trainer_kw)
    trainer.fit(m, datamodule=dm)
    assert m.kl_ctl.value != init_coef and m.rollouts_done == 2
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["kl_controller"]["value"] == m.kl_ctl.value
    assert any(k.startswith("ref.") for k in saved["state_dict"]) and any(
        k.startswith("value_head.") for k in saved["state_dict"]
    )
    resumed = _ppo(dm, **kw)
    capture = _Capture()
    L.Trainer(max_epochs=2, enable_checkpointing=False, callbacks=[capture], **trainer_kw).fit(
        resumed, datamodule=dm, ckpt_path=path
    )
    assert capture.kl == m.kl_ctl.state_dict() and capture.rollouts == 2
    expected = {k: v["exp_avg"] for k, v in saved["optimizer_states"][0]["state"].items()}
    assert expected.keys() == capture.opt_state.keys()
    for k in expected:
        torch.testing.assert_close(capture.opt_state[k], expected[k])
    assert resumed.rollouts_done == 4


def test_huge_rewards_stop_with_a_clear_error_instead_of_an_infinite_loss():
    """Issue 14: rewards near float32's limit make the value loss (V - R)^2 infinite; PPO must stop, not train on."""
    dm = _prompts()
    m = _ppo(dm, ppo_epochs=1, reward_functions=[lambda prompts, completions, **kw: [3e38] * len(completions)])
    _ManualOpt(m, lr=0.1).install(m)
    batch = next(iter(dm.train_dataloader()))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="Rescale the reward functions"):
        m.ppo_update(m.rollout(batch["prompt"], batch["prompt_ids"]))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # no step was taken


def test_ppo_learns_at_tiny_size():
    """Reward up: the fraction of 'a' in 4-token completions, from ~0.07 (random policy) towards 1 in 20 rollouts."""
    L.seed_everything(0, verbose=False)
    dm = _prompts(n=160, batch=8)
    cfg = TransformerConfig(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
    m = PPO(
        config=cfg,
        reward_functions=[TargetCharReward("a", 4)],
        max_new_tokens=4,
        ppo_epochs=2,
        kl_coef=0.0,
        learning_rate=1e-2,
        log_completions_every_n_steps=0,
    )
    rewards = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["train/reward_mean"]))

    L.Trainer(
        max_epochs=1,
        callbacks=[Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(m, datamodule=dm)
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.3 and last > first + 0.3, rewards
