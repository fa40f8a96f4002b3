"""The tiktoken encoding every token count in Tollway uses (cl100k_base), and ``count_text``.

tiktoken normally downloads its encodings; litellm's wheel ships the cl100k_base file in tiktoken's cache layout,
so the cache directory is pointed there and nothing is fetched. A leaf module (tiktoken only): what imports it
pays for nothing else (``tollway.routing`` re-exports both).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

import tiktoken


def _point_cache_at_litellm() -> None:
    if "TIKTOKEN_CACHE_DIR" in os.environ or "DATA_GYM_CACHE_DIR" in os.environ:
        return
    spec = importlib.util.find_spec("litellm")
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
        if folder.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)


@cache
def encoding() -> tiktoken.Encoding:
    _point_cache_at_litellm()
    return tiktoken.get_encoding("cl100k_base")


def count_text(text: str) -> int:
    return len(encoding().encode_ordinary(text)) if text else 0
