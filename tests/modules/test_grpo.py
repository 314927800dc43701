"""GRPO and RLOO modules: the rollout layout and advantages, the objective per loss type, beta = 0 builds no
reference, learning at tiny size, clear errors on bad input, checkpoints resume."""

import json

import lightning as L
import pytest
import torch

from lightning_llm.config import TransformerConfig
from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.data.synthetic import LetterShiftReward, TargetCharReward
from lightning_llm.modules import GRPO, RLOO
from lightning_llm.modules.reward_model import RewardModel
from lightning_llm.rlhf import group_relative_advantages, grpo_loss, rloo_advantages, sequence_kl_penalized_scores

TRAINER_KW = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
}


def _prompts(n=16, batch=4):
    dm = PromptDataModule(num_train=n, num_val=8, batch_size=batch)
    dm.setup("fit")
    return dm


def _config(dm, block_size=24):
    return TransformerConfig(vocab_size=dm.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32)


def _module(cls, dm, **kw):
    args = {
        "reward_functions": [TargetCharReward("a", 4)],
        "max_new_tokens": 4,
        "num_generations": 4,
        "log_completions_every_n_steps": 0,
    }
    args.update(kw)
    m = cls(config=_config(dm), **args)
    m.tokenizer = dm.tokenizer
    return m


def _batch(dm):
    return next(iter(dm.train_dataloader()))


class _ManualOpt:
    """Stand-in for Lightning's optimizer plumbing so `update` runs outside a Trainer."""

    def __init__(self, module, lr):
        self.opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
        module.optimizers = lambda: self.opt
        module.manual_backward = lambda loss: loss.backward()
        module.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: None


def test_letter_shift_task_exact_checker():
    reward = LetterShiftReward()
    # "cbfg>": last letter g -> h; "cbfh>": h wraps to a; partial credit = matching positions / longer length
    assert reward(["cbfg>", "cbfh>", "ab>", "ab>", "ab>"], ["h", "a", "cx", "x", ""]) == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert LetterShiftReward(shift=0, num_letters=2)(["abc>"], ["bc"]) == [1.0]
    with pytest.raises(ValueError, match="no letter"):
        reward(["123"], ["a"])
    with pytest.raises(ValueError, match="one prompt per completion"):
        reward(["ab>"], ["a", "b"])


