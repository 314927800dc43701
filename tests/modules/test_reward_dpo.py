"""RewardModel and DPO modules against naive recomputations of their formulas."""

import math
import os

import lightning as L
import pytest
import torch

from lightning_llm.callbacks.learning_curves import LearningCurves
from lightning_llm.config import TransformerConfig
from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.modules.dpo import DPO
from lightning_llm.modules.reward_model import RewardModel


@pytest.fixture
def prefs():
    dm = PreferenceDataModule(num_train=48, num_val=16, batch_size=8, max_length=24, max_prompt_length=12)
    dm.setup("fit")
    return dm


def _cfg(dm):
    return TransformerConfig(vocab_size=dm.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16)


def _batch(dm):
    return next(iter(dm.val_dataloader()))


def test_reward_model_loss_and_accuracy_match_naive(prefs):
    rm = RewardModel(config=_cfg(prefs)).eval()
    batch = _batch(prefs)
    loss, acc, _ = rm._loss(batch)
    # naive: score every sequence alone, unpadded, at its last token; -log(1 / (1 + exp(-(rc - rr - m))))
    rc, rr = [], []
    for key, out in (("chosen", rc), ("rejected", rr)):
        for ids, mask in zip(batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"]):
            real = ids[mask.bool()][None]
            hidden = rm.backbone(real, return_hidden=True)
            out.append(float(rm.head.proj(hidden[0, -1]).detach()))
    losses = [-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip(rc, rr, batch["margin"].tolist())]
    assert float(loss) == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert float(acc) == pytest.approx(sum(c > r for c, r in zip(rc, rr)) / len(rc))


def test_reward_model_fit_checkpoint_and_curves(prefs, tmp_path):
    rm = RewardModel(config=_cfg(prefs), learning_rate=3e-3, warmup_steps=0)
    trainer = L.Trainer(
        max_steps=4,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="rm"),
        log_every_n_steps=1,
        callbacks=[LearningCurves()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    trainer.fit(rm, datamodule=prefs)
    assert os.path.isfile(os.path.join(trainer.log_dir, "learning_curves.png"))
    path = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(path)
    loaded = RewardModel.from_checkpoint(str(path))
    batch = _batch(prefs)
    rm.eval()
    torch.testing.assert_close(
        loaded(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
        rm(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
    )
    assert loaded.tokenizer.fingerprint == prefs.tokenizer.fingerprint
    assert not any(p.requires_grad for p in loaded.parameters())


def _naive_completion_logp(model, ids, attn, loss_mask):
    """Sum over completion tokens t of log softmax(model(ids[:t]))[ids[t]], one prefix at a time."""
    real = ids[attn.bool()]
    comp = loss_mask[attn.bool()].bool()
    total = 0.0
    for t in range(1, len(real)):
        if comp[t]:
            logits = model(real[None, :t])[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[real[t]])
    return total


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_formula(prefs, loss_type):
    beta = 0.5
    dpo = DPO(config=_cfg(prefs), beta=beta, loss_type=loss_type)
    with torch.no_grad():  # move the policy away from the reference
        for p in dpo.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dpo.eval()
    batch = {k: v[:4] for k, v in _batch(prefs).items()}
    loss, stats = dpo._step(batch, "val")
    expected, acc = [], []
    for i in range(4):
        lp = {}
        for key in ("chosen", "rejected"):
            args = (batch[f"{key}_input_ids"][i], batch[f"{key}_attention_mask"][i], batch[f"{key}_loss_mask"][i])
            lp[key] = (
                _naive_completion_logp(dpo.policy, *args),
                _naive_completion_logp(dpo.ref, *args),
                int(batch[f"{key}_loss_mask"][i].sum()),
            )
        (pc, rc, nc), (pr, rr, nr) = lp["chosen"], lp["rejected"]
        if loss_type == "sigmoid":  # -log sigmoid(beta * ((pc - rc) - (pr - rr)))
            h = (pc - rc) - (pr - rr)
            expected.append(math.log1p(math.exp(-beta * h)))
        else:  # IPO on length-averaged log-ratios: (h - 1 / (2 beta))^2
            h = (pc - rc) / nc - (pr - rr) / nr
            expected.append((h - 1 / (2 * beta)) ** 2)
        acc.append(float(beta * (pc - rc) > beta * (pr - rr)))
    assert float(loss) == pytest.approx(sum(expected) / 4, rel=1e-4)
    assert float(stats["accuracy"]) == pytest.approx(sum(acc) / 4)


def test_dpo_at_init_is_log2_and_cache_matches(prefs):
    dpo = DPO(config=_cfg(prefs), precompute_ref_logprobs=True).eval()
    batch = _batch(prefs)
    loss, _ = dpo._step(batch, "val")
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference -> -log sigmoid(0)
    on_the_fly = dpo._ref_logps(batch, "val")
    dpo.precompute_reference(prefs)
    cached = dpo._ref_logps(batch, "val")
    torch.testing.assert_close(cached[0], on_the_fly[0].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached[1], on_the_fly[1].float(), rtol=1e-5, atol=1e-4)


def _tiny(vocab_size: int = 16) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8)


def test_dpo_bad_arguments():
    with pytest.raises(ValueError, match="unknown `loss_type` 'dpo'"):
        DPO(config=_tiny(), loss_type="dpo")
    with pytest.raises(ValueError, match="unknown `loss_type` 'kto'"):
        DPO(config=_tiny(), loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="`loss_weights` must have one weight per loss type: 2"):
        DPO(config=_tiny(), loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="`label_smoothing`=0.1 is read only by"):
        DPO(config=_tiny(), loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="exo_pair"):
        DPO(config=_tiny(), loss_type="exo_pair")
    with pytest.raises(ValueError, match="f_divergence_type"):
        DPO(config=_tiny(), loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="beta"):
        DPO(config=_tiny(), beta=0.0)
    with pytest.raises(TypeError, match="ref_model"):
        DPO(config=_tiny(), ref_model=3)


def _save_ckpt(module: DPO, path) -> str:
    """A DPO checkpoint as fitting writes one (state_dict + transformer_config + tokenizer entries)."""
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def test_dpo_separate_reference_from_checkpoint(prefs, tmp_path):
    """``ref_model``: our checkpoint loaded with load_pretrained; the loss uses it (independent recomputation)."""
    torch.manual_seed(0)
    other = DPO(config=_cfg(prefs))
    other.tokenizer = prefs.tokenizer
    path = _save_ckpt(other, tmp_path / "ref.ckpt")
    torch.manual_seed(1)
    dpo = DPO(config=_cfg(prefs), ref_model=path).eval()
    for a, b in zip(dpo.ref.parameters(), other.policy.parameters()):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in dpo.ref.parameters())
    batch = {k: v[:4] for k, v in _batch(prefs).items()}
    loss, _ = dpo._step(batch, "val")
    pc, pr = dpo._logps(dpo.policy, batch)
    rc, rr = dpo._logps(other.policy.eval(), batch)
    expected = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(loss) - math.log(2)) > 1e-4  # a different reference than the policy


def test_dpo_reference_with_other_vocabulary_or_tokenizer_is_refused(prefs, tmp_path):
    from lightning_llm.data.synthetic import char_tokenizer

    bigger = DPO(
        config=TransformerConfig(vocab_size=prefs.vocab_size + 3, block_size=24, n_layer=2, n_head=2, n_embd=16)
    )
    with pytest.raises(ValueError, match="vocab_size=.* but the policy has"):
        DPO(config=_cfg(prefs), ref_model=_save_ckpt(bigger, tmp_path / "big.ckpt"))
    # same vocabulary size, different tokenizer (other characters): refused when the data module's tokenizer is taken
    same_size = DPO(config=_cfg(prefs))
    same_size.tokenizer = char_tokenizer(chars="".join(chr(ord("A") + i) for i in range(prefs.vocab_size - 2)))
    assert same_size.tokenizer.vocab_size == prefs.vocab_size
    dpo = DPO(config=_cfg(prefs), ref_model=_save_ckpt(same_size, tmp_path / "other_tok.ckpt"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.datamodule = prefs
    dpo.trainer = trainer
    with pytest.raises(ValueError, match="different tokenizer than the data module"):
        dpo.setup("fit")
