"""Review clustering for the LLM-free persona backend: pure numpy, deterministic per item.

An item's review embeddings (L2-normalised) are grouped by spherical k-means for every k from 1 to
`max_k`; the k with the best mean silhouette wins when that silhouette reaches `min_silhouette`,
otherwise the item has one persona. Clusters smaller than `min_size` are merged into the nearest
larger one, so a persona is a recurring voice, not one review. Small but real minorities
(≥ min_size reviews that sit apart) stay separate personas, as the method asks.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"[a-z][a-z'-]{2,}")
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further get got had hadn't has hasn't have haven't having he her here hers herself him himself
his how i if in into is isn't it it's its itself just let's like me more most much mustn't my myself no nor
not now of off on once one only or other ought our ours ourselves out over own really same she should
shouldn't so some such than that that's the their theirs them themselves then there these they this those
through to too under until up use used using very was wasn't we well were weren't what when where which while
who whom why will with won't would wouldn't you your yours yourself yourselves great good product item bought
buy these this would will one two get got just even still also much many well really thing things lot bit
""".split())


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine), k-means++ seeding. Returns (labels, unit centroids)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d = 1.0 - np.max(x @ np.stack(centres).T, axis=1)
        p = np.clip(d, 0, None)
        centres.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        new = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            members = x[new == j]
            if len(members):
                m = members.sum(axis=0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, c


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance; 0 for a single cluster."""
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    dist = 1.0 - x @ x.T
    a = np.zeros(len(x))
    b = np.full(len(x), np.inf)
    for k in ks:
        m = labels == k
        mean_to_k = dist[:, m].sum(axis=1) / np.maximum(m.sum() - m.astype(int), 1)
        a = np.where(m, mean_to_k, a)
        b = np.where(m, b, np.minimum(b, dist[:, m].mean(axis=1)))
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    single = np.array([np.sum(labels == labels[i]) == 1 for i in range(len(x))])
    return float(np.where(single, 0.0, s).mean())


def merge_small(x: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Fold clusters under min_size into the nearest cluster that is big enough; relabel 0..k-1
    by size (largest first, ties by first member) so labels are stable."""
    labels = labels.copy()
    while True:
        sizes = Counter(labels.tolist())
        small = [k for k, s in sizes.items() if s < min_size]
        big = [k for k, s in sizes.items() if s >= min_size]
        if not small or not big:
            break
        cent = {k: x[labels == k].mean(axis=0) for k in sizes}
        k = min(small, key=lambda j: (sizes[j], j))
        target = max(big, key=lambda j: float(cent[k] @ cent[j]))
        labels[labels == k] = target
    order = sorted(set(labels.tolist()), key=lambda j: (-int(np.sum(labels == j)), int(np.argmax(labels == j))))
    remap = {old: new for new, old in enumerate(order)}
    return np.array([remap[v] for v in labels.tolist()], dtype=np.int64)


def choose_clusters(x: np.ndarray, max_k: int, min_size: int, min_silhouette: float, seed: int) -> np.ndarray:
    """Labels 0..k-1 for the rows of x, k chosen from the data (see module doc)."""
    n = len(x)
    best, best_s = np.zeros(n, dtype=np.int64), min_silhouette
    for k in range(2, min(max_k, n // max(min_size, 1)) + 1):
        labels, _ = kmeans(x, k, seed + k)
        labels = merge_small(x, labels, min_size)
        if len(np.unique(labels)) < 2:
            continue
        s = silhouette(x, labels)
        if s > best_s + 1e-9:
            best, best_s = labels, s
    return merge_small(x, best, min_size)


def keywords(texts: list[str], background: list[str], n: int = 3) -> list[str]:
    """The n words most typical of `texts` relative to `background` (tf × idf over background)."""
    docs = [set(_WORD.findall(t.lower())) - STOPWORDS for t in background]
    df = Counter(w for d in docs for w in d)
    tf = Counter(w for t in texts for w in _WORD.findall(t.lower()) if w not in STOPWORDS)
    total = max(len(docs), 1)
    score = {w: c * np.log((1 + total) / (1 + df.get(w, 0))) + 1e-3 * c for w, c in tf.items()}
    out: list[str] = []
    for w, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0])):
        if all(w.rstrip("s") != o.rstrip("s") for o in out):  # "magazine" and "magazines" once
            out.append(w)
        if len(out) == n:
            break
    return out


def first_sentences(text: str, max_chars: int) -> str:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    out = ""
    for p in parts:
        if out and len(out) + 1 + len(p) > max_chars:
            break
        out = f"{out} {p}".strip()
    return out[:max_chars].rstrip()
