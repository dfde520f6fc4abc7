"""omnistream: Qwen2.5-Omni from scratch, streaming text and speech."""

__version__ = "0.1.0"
