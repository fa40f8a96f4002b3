"""Prompt tokens as a llama.cpp model counts them: its own tokenizer (the GGUF's vocabulary, loaded alone:
no weights) over the prompt its chat template makes of the messages. The llama-cpp-python server sends no
usage on streams; this is how a streamed request to the local model is charged the same prompt tokens as
the same request unstreamed (a bare tiktoken count misses the template: 11 tokens against 34)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from tollway.jsontypes import JSON
from tollway.routing import content_texts


class TemplateCounter:
    def __init__(self, model_path: Path) -> None:
        from llama_cpp import Llama  # only where the local model is served

        self._llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model_path.name} has no chat template")
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        model: Any = self._llm._model
        self._bos = model.token_get_text(self._llm.token_bos())
        self._eos = model.token_get_text(self._llm.token_eos())
        self._lock = threading.Lock()  # llama.cpp's tokenizer is not for concurrent use

    def __call__(self, messages: Sequence[JSON]) -> int:
        plain = [{"role": str(m.get("role", "user")), "content": "\n".join(content_texts(m.get("content")))}
                 for m in messages]
        prompt = self._template.render(messages=plain, add_generation_prompt=True, bos_token=self._bos,
                                       eos_token=self._eos)
        with self._lock:
            return len(self._llm.tokenize(prompt.encode(), add_bos=False, special=True))
