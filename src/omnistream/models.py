"""Which model ``generate``, ``chat`` and ``serve`` use when ``--model`` is not given.

One rule, the same from any working directory:

1. ``$OMNISTREAM_MODEL`` (a checkpoint directory or hub id) when set;
2. else the repository's trained default, ``models/omni-mini``, when it exists;
3. else the repository's ``tiny/`` (random weights, made by ``make demo`` or
   ``omnistream make-tiny tiny``).

The repository is found from this file's location (``src/omnistream/models.py``), so a source
checkout works from any directory; an installed package has no repository and needs 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from omnistream.checkpoint import CheckpointError

ENV_VAR = "OMNISTREAM_MODEL"
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"  # file make-tiny leaves in a checkpoint it writes
_ROOT = Path(__file__).resolve().parents[2]
REPO_ROOT: Path | None = _ROOT if (_ROOT / "pyproject.toml").is_file() else None


def default_model_candidates() -> list[Path]:
    """The repository's default model directories, in order of preference."""
    if REPO_ROOT is None:
        return []
    return [REPO_ROOT / "models" / "omni-mini", REPO_ROOT / "tiny"]


def default_model() -> str:
    """The model to load when none is named (see the module docstring); raises
    ``CheckpointError`` saying how to make one when there is none."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    for d in default_model_candidates():
        if (d / "config.json").is_file():
            return str(d)
    tiny = REPO_ROOT / "tiny" if REPO_ROOT is not None else Path("DIR")
    raise CheckpointError(
        f"no model given and no default model found: pass --model DIR (a checkpoint directory "
        f"or hub id), set {ENV_VAR}, or make the tiny random one with "
        f"`omnistream make-tiny {tiny}`" + (" (or `make demo`)" if REPO_ROOT else "")
    )


def resolve_model(model: str | os.PathLike | None) -> str:
    """``model`` as given, or the default one when it is None or empty."""
    return str(model) if model else default_model()


def resolve_codec_model(model: str | os.PathLike | None) -> str:
    """The checkpoint whose codec ``omnistream codec`` uses: ``model`` as given, else the
    repository's ``models/codec`` (the shipped speech codec), else the default model."""
    if model:
        return str(model)
    shipped = REPO_ROOT / "models" / "codec" if REPO_ROOT is not None else None
    if shipped is not None and (shipped / "config.json").is_file() and not os.environ.get(ENV_VAR):
        return str(shipped)
    return default_model()
