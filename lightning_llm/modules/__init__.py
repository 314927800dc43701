"""LightningModules: thin glue over ``lightning_llm.nn`` and ``lightning_llm.rlhf``."""

from lightning_llm.modules.causal_lm import CausalLM
from lightning_llm.modules.dpo import DPO
from lightning_llm.modules.grpo import GRPO, RLOO
from lightning_llm.modules.ppo import PPO
from lightning_llm.modules.reward_model import RewardModel
from lightning_llm.modules.sft import SFT

__all__ = ["CausalLM", "DPO", "GRPO", "PPO", "RLOO", "RewardModel", "SFT"]
