"""Shared setup of the callback tests: a quiet CPU trainer writing under the test's ``tmp_path``."""

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., L.Trainer]:
    """``make_trainer(callbacks, steps=4, **kw)``: a CPU ``L.Trainer`` with no logger, checkpoints, progress bar,
    model summary or sanity validation; ``kw`` adds Trainer arguments or overrides these defaults."""

    def build(callbacks: list[L.Callback], steps: int = 4, **kw: Any) -> L.Trainer:
        defaults: dict[str, Any] = {
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "default_root_dir": tmp_path,
            "num_sanity_val_steps": 0,
        }
        return L.Trainer(max_steps=steps, callbacks=callbacks, **{**defaults, **kw})

    return build
