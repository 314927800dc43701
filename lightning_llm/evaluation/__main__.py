"""``python -m lightning_llm.evaluation ARGS``: an alias of ``lightning-llm evaluate ARGS``."""

import sys

if __name__ == "__main__":
    from lightning_llm.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
