"""Training: staged Thinker / Talker training on ChatML JSONL data (see ``loop.train``).

CLI entry points for ``omnistream train``: ``add_train_args(parser)`` and ``run_train(args)``.
"""

from omnistream.train.cli import add_train_args, run_train

__all__ = ["add_train_args", "run_train"]
