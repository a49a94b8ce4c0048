"""The mini bank: a tiny Mistral base model and one LoRA per task of a synthetic suite, built on a
CPU (``python -m loramix.minibank build``); the built default bank ships in
``loramix/minibank/shipped``."""
from __future__ import annotations

from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "shipped"

__all__ = ["DEFAULT_DIR"]
