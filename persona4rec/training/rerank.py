"""The rerank objective (`train.objective: rerank`): train the encoder for the ranking it serves.

Scoring ranks a user's candidates from the CF generator by the max over each item's personas of
cos(user, persona). The paper's objective (trainer.py) asks instead which persona the LLM judge
aligned, against in-batch personas of random items; that teaches "which item", not "which of the
generator's candidates", and with review-cluster personas it mostly learns cluster size. Here:

* Encoder: the frozen base encoder followed by a linear head W (d × d, initialised to the
  identity) and L2-normalisation — registered as one sentence-transformers model (Dense +
  Normalize appended), so every embedding the index, evaluation and scoring compute passes the
  head with no code of theirs changed. e = normalize(W · base(text)).
* User vector u: normalize(Σ_j w_j e_j) over the user's last k interaction texts before the
  positive (w_j = γ^age, newest 1) — what scoring computes.
* Persona vector p: normalize(mean of e over its member texts) (`scoring.personas`: the
  interactions it explains, or its own text) — what the index computes.
* Item score s(u, i) = τ_p · logsumexp_p(cos(u, p) / τ_p) over i's personas (`persona_pool:
  logsumexp`, a smooth max: → max as τ_p → 0) or the max itself.
* Loss, per example b with positive item i_b (the user's next item): the cross-entropy of
  s(u_b, i_b)/τ against s(u_b, n)/τ for n in N_b = the generator's top candidates for the user
  (`hard_negatives`, minus the items the user is known to have) ∪ the other examples' positives
  (`in_batch_negatives`), minus the user's known items. Shapes: U (B, d); the batch's
  items I (m) with personas P (q, d) padded to (m, w); S = U Pᵀ (B, q) → (B, m, w) → pooled (B, m);
  logits masked to N_b ∪ {i_b}. (Listwise training over the first stage's own candidates: LCE,
  Gao et al. 2021.)
* Auxiliary term (`alignment_weight` λ > 0): + λ · the cross-entropy, over the positive item's
  personas, of the persona aligned to that interaction (the LLM judge's, or the review cluster's:
  `alignment_pairs`) — the paper's signal in the serving geometry, for items with two or more
  personas. Shapes: U (B', d), the item's personas (B', w) → cos / τ.
* Selection: after every epoch the validation lists (training/lists.py) are reranked — NDCG@10 of
  the pure rerank and of the blend at each α — and the head with the best mean pure NDCG@10 over
  the generators is kept (epoch 0 = the un-tuned encoder: training that does not help is not kept).

The base embeddings of every text are computed once (no gradient through the transformer), so a
step costs a few matrix products: minutes on a CPU for the shared sets' tens of thousands of
interactions, where LoRA steps through the transformer took as long for a few hundred pairs.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from persona4rec.config import TrainSettings
from persona4rec.scoring.rank import blend_rows
from persona4rec.training.lists import Catalog, Lists, RerankData, Validation

log = logging.getLogger(__name__)
NDCG_K = 10


def ranges(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For CSR `ptr` and selected `rows`: (positions of their values, owner = index into rows)."""
    starts, counts = ptr[rows], ptr[rows + 1] - ptr[rows]
    owner = np.repeat(np.arange(len(rows)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + offset, owner


def mapped(E: torch.Tensor, W: torch.Tensor | None, tids: np.ndarray) -> torch.Tensor:
    """normalize(W · e) for the texts `tids` (E holds L2-normalised base embeddings)."""
    x = E[torch.as_tensor(tids, dtype=torch.long)]
    return x if W is None else F.normalize(x @ W.T, dim=-1)


def persona_block(E: torch.Tensor, W: torch.Tensor | None, catalog: Catalog,
                  items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Persona vectors of `items` (item rows): (P (q, d), pad (m, w) into P, mask (m, w))."""
    p_rows, p_owner = ranges(catalog.persona_ptr, items)
    m_pos, m_owner = ranges(catalog.member_ptr, p_rows)
    vec = mapped(E, W, catalog.member_tid[m_pos])
    sums = torch.zeros(len(p_rows), E.shape[1], dtype=vec.dtype).index_add(0, torch.as_tensor(m_owner), vec)
    P = F.normalize(sums, dim=-1)
    counts = np.bincount(p_owner, minlength=len(items))
    width = max(int(counts.max(initial=0)), 1)
    pos = np.arange(len(p_rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    pad = np.zeros((len(items), width), dtype=np.int64)
    mask = np.zeros((len(items), width), dtype=bool)
    pad[p_owner, pos] = np.arange(len(p_rows))
    mask[p_owner, pos] = True
    return P, torch.as_tensor(pad), torch.as_tensor(mask)


def user_block(E: torch.Tensor, W: torch.Tensor | None, history: Lists, rows: np.ndarray, gamma: float) -> torch.Tensor:
    """(len(rows), d) user vectors: normalize(Σ γ^age · e) over each row's history (oldest first)."""
    pos, owner = ranges(history.ptr, rows)
    counts = (history.ptr[rows + 1] - history.ptr[rows])
    age = np.repeat(np.cumsum(counts), counts) - 1 - np.arange(len(pos))
    w = torch.as_tensor(gamma ** age.astype(np.float64), dtype=E.dtype)
    vec = mapped(E, W, history.values[pos]) * w[:, None]
    return F.normalize(torch.zeros(len(rows), E.shape[1], dtype=E.dtype).index_add(0, torch.as_tensor(owner), vec),
                       dim=-1)


def item_scores(U: torch.Tensor, P: torch.Tensor, pad: torch.Tensor, mask: torch.Tensor, pool: str,
                tau_p: float) -> torch.Tensor:
    """(B, m): each item's score for each user, pooled over its personas (max or smooth max)."""
    sims = (U @ P.T)[:, pad].masked_fill(~mask[None], float("-inf"))
    if pool == "max":
        return sims.max(dim=2).values
    return tau_p * torch.logsumexp(sims / tau_p, dim=2)


def batch_loss(E: torch.Tensor, W: torch.Tensor, data: RerankData, rows: np.ndarray, s: TrainSettings,
               gamma: float, owned: np.ndarray | None = None) -> torch.Tensor:
    """The listwise loss of the examples `rows`; `owned` = `Examples.owned_keys` (computed once)."""
    ex = data.train
    neg_pos, neg_owner = ranges(ex.negatives.ptr, rows)
    negatives = ex.negatives.values[neg_pos]
    positives = ex.positive[rows]
    items, local = np.unique(np.concatenate([positives, negatives]), return_inverse=True)
    allowed = np.zeros((len(rows), len(items)), dtype=bool)
    allowed[neg_owner, local[len(rows):]] = True
    if s.in_batch_negatives:
        allowed[:, local[:len(rows)]] = True
    n_items = len(data.catalog.item_ids)
    owned = ex.owned_keys(n_items) if owned is None else owned
    cell_b, cell_j = np.nonzero(allowed)  # the user's known items are no negatives
    keys = ex.user[rows][cell_b] * n_items + items[cell_j]
    at = np.minimum(np.searchsorted(owned, keys), max(len(owned) - 1, 0))
    hit = owned[at] == keys if len(owned) else np.zeros(len(keys), dtype=bool)
    allowed[cell_b[hit], cell_j[hit]] = False
    label = local[:len(rows)]
    allowed[np.arange(len(rows)), label] = True
    U = user_block(E, W, ex.history, rows, gamma)
    P, pad, mask = persona_block(E, W, data.catalog, items)
    logits = (item_scores(U, P, pad, mask, s.persona_pool, s.persona_temperature) / s.temperature) \
        .masked_fill(~torch.as_tensor(allowed), float("-inf"))
    loss = F.cross_entropy(logits, torch.as_tensor(label))
    if s.alignment_weight > 0 and ex.aligned is not None:
        loss = loss + s.alignment_weight * alignment_loss(U, P, pad, mask, label, ex.aligned[rows], s.temperature)
    return loss


def alignment_loss(U: torch.Tensor, P: torch.Tensor, pad: torch.Tensor, mask: torch.Tensor, label: np.ndarray,
                   aligned: np.ndarray, temperature: float) -> torch.Tensor:
    """The paper's signal as an auxiliary term: for each example whose positive item has an aligned
    persona and at least two personas, the cross-entropy of cos(u, p)/τ over that item's personas
    with the aligned one as the label (B', w); summed and divided by the batch size B, so λ weighs
    each qualifying example the same whatever their share of the batch. Zero when none qualifies."""
    own = torch.as_tensor(label)
    width = mask[own].sum(dim=1).numpy()
    use = np.flatnonzero((aligned >= 0) & (width >= 2) & (aligned < width))
    if not len(use):
        return U.sum() * 0.0
    idx = torch.as_tensor(use)
    slots = pad[own[idx]]  # (B', w) indices into P
    sims = torch.einsum("bd,bwd->bw", U[idx], P[slots]).masked_fill(~mask[own[idx]], float("-inf"))
    return F.cross_entropy(sims / temperature, torch.as_tensor(aligned[use]), reduction="sum") / len(label)


def ndcg(rank: np.ndarray, k: int = NDCG_K) -> np.ndarray:
    """1/log2(rank + 1) where 1 <= rank <= k, else 0 (rank 0 = the target is not a candidate)."""
    out = np.zeros(len(rank))
    hit = (rank >= 1) & (rank <= k)
    out[hit] = 1.0 / np.log2(rank[hit] + 1)
    return out


@torch.no_grad()
def validate(E: torch.Tensor, W: torch.Tensor | None, data: RerankData, gamma: float, alphas: tuple[float, ...],
             chunk: int = 4096) -> dict:
    """NDCG@10 of the validation lists per generator: the generator's own order, the pure rerank
    (max over personas, as served) and the blend at every α; `selection` = the mean pure NDCG@10
    over the generators (what the checkpoint is chosen on). Ties keep the generator's order."""
    val: Validation = data.validation
    if not len(val):
        return {"selection": float("nan"), "generators": {}}
    n = len(val)
    width = int((val.candidates.ptr[1:] - val.candidates.ptr[:-1]).max())
    persona = np.full((n, width), -np.inf)
    cf = np.zeros((n, width))
    valid = np.zeros((n, width), dtype=bool)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        pos, owner = ranges(val.candidates.ptr, rows)
        cands = val.candidates.values[pos]
        items, local = np.unique(cands, return_inverse=True)
        U = user_block(E, W, val.history, rows, gamma)
        P, pad, mask = persona_block(E, W, data.catalog, items)
        scores = item_scores(U, P, pad, mask, "max", 1.0).numpy()
        at = pos - val.candidates.ptr[rows][owner]
        persona[rows[owner], at] = scores[owner, local]
        cf[rows[owner], at] = val.cf_score.values[pos]
        valid[rows[owner], at] = True
    target = val.target
    has = target >= 0
    gens = np.array(val.generator)
    sampled = np.isnan(cf[valid]).any()

    def rank_of(final: np.ndarray) -> np.ndarray:
        t = final[np.arange(n), np.maximum(target, 0)][:, None]
        cols = np.arange(width)[None]
        better = valid & ((final > t) | ((final == t) & (cols < target[:, None])))
        return np.where(has, better.sum(axis=1) + 1, 0)

    by = {"generator": ndcg(np.where(has, target + 1, 0)), 1.0: ndcg(rank_of(np.where(valid, persona, -np.inf)))}
    if not sampled:
        for a in alphas:
            if a < 1.0:
                by[a] = ndcg(rank_of(np.where(valid, blend_rows(np.where(valid, persona, 0.0), cf, valid, a), -np.inf)))
    out = {}
    for g in sorted(set(gens)):
        sel = gens == g
        blend = {float(a): float(v[sel].mean()) for a, v in by.items() if a != "generator"}
        best = max(blend, key=lambda a: (round(blend[a], 12), a))
        out[g] = {"lists": int(sel.sum()), "generator": None if sampled else float(by["generator"][sel].mean()),
                  "pure": blend[1.0], "blend": blend, "best_alpha": best, "best_blend": blend[best]}
    return {"selection": float(np.mean([m["pure"] for m in out.values()])), "generators": out,
            "protocol": val.protocol}


@dataclass
class RerankResult:
    head: np.ndarray  # the kept W (d, d)
    best_epoch: int
    curve: list[dict] = field(default_factory=list)  # per epoch: train_loss, validation metrics
    steps: int = 0
    seconds: float = 0.0


def fit(E_np: np.ndarray, data: RerankData, s: TrainSettings, gamma: float, alphas: tuple[float, ...],
        on_epoch: Callable[[int, dict], None] | None = None) -> RerankResult:
    """Train W on `data` with base embeddings `E_np` (texts × d); see the module docstring."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    E = torch.from_numpy(np.ascontiguousarray(E_np, dtype=np.float32))
    d = E.shape[1]
    W = torch.nn.Parameter(torch.eye(d))
    optimizer = torch.optim.Adam([W], lr=s.rerank_learning_rate)
    started = time.time()
    first = validate(E, W.detach(), data, gamma, alphas)
    result = RerankResult(np.eye(d, dtype=np.float32), 0, [{"epoch": 0, **first}])
    best, stale = first["selection"], 0
    if on_epoch:
        on_epoch(0, result.curve[0])
    n = len(data.train)
    owned = data.train.owned_keys(len(data.catalog.item_ids))
    for epoch in range(1, s.rerank_epochs + 1):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, s.rerank_batch_size):
            rows = order[start:start + s.rerank_batch_size]
            if len(rows) < 2:
                continue
            loss = batch_loss(E, W, data, rows, s, gamma, owned)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            result.steps += 1
            if s.max_steps is not None and result.steps >= s.max_steps:
                break
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   **validate(E, W.detach(), data, gamma, alphas)}
        result.curve.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
        log.info("rerank epoch %d: loss %.4f, validation NDCG@10 %s", epoch, metrics["train_loss"],
                 {g: round(m["pure"], 5) for g, m in metrics["generators"].items()})
        if math.isnan(best) or metrics["selection"] > best:
            best, stale = metrics["selection"], 0
            result.head, result.best_epoch = W.detach().numpy().copy(), epoch
        else:
            stale += 1
        if stale >= s.rerank_patience or (s.max_steps is not None and result.steps >= s.max_steps):
            break
    result.seconds = time.time() - started
    return result


def with_head(model, head: np.ndarray):
    """The sentence-transformers `model` followed by Dense(W, no bias, identity) and Normalize:
    what the rerank objective trained, as one model to log, register and serve."""
    from sentence_transformers import models

    out = copy.deepcopy(model)
    if not isinstance(out[len(out) - 1], models.Normalize):
        out.append(models.Normalize())
    d = head.shape[0]
    out.append(models.Dense(d, d, bias=False, activation_function=torch.nn.Identity(),
                            init_weight=torch.as_tensor(head, dtype=torch.float32)))
    out.append(models.Normalize())
    return out
