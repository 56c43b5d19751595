"""Sentence embeddings through sentence-transformers: normalized, batched, with progress."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.models import resolve_embedder

log = logging.getLogger("pipeline.embedder")


class Embedder:
    def __init__(self, name: str = "embedded", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_embedder(name), device="cpu")
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, unit length, so inner product is cosine similarity."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size,
                                    show_progress_bar=progress, normalize_embeddings=True,
                                    convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)

    def encode_query(self, query: str) -> np.ndarray:
        """(1, dim). A query longer than the model's window is truncated, with a note."""
        n_tokens = len(self.tokenizer(query, add_special_tokens=True)["input_ids"])
        if n_tokens > self.max_tokens:
            log.info("query has %d tokens; the embedder reads the first %d", n_tokens,
                     self.max_tokens)
        return self.encode([query])