def test_grpo_rollout_layout_rewards_and_advantages():
    dm = _prompts()
    m = _module(GRPO, dm, reward_functions=[TargetCharReward("a", 4), LetterShiftReward()], reward_weights=[1.0, 2.0])
    batch = _batch(dm)
    roll = m.rollout(batch["prompt"], batch["prompt_ids"])
    g, b = 4, len(batch["prompt"])
    assert len(roll) == b * g and roll.prompts == [p for p in batch["prompt"] for _ in range(g)]  # repeat_interleave
    for i in range(b * g):  # every row continues its own prompt
        p = batch["prompt_ids"][i // g]
        assert roll.sequences[i, roll.prompt_length - len(p) : roll.prompt_length].tolist() == p
    texts = [dm.tokenizer.decode(r[mk]) for r, mk in zip(roll.completions_ids, roll.completion_mask)]
    assert texts == roll.completions
    a = torch.tensor(TargetCharReward("a", 4)(roll.prompts, texts))
    s = torch.tensor(LetterShiftReward()(roll.prompts, texts))
    torch.testing.assert_close(roll.rewards_per_function, torch.stack([a, s], 1))
    torch.testing.assert_close(roll.rewards, a + 2 * s)
    torch.testing.assert_close(roll.advantages, group_relative_advantages(roll.rewards, g))
    assert roll.old_logprobs is None and roll.ref_logprobs is None  # mu = 1, beta = 0: neither is needed
    assert m.ref is None and not any(k.startswith("ref.") for k in m.state_dict())


@pytest.mark.parametrize("scale", ["batch", "none"])
def test_grpo_scale_rewards_option(scale):
    dm = _prompts()
    m = _module(GRPO, dm, scale_rewards=scale)
    roll = m.rollout(*_batch(dm).values())
    torch.testing.assert_close(roll.advantages, group_relative_advantages(roll.rewards, 4, scale_rewards=scale))


def test_mask_truncated_completions_clears_their_rows():
    dm = _prompts()
    m = _module(GRPO, dm, mask_truncated_completions=True, max_new_tokens=2)
    roll = m.rollout(*_batch(dm).values())
    assert (~roll.finished).any()  # a random policy rarely stops within 2 tokens
    assert not roll.loss_mask[~roll.finished].any()
    assert torch.equal(roll.loss_mask[roll.finished], roll.completion_mask[roll.finished])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_update_uses_the_loss_type_and_lowers_the_objective(loss_type):
    dm = _prompts()
    m = _module(GRPO, dm, loss_type=loss_type, beta=0.05, num_iterations=2)
    assert m.ref is not None
    _ManualOpt(m, lr=0.5)
    roll = m.rollout(*_batch(dm).values())
    assert roll.old_logprobs is not None and roll.ref_logprobs is not None

    def objective():
        with torch.no_grad():
            logp, _ = m.completion_logprobs(
                m.policy, roll.sequences, roll.attention_mask, roll.prompt_length, roll.completion_mask
            )
            return grpo_loss(
                logp,
                roll.old_logprobs,
                roll.advantages,
                roll.loss_mask,
                roll.ref_logprobs,
                0.05,
                loss_type=loss_type,
                max_completion_length=4,
            )[0]

    before = objective()
    # at the sampling policy the module's loss is the function's loss (ratio 1, KL 0 to the initial reference)
    assert float(before) == pytest.approx(float(m.loss(roll, roll.old_logprobs, roll.loss_mask.sum())[0]), abs=1e-6)
    stats = m.update(roll)
    assert float(objective()) < float(before) - 1e-3
    assert {"loss", "entropy", "kl", "clip_ratio_region"} <= stats.keys()


def test_rloo_advantages_put_the_sequence_kl_in_the_reward():
    dm = _prompts()
    m = _module(RLOO, dm, beta=0.1)
    with torch.no_grad():  # move the policy away from the reference so the KL is not 0
        for p in m.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    roll = m.rollout(*_batch(dm).values())
    penalised, kl = sequence_kl_penalized_scores(
        roll.rewards, roll.old_logprobs, roll.ref_logprobs, roll.loss_mask, 0.1
    )
    assert kl.abs().max() > 1e-3
    torch.testing.assert_close(roll.advantages, rloo_advantages(penalised, 4))
    # beta = 0: no reference, plain leave-one-out advantages
    m0 = _module(RLOO, dm, beta=0.0)
    assert m0.ref is None
    roll0 = m0.rollout(*_batch(dm).values())
    torch.testing.assert_close(roll0.advantages, rloo_advantages(roll0.rewards, 4))


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_learns_at_tiny_size(cls):
    """Reward up: the fraction of 'a' in 4-token completions, from ~0.1 (random policy) towards 1."""
    L.seed_everything(0, verbose=False)
    dm = _prompts(n=80, batch=4)
    m = _module(cls, dm, num_generations=8, learning_rate=1e-2, **({"beta": 0.0} if cls is RLOO else {}))
    rewards = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["train/reward"]))

    # every 5th step (the last one included) is a logging step: the secondary statistics are in callback_metrics then
    trainer = L.Trainer(max_epochs=1, callbacks=[Record()], log_every_n_steps=5, **TRAINER_KW)
    trainer.fit(m, datamodule=dm)
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.35 and last > first + 0.3, rewards
    logged = trainer.callback_metrics
    for key in (
        "reward",
        "reward_std",
        "rewards/target_char_a/mean",
        "rewards/target_char_a/std",
        "frac_reward_zero_std",
        "completion_length",
        "clipped_ratio",
        "entropy",
        "clip_ratio/region_mean",
    ):
        assert f"train/{key}" in logged, key


