"""Eq. 10 of the paper, vectorised: score(u, i) = max over i's personas p of cos(u, p).

Persona embeddings are L2-normalised and packed per item into a padded tensor
(items × max_personas × d) with a mask, so a batch of (user, candidate) rows is scored with one
gather and one batched dot product — no exploding of users × candidates × personas into rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PersonaMatrix:
    item_index: dict[str, int]  # item_id → row
    vectors: np.ndarray  # (items, max_personas, d) float32, zero-padded
    mask: np.ndarray  # (items, max_personas) bool, True where a persona exists
    persona_ids: np.ndarray  # (items, max_personas) object, None where padded

    @staticmethod
    def build(item_ids, persona_ids, vectors) -> "PersonaMatrix":
        """From parallel sequences (one entry per persona; vectors L2-normalised)."""
        order: dict[str, list[int]] = {}
        for n, item in enumerate(item_ids):
            order.setdefault(item, []).append(n)
        items = sorted(order)
        width = max((len(v) for v in order.values()), default=1)
        d = len(vectors[0]) if len(vectors) else 0
        vec = np.zeros((len(items), width, d), dtype=np.float32)
        mask = np.zeros((len(items), width), dtype=bool)
        pids = np.full((len(items), width), None, dtype=object)
        for r, item in enumerate(items):
            for c, n in enumerate(order[item]):
                vec[r, c] = vectors[n]
                mask[r, c] = True
                pids[r, c] = persona_ids[n]
        return PersonaMatrix({item: r for r, item in enumerate(items)}, vec, mask, pids)


def max_sim(users: np.ndarray, rows: np.ndarray, pm: PersonaMatrix, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """users: (n, d) user vectors; rows: (n,) PersonaMatrix rows of the candidate items.
    Returns (score (n,), index of the best persona (n,))."""
    scores = np.empty(len(rows), dtype=np.float32)
    best = np.empty(len(rows), dtype=np.int64)
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        sims = np.einsum("nd,npd->np", users[s:s + chunk], pm.vectors[r])
        sims = np.where(pm.mask[r], sims, -np.inf)
        best[s:s + chunk] = sims.argmax(axis=1)
        scores[s:s + chunk] = sims[np.arange(len(r)), best[s:s + chunk]]
    return scores, best


def standardise(x: np.ndarray) -> np.ndarray:
    """Per-user z-scores; a constant vector becomes zeros (no signal, no NaN)."""
    sd = x.std()
    return np.zeros_like(x) if sd < 1e-12 else (x - x.mean()) / sd


def blend(persona: np.ndarray, cf: np.ndarray, alpha: float) -> np.ndarray:
    """final = α·z(persona) + (1−α)·z(cf); α = 1 is the paper's pure persona rerank."""
    if alpha >= 1.0:
        return persona.astype(np.float64)
    return alpha * standardise(persona.astype(np.float64)) + (1 - alpha) * standardise(cf.astype(np.float64))
