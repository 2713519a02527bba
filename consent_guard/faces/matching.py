"""Matching faces against stored embeddings: one matrix product, then a max per identity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Match:
    identity: str  # registry id, never the display name
    scope: str  # "explicit" or "any"
    similarity: float  # cosine, max over the identity's stored photos


class Gallery:
    """Every stored embedding of one embedder, laid out for fast matching.

    `vectors` (N x dim, unit rows) must have each identity's rows adjacent (the registry
    returns them so); `owners[i]` is the index in `identities` of row i. Memory: N x dim x 4
    bytes for the matrix plus 8 bytes per row for the owner index.
    """

    def __init__(self, model_id: str, vectors: np.ndarray, owners: np.ndarray,
                 identities: Sequence[Tuple[str, str]]):
        self.model_id = model_id
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        owners = np.asarray(owners, dtype=np.int64)
        if len(owners) and np.any(np.diff(owners) < 0):  # keep each identity's rows together
            order = np.argsort(owners, kind="stable")
            self.vectors, owners = self.vectors[order], owners[order]
        self.identities = tuple(identities)
        # start row of each identity that has rows, for np.maximum.reduceat
        self._starts = np.flatnonzero(np.r_[True, np.diff(owners) != 0]) if len(owners) else \
            np.zeros(0, np.int64)
        self._start_owner = owners[self._starts] if len(owners) else np.zeros(0, np.int64)

    @classmethod
    def from_registry(cls, emb) -> "Gallery":
        return cls(emb.model_id, emb.vectors, emb.owners, emb.identities)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + 8 * len(self.vectors)

    def best(self, queries: np.ndarray) -> List[Optional[Match]]:
        """For each query (unit row), the identity it is most similar to and the similarity
        (max over that identity's rows); None when the gallery is empty."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if not len(self.vectors) or not len(queries):
            return [None] * len(queries)
        sims = self.vectors @ queries.T  # (N, F)
        per_identity = np.maximum.reduceat(sims, self._starts, axis=0)  # (I, F)
        top = per_identity.argmax(axis=0)
        out = []
        for f, k in enumerate(top):
            ident, scope = self.identities[self._start_owner[k]]
            out.append(Match(ident, scope, float(per_identity[k, f])))
        return out

    def match(self, queries: np.ndarray, threshold: float) -> List[Optional[Match]]:
        """As `best`, keeping only similarities at or above `threshold`."""
        return [m if m is not None and m.similarity >= threshold else None
                for m in self.best(queries)]