def test_bad_input_errors():
    dm = _prompts()
    with pytest.raises(ValueError, match="num_generations"):
        _module(GRPO, dm, num_generations=1)
    with pytest.raises(ValueError, match="num_generations"):
        _module(RLOO, dm, num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        _module(GRPO, dm, loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        _module(GRPO, dm, scale_rewards="global")
    with pytest.raises(ValueError, match="reward_model"):
        GRPO(config=_config(dm))
    m = _module(GRPO, dm)
    with pytest.raises(ValueError, match="exceeds the policy's context"):
        m.rollout(["x"], [[2] * 21])  # 21 + 4 new tokens > block_size 24
    batch = _batch(dm)
    m.reward_functions = [lambda prompts, completions, **kw: [0.0] * (len(completions) - 1)]
    with pytest.raises(ValueError, match="returned 15 values for 16 completions"):
        m.rollout(batch["prompt"], batch["prompt_ids"])
    m.reward_functions = [lambda prompts, completions, **kw: [float("nan")] * len(completions)]
    with pytest.raises(ValueError, match="non-finite"):
        m.rollout(batch["prompt"], batch["prompt_ids"])


def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "xyz", "rejected": "zz"}) for i in range(8)))
    prefs = PreferenceDataModule(
        dataset=str(path), tokenizer="char", val_fraction=0.25, batch_size=4, max_length=16, max_prompt_length=8
    )
    dm = _prompts()
    rm = RewardModel(config=_config(dm))
    trainer = L.Trainer(max_steps=1, **TRAINER_KW)
    trainer.fit(rm, datamodule=prefs)
    ckpt = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(ckpt)
    m = _module(GRPO, dm, reward_model=str(ckpt), reward_functions=None)
    assert m.reward_names == ["reward_model"]
    m._trainer = L.Trainer(logger=False, enable_progress_bar=False)
    m._trainer.datamodule = dm
    with pytest.raises(ValueError, match="tokenizer mismatch between policy and reward model"):
        m.setup("fit")
    small = RewardModel(config=TransformerConfig(vocab_size=8, block_size=24, n_layer=1, n_head=2, n_embd=16))
    torch.save({"state_dict": small.state_dict(), "transformer_config": small.config.to_dict()}, tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        _module(RLOO, dm, reward_model=str(tmp_path / "s.ckpt"), reward_functions=None)


def test_reward_model_scores_enter_the_reward(tmp_path):
    dm = _prompts()
    rm = RewardModel(config=_config(dm))
    rm.tokenizer = dm.tokenizer
    ckpt = tmp_path / "rm.ckpt"
    torch.save({"state_dict": rm.state_dict(), "transformer_config": rm.config.to_dict()}, ckpt)
    m = _module(GRPO, dm, reward_model=str(ckpt))
    roll = m.rollout(*_batch(dm).values())
    with torch.no_grad():
        expected = m.reward_model(roll.sequences, roll.attention_mask).float()
    torch.testing.assert_close(roll.rewards_per_function[:, 1], expected)
    torch.testing.assert_close(roll.rewards, roll.rewards_per_function.sum(1))


def test_checkpoint_resume(tmp_path):
    dm = _prompts(n=8, batch=4)
    m = _module(GRPO, dm, beta=0.02)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, **TRAINER_KW)
    trainer.fit(m, datamodule=dm)
    path = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["rollouts_done"] == 2 and "generator_state" in saved
    assert any(k.startswith("ref.") for k in saved["state_dict"])
    resumed = _module(GRPO, dm, beta=0.02)
    L.Trainer(max_epochs=2, default_root_dir=tmp_path, **TRAINER_KW).fit(resumed, datamodule=dm, ckpt_path=path)
    assert resumed.rollouts_done == 4
    for k, v in saved["state_dict"].items():
        if k.startswith("ref."):
            torch.testing.assert_close(resumed.state_dict()[k], v)  # the reference stays frozen


