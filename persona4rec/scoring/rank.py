"""Eq. 10 of the paper, vectorised: score(u, i) = max over i's personas p of cos(u, p).

Persona embeddings are L2-normalised and packed per item into a padded tensor
(items × max_personas × d) with a mask, so a batch of (user, candidate) rows is scored with one
gather and one batched matrix product — no exploding of users × candidates × personas into rows.
Everything here works on whole batches of users held as flat arrays plus per-user counts (the
layout Arrow list columns have), so no Python loop runs per user or per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PersonaMatrix:
    item_index: dict[str, int]  # item_id → row
    vectors: np.ndarray  # (items, max_personas, d) float32, zero-padded
    mask: np.ndarray  # (items, max_personas) bool, True where a persona exists
    slots: np.ndarray  # (items, max_personas) int64: input position of the persona, -1 where padded

    @staticmethod
    def build(item_ids, vectors, dtype: str = "float32") -> "PersonaMatrix":
        """From parallel sequences (one entry per persona; vectors L2-normalised); `slots` maps
        each cell back to its position in those sequences. dtype float16 halves the tensor
        (scores are computed in float32 and agree within 1e-3)."""
        order: dict[str, list[int]] = {}
        for n, item in enumerate(item_ids):
            order.setdefault(item, []).append(n)
        items = sorted(order)
        width = max((len(v) for v in order.values()), default=1)
        d = len(vectors[0]) if len(vectors) else 0
        vec = np.zeros((len(items), width, d), dtype=dtype)
        mask = np.zeros((len(items), width), dtype=bool)
        slots = np.full((len(items), width), -1, dtype=np.int64)
        for r, item in enumerate(items):
            for c, n in enumerate(order[item]):
                vec[r, c] = vectors[n]
                mask[r, c] = True
                slots[r, c] = n
        return PersonaMatrix({item: r for r, item in enumerate(items)}, vec, mask, slots)


GROUP_MIN = 4  # candidates of one item from which one matrix product beats gathering per candidate


def max_sim(users: np.ndarray, rows: np.ndarray, pm: PersonaMatrix, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """users: (n, d) user vectors; rows: (n,) PersonaMatrix rows of the candidate items.
    Returns (score (n,), index of the best persona (n,)).

    The candidates of an item that recurs (popular items are candidates of many users) are scored
    by one product users (m, d) × personas (width, d)ᵀ: the item's persona vectors are read once,
    not copied once per candidate — 3.5× faster on a Zipf-distributed candidate set, as fast where
    every item is rare (benchmarked on 200k candidates, dim 1024). The rest are gathered in chunks."""
    n = len(rows)
    sims = np.empty((n, pm.vectors.shape[1]), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    by_row = rows[order]
    starts = np.flatnonzero(np.concatenate([[True], by_row[1:] != by_row[:-1]])) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.concatenate([starts, [n]]))
    grouped = sizes >= GROUP_MIN
    for a, m in zip(starts[grouped], sizes[grouped]):
        idx = order[a:a + m]
        sims[idx] = users[idx] @ np.asarray(pm.vectors[by_row[a]], dtype=np.float32).T
    rest = order[np.repeat(~grouped, sizes)]
    for s in range(0, len(rest), chunk):
        c = rest[s:s + chunk]
        sims[c] = np.matmul(pm.vectors[rows[c]], users[c, :, None])[:, :, 0]
    sims = np.where(pm.mask[rows], sims, -np.inf)
    best = sims.argmax(axis=1)
    return sims[np.arange(n), best], best


def segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For per-owner counts of a flat array: (owner of each element, its position within the owner,
    start offset of each owner)."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(int(counts.sum())) - starts[owner], starts


def decayed_user_vectors(flat: np.ndarray, counts: np.ndarray, gamma: float) -> np.ndarray:
    """(n, d) L2-normalised γ-decayed weighted means of each user's history rows (oldest first,
    newest weight 1) — `training.encoder.user_vector` for a whole batch; zero rows for empty ones."""
    n, d = len(counts), flat.shape[1] if flat.ndim == 2 else 0
    out = np.zeros((n, d), dtype=np.float32)
    if len(flat) == 0:
        return out
    owner, pos, starts = segments(counts)
    weights = gamma ** (counts[owner] - 1 - pos).astype(np.float64)
    nonempty = counts > 0
    sums = np.add.reduceat(flat.astype(np.float64) * weights[:, None], starts[nonempty], axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    out[nonempty] = np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), sums)
    return out


def standardise_rows(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-user z-scores over the valid cells of each row of a padded (users × candidates) matrix;
    a constant row becomes zeros (no signal, no NaN); invalid cells come back as 0."""
    cnt = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    xv = np.where(valid, x, 0.0)
    mean = xv.sum(axis=1, keepdims=True) / cnt
    sd = np.sqrt((np.where(valid, x - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / cnt)
    z = np.where(sd < 1e-12, 0.0, (x - mean) / np.where(sd < 1e-12, 1.0, sd))
    return np.where(valid, z, 0.0)


def blend_rows(persona: np.ndarray, cf: np.ndarray, valid: np.ndarray, alpha: float) -> np.ndarray:
    """final = α·z(persona) + (1−α)·z(cf) per row; α = 1 is the paper's pure persona rerank."""
    if alpha >= 1.0:
        return persona.astype(np.float64)
    return alpha * standardise_rows(persona.astype(np.float64), valid) + (1 - alpha) * standardise_rows(
        cf.astype(np.float64), valid)


def pad(values: np.ndarray, owner: np.ndarray, pos: np.ndarray, shape: tuple[int, int], fill) -> np.ndarray:
    out = np.full(shape, fill, dtype=np.result_type(values.dtype, np.asarray(fill).dtype))
    out[owner, pos] = values
    return out
