"""lm-evaluation-harness's own command line, with our models as ``--model lightning_llm``.

    python -m lightning_llm.evaluation.harness_cli --model lightning_llm \\
        --model_args pretrained=logs/checkpoints/last.ckpt,dtype=bfloat16 \\
        --tasks lambada_openai,arc_easy --batch_size 32 --output_path results/

Every flag is the harness's (``lm_eval --help``: ``--num_fewshot``, ``--limit``, ``--apply_chat_template``,
``--fewshot_as_multiturn``, ``--log_samples``, ``--use_cache``, ``--include_path``...); this module only registers
:class:`~lightning_llm.evaluation.HarnessLM` (whose arguments ``--model_args`` sets) before handing the command line
to ``lm_eval``'s entry point: the ``lm_eval`` executable cannot see models that are not part of lm-eval itself. Under
``torchrun`` the ranks shard the requests (see :mod:`lightning_llm.evaluation.harness`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lm_eval`` with ``argv`` (default: this process's arguments) and ``--model lightning_llm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    import lightning_llm.evaluation.harness  # noqa: F401 - registers HarnessLM as "lightning_llm"

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