def test_dapo_accumulated_gradient_equals_the_whole_batch_gradient():
    """dapo divides every micro-batch by the tokens of the whole optimiser step (TRL's num_items_in_batch), so
    accumulating 4 micro-batches gives the gradient of the loss over the whole generation batch."""
    dm = _prompts()
    m = _module(GRPO, dm, loss_type="dapo", gradient_accumulation_steps=4)
    roll = m.rollout(*_batch(dm).values())
    params = [p for p in m.policy.parameters() if p.requires_grad]
    logp, _ = m.completion_logprobs(
        m.policy, roll.sequences, roll.attention_mask, roll.prompt_length, roll.completion_mask
    )
    loss, _ = grpo_loss(logp, logp.detach(), roll.advantages, roll.loss_mask, loss_type="dapo")
    expected = torch.autograd.grad(loss, params)
    captured = []

    class Capture:
        param_groups = [{"params": params}]

        def step(self):
            captured.append([p.grad.clone() for p in params])

        def zero_grad(self, set_to_none=True):
            for p in params:
                p.grad = None

    m.optimizers = lambda: Capture()
    m.manual_backward = lambda loss: loss.backward()
    m.clip_gradients = lambda *a, **k: None
    m.update(roll)
    assert len(captured) == 1
    for got, want in zip(captured[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_truncate_at_eos_equals_stopping_at_eos():
    """Under FSDP2 every rank decodes all steps and the rows are cut at their first EOS afterwards: the same
    sequences, masks and log-probs as generation that stops rows at EOS (same seed: the sampler draws every step)."""
    from lightning_llm.modules.online import truncate_at_eos
    from lightning_llm.nn.generation import generate

    dm = _prompts()
    m = _module(GRPO, dm)
    ids = [p for p in _batch(dm)["prompt_ids"] for _ in range(4)]
    kw = {"max_new_tokens": 6, "pad_id": 0}
    stop = generate(m.policy, ids, eos_id=0, generator=torch.Generator().manual_seed(3), **kw)
    full = generate(m.policy, ids, eos_id=None, generator=torch.Generator().manual_seed(3), **kw)
    assert stop.finished.any() and not stop.finished.all()
    cut = truncate_at_eos(full, 0, 0)
    n = stop.sequences.shape[1]
    assert (
        torch.equal(cut.sequences[:, :n], stop.sequences) and not cut.response_mask[:, n - stop.prompt_length :].any()
    )
    assert torch.equal(cut.response_mask[:, : n - stop.prompt_length], stop.response_mask)
    assert torch.equal(cut.finished, stop.finished)
    torch.testing.assert_close(cut.logprobs[:, : n - stop.prompt_length], stop.logprobs)


def test_compiled_generation_rollouts_equal_eager_rollouts(monkeypatch):
    """``compile_generation=True`` decodes with the compiled step (traced here with the ``aot_eager`` backend: no C++
    build; tests/nn/test_static_decoding.py runs Inductor): the same greedy rollout as eager decoding, and the same
    sampled one from the same seed (the sampler draws outside the graph, one draw per step as eagerly)."""
    import lightning_llm.nn.generation as generation

    monkeypatch.setattr(generation, "_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(generation, "_compiled_steps", {})
    dm = _prompts()
    batch = _batch(dm)
    torch.manual_seed(0)
    eager = _module(GRPO, dm, seed=5)
    torch.manual_seed(0)
    compiled = _module(GRPO, dm, seed=5, compile_generation=True)
    assert compiled.compiles_generation and not eager.compiles_generation
    assert _module(GRPO, dm, compile=True).compiles_generation  # None follows the module's `compile`
    for temperature in (0.0, None):  # greedy, then the module's temperature 1
        a = eager.rollout(batch["prompt"], batch["prompt_ids"], temperature)
        b = compiled.rollout(batch["prompt"], batch["prompt_ids"], temperature)
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.completion_mask, b.completion_mask)
        assert torch.equal(a.rewards, b.rewards)
    assert "cpu" in generation._compiled_steps and generation._compile_error is None  # the compiled path ran
    torch._dynamo.reset()


def test_compile_generation_argument_is_checked():
    with pytest.raises(ValueError, match=r"GRPO: `compile_generation` must be True, False or None"):
        _module(GRPO, _prompts(), compile_generation="yes")


def test_completion_logprobs_equal_the_full_forward():
    """Only the completion positions are projected to the vocabulary: the same log-probabilities (1e-6) and entropies
    as log-softmax over the full forward's logits."""
    from lightning_llm.ops import token_logprobs

    dm = _prompts()
    m = _module(GRPO, dm, temperature=0.7)
    roll = m.rollout(*_batch(dm).values())
    seq, p, mask = roll.sequences, roll.prompt_length, roll.completion_mask
    logp, entropy = m.completion_logprobs(m.policy, seq, roll.attention_mask, p, mask, with_entropy=True)
    logits = m.policy(seq, attention_mask=roll.attention_mask)[:, p - 1 : -1].float() / 0.7  # (B, N, V)
    expected = torch.where(mask, token_logprobs(logits, seq[:, p:]), 0.0)
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)
    probs = logits.softmax(-1)
    full_entropy = torch.where(mask, -(probs * logits.log_softmax(-1)).sum(-1), 0.0)
    torch.testing.assert_close(entropy, full_entropy, atol=1e-5, rtol=0)


def test_statistics_reach_the_logger_as_if_logged_every_step(tmp_path):
    """Secondary statistics are logged only on the Trainer's logging steps (the reward and KL every step): the CSV
    written with ``log_every_n_steps=3`` holds, at each of its steps, every statistic with the value that a run logging
    at every step (the reference: ``log_every_n_steps=1``, same seed, same training) wrote at that step."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def run(every: int) -> dict[int, dict[str, str]]:
        L.seed_everything(0, verbose=False)
        dm = _prompts(n=24, batch=4)
        m = _module(GRPO, dm)
        logger = CSVLogger(tmp_path, name=f"every{every}")
        kw = {**TRAINER_KW, "logger": logger, "log_every_n_steps": every}
        L.Trainer(max_epochs=1, **kw).fit(m, datamodule=dm)
        with open(logger.experiment.metrics_file_path) as f:
            return {int(r["step"]): {k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)}

    every_step, sparse = run(1), run(3)
    assert sorted(every_step) == list(range(6)) and sorted(sparse) == [2, 5]
    for step, row in sparse.items():
        assert row == every_step[step], step
        assert {"train/reward", "train/entropy", "train/completion_length", "train/reward_std"} <= set(row)
