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
  Gao et al. 2021.) The positive's persona vectors leave out b's own interaction text, which
  the centroids built from the training split hold and a served candidate never does
  (`training_slots`, `left_out`; the validation lists likewise leave out the target's).
* Auxiliary term (`alignment_weight` λ > 0): + λ · the cross-entropy, over the positive item's
  personas, of the persona aligned to that interaction (the LLM judge's, or the review cluster's:
  `alignment_pairs`) — the paper's signal in the serving geometry, for items with two or more
  personas. Shapes: the positive's cosines (B, w), as in the ranking term → cos / τ.
* Selection: after every epoch the validation lists (training/lists.py) are reranked — NDCG@10 of
  the pure rerank and of the blend at each α — and the head with the best mean NDCG@10 over the
  generators of what will be served is kept (`train.selection: served`: the blend at the α the
  e-mails use — a numeric `scoring.alpha`, or for `auto` the α these lists choose, which training
  tags on the model; `pure`: the pure rerank's). Epoch 0 = the un-tuned encoder: training that
  does not help is not kept. (With `auto` the α and the epoch are both chosen on these lists, a
  little optimistic as any selection on them; `evaluate` re-chooses α on every validation user.)

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


def persona_sums(E: torch.Tensor, W: torch.Tensor | None, catalog: Catalog, items: np.ndarray
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """The personas of `items` (item rows) before normalisation: (sums (q, d) of their mapped
    member vectors, member counts (q,), their catalogue persona rows (q,), pad (m, w) into the q
    personas, mask (m, w))."""
    p_rows, p_owner = ranges(catalog.persona_ptr, items)
    m_pos, m_owner = ranges(catalog.member_ptr, p_rows)
    vec = mapped(E, W, catalog.member_tid[m_pos])
    sums = torch.zeros(len(p_rows), E.shape[1], dtype=vec.dtype).index_add(0, torch.as_tensor(m_owner), vec)
    counts = np.bincount(p_owner, minlength=len(items))
    width = max(int(counts.max(initial=0)), 1)
    pos = np.arange(len(p_rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    pad = np.zeros((len(items), width), dtype=np.int64)
    mask = np.zeros((len(items), width), dtype=bool)
    pad[p_owner, pos] = np.arange(len(p_rows))
    mask[p_owner, pos] = True
    n_members = np.bincount(m_owner, minlength=len(p_rows))
    return sums, n_members, p_rows, torch.as_tensor(pad), torch.as_tensor(mask)


def training_slots(data: RerankData) -> np.ndarray | None:
    """Per training example: the position among its positive's personas of the persona whose
    centroid averages the example's own interaction, or -1 (`Examples.own_slot`, matched in Spark
    by user and item); None when the examples carry none. Why it matters: the review clusters
    (and the judge's pairs) are built from the interactions a run may read, so the positive's
    centroid holds the very review being predicted (measured on Musical Instruments: 5,905 of
    5,953 examples, a sixth of the median centroid), while a recommended item never holds its
    reader's review. `left_out` takes it out."""
    ex = data.train
    return None if ex.own is None or ex.own_slot is None or not len(ex) else ex.own_slot


def user_block(E: torch.Tensor, W: torch.Tensor | None, history: Lists, rows: np.ndarray, gamma: float) -> torch.Tensor:
    """(len(rows), d) user vectors: normalize(Σ γ^age · e) over each row's history (oldest first)."""
    pos, owner = ranges(history.ptr, rows)
    counts = (history.ptr[rows + 1] - history.ptr[rows])
    age = np.repeat(np.cumsum(counts), counts) - 1 - np.arange(len(pos))
    w = torch.as_tensor(gamma ** age.astype(np.float64), dtype=E.dtype)
    vec = mapped(E, W, history.values[pos]) * w[:, None]
    return F.normalize(torch.zeros(len(rows), E.shape[1], dtype=E.dtype).index_add(0, torch.as_tensor(owner), vec),
                       dim=-1)


def persona_sims(U: torch.Tensor, P: torch.Tensor, pad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, m, w): cos(user, persona) of each item's personas, -inf in the padding."""
    return (U @ P.T)[:, pad].masked_fill(~mask[None], float("-inf"))


def pooled(sims: torch.Tensor, pool: str, tau_p: float) -> torch.Tensor:
    """(B, m) from (B, m, w): each item's score, its personas pooled (max or smooth max)."""
    if pool == "max":
        return sims.max(dim=2).values
    return tau_p * torch.logsumexp(sims / tau_p, dim=2)


def batch_loss(E: torch.Tensor, W: torch.Tensor, data: RerankData, rows: np.ndarray, s: TrainSettings,
               gamma: float, owned: np.ndarray | None = None, slots: np.ndarray | None = None) -> torch.Tensor:
    """The listwise loss of the examples `rows`; `owned` = `Examples.owned_keys` and `slots` =
    `training_slots` (both computed once; training_slots when None)."""
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
    block = persona_sums(E, W, data.catalog, items)
    sums, _, _, pad, mask = block
    sims = persona_sims(U, F.normalize(sums, dim=-1), pad, mask)
    slots = training_slots(data) if slots is None else slots
    if slots is not None:
        sims = left_out(sims, U, E, W, data.catalog, block, np.arange(len(rows)), label, slots[rows], ex.own[rows])
    logits = (pooled(sims, s.persona_pool, s.persona_temperature) / s.temperature) \
        .masked_fill(~torch.as_tensor(allowed), float("-inf"))
    loss = F.cross_entropy(logits, torch.as_tensor(label))
    if s.alignment_weight > 0 and ex.aligned is not None:
        positive = sims[torch.arange(len(rows)), torch.as_tensor(label)]  # (B, w): the positive's personas
        loss = loss + s.alignment_weight * alignment_loss(positive, ex.aligned[rows], s.temperature)
    return loss


def left_out(sims: torch.Tensor, U: torch.Tensor, E: torch.Tensor, W: torch.Tensor | None, catalog: Catalog,
             block: tuple, row: np.ndarray, item: np.ndarray, slot: np.ndarray, own: np.ndarray) -> torch.Tensor:
    """`sims` (B, m, w) where, for each user row `row[j]` and its item `item[j]` (an index into
    the block's m items), the persona at `slot[j]` (-1: none) is re-scored without the user's
    own interaction text `own[j]`, one of its members: normalize(Σ members − own) — the held-out
    condition the model is served in (with N − 1 members where the index, past the
    `profile.centroid_members` cap, would take the next newest). A persona whose only member it
    was falls back to its text's vector, as in the index (with no text known it keeps its score).
    `block` = persona_sums' output."""
    sums, n_members, p_rows, pad, _ = block
    keep = slot >= 0
    if not keep.any():
        return sims
    row, item, at, own = row[keep], item[keep], slot[keep], own[keep]
    p = pad[torch.as_tensor(item), torch.as_tensor(at)].numpy()
    rest = sums[torch.as_tensor(p)] - mapped(E, W, own)
    alone = n_members[p] <= 1
    if alone.any():
        if catalog.persona_tid is None:
            rest[torch.as_tensor(alone)] = sums[torch.as_tensor(p[alone])]
        else:
            rest[torch.as_tensor(alone)] = mapped(E, W, catalog.persona_tid[p_rows[p[alone]]])
    values = (U[torch.as_tensor(row)] * F.normalize(rest, dim=-1)).sum(dim=-1)
    return sims.index_put((torch.as_tensor(row), torch.as_tensor(item), torch.as_tensor(at)), values)


def alignment_loss(positive: torch.Tensor, aligned: np.ndarray, temperature: float) -> torch.Tensor:
    """The paper's signal as an auxiliary term: for each example whose positive item has an aligned
    persona and at least two personas, the cross-entropy of cos(u, p)/τ over that item's personas
    with the aligned one as the label; summed and divided by the batch size B, so λ weighs each
    qualifying example the same whatever their share of the batch. Zero when none qualifies.
    Shapes: `positive` (B, w) = each example's cosines with its positive item's personas (its own
    text left out of their centroids, as in the ranking term), -inf in the padding."""
    finite = torch.isfinite(positive).numpy()
    width = finite.sum(axis=1)
    at = np.clip(aligned, 0, positive.shape[1] - 1)
    use = np.flatnonzero((aligned >= 0) & (width >= 2) & (aligned < positive.shape[1])
                        & finite[np.arange(len(aligned)), at])
    if not len(use):
        return positive.nan_to_num(neginf=0.0).sum() * 0.0
    idx = torch.as_tensor(use)
    return F.cross_entropy(positive[idx] / temperature, torch.as_tensor(aligned[use]), reduction="sum") / len(aligned)


def ndcg(rank: np.ndarray, k: int = NDCG_K) -> np.ndarray:
    """1/log2(rank + 1) where 1 <= rank <= k, else 0 (rank 0 = the target is not a candidate)."""
    out = np.zeros(len(rank))
    hit = (rank >= 1) & (rank <= k)
    out[hit] = 1.0 / np.log2(rank[hit] + 1)
    return out


@torch.no_grad()
def validate(E: torch.Tensor, W: torch.Tensor | None, data: RerankData, gamma: float, alphas: tuple[float, ...],
             chunk: int = 4096, selection: str = "served", served_alpha: float | None = None) -> dict:
    """NDCG@10 of the validation lists per generator: the generator's own order, the pure rerank
    (max over personas, as served) and the blend at every α; per generator `served` = the blend at
    the α the e-mails will use (`served_alpha`, i.e. a numeric `scoring.alpha`, which must be in
    `alphas`; None = `scoring.alpha: auto`, which serves the α these lists choose, `best_alpha`).
    Over the generators: `pure` and `served` (means), and `selection` = the one of them named by
    `selection` (`train.selection`: what the checkpoint is chosen and the model promoted on). Lists
    without the generator's own ranks (`sampled`) measure no blend: their served figure is the pure
    rerank. Ties keep the generator's order."""
    val: Validation = data.validation
    if not len(val):
        return {"selection": float("nan"), "pure": float("nan"), "served": float("nan"), "generators": {}}
    n = len(val)
    width = int((val.candidates.ptr[1:] - val.candidates.ptr[:-1]).max())
    persona = np.full((n, width), -np.inf)
    cf = np.zeros((n, width))
    valid = np.zeros((n, width), dtype=bool)
    # the target's own interaction text is no member of its centroid when served (a production
    # run's sampled lists read every review; an evaluation's clusters never hold held-out ones)
    listed = val.target >= 0
    target_item = np.zeros(n, dtype=np.int64)
    target_item[listed] = val.candidates.values[val.candidates.ptr[:-1][listed] + val.target[listed]]
    slots = np.full(n, -1, dtype=np.int64)
    own = slots.copy() if val.own is None else val.own
    if val.own is not None and val.own_slot is not None:
        slots = np.where(listed, val.own_slot, -1)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        pos, owner = ranges(val.candidates.ptr, rows)
        cands = val.candidates.values[pos]
        items, local = np.unique(cands, return_inverse=True)
        U = user_block(E, W, val.history, rows, gamma)
        block = persona_sums(E, W, data.catalog, items)
        sims = persona_sims(U, F.normalize(block[0], dim=-1), block[3], block[4])
        sims = left_out(sims, U, E, W, data.catalog, block, rows - start,
                        np.searchsorted(items, target_item[rows]), slots[rows], own[rows])
        scores = pooled(sims, "max", 1.0).numpy()
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
        at = 1.0 if sampled else best if served_alpha is None else float(served_alpha)
        out[g] = {"lists": int(sel.sum()), "generator": None if sampled else float(by["generator"][sel].mean()),
                  "pure": blend[1.0], "blend": blend, "best_alpha": best, "best_blend": blend[best],
                  "served_alpha": at, "served": blend[at]}
    means = {key: float(np.mean([m[key] for m in out.values()])) for key in ("pure", "served")}
    return {"selection": means[selection], **means, "generators": out, "protocol": val.protocol}


@dataclass
class RerankResult:
    head: np.ndarray  # the kept W (d, d)
    best_epoch: int
    curve: list[dict] = field(default_factory=list)  # per epoch: train_loss, validation metrics
    steps: int = 0
    seconds: float = 0.0


def fit(E_np: np.ndarray, data: RerankData, s: TrainSettings, gamma: float, alphas: tuple[float, ...],
        on_epoch: Callable[[int, dict], None] | None = None, served_alpha: float | None = None) -> RerankResult:
    """Train W on `data` with base embeddings `E_np` (texts × d); see the module docstring.
    `served_alpha`: a numeric `scoring.alpha` (None = auto), for `train.selection: served`."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    E = torch.from_numpy(np.ascontiguousarray(E_np, dtype=np.float32))
    d = E.shape[1]
    W = torch.nn.Parameter(torch.eye(d))
    optimizer = torch.optim.Adam([W], lr=s.rerank_learning_rate)
    started = time.time()
    check = lambda head: validate(E, head, data, gamma, alphas, selection=s.selection, served_alpha=served_alpha)
    first = check(W.detach())
    result = RerankResult(np.eye(d, dtype=np.float32), 0, [{"epoch": 0, **first}])
    best, stale = first["selection"], 0
    if on_epoch:
        on_epoch(0, result.curve[0])
    n = len(data.train)
    owned = data.train.owned_keys(len(data.catalog.item_ids))
    slots = training_slots(data)
    if slots is not None:
        log.info("rerank training: %d of %d examples' own text left out of their positive's centroid",
                 int((slots >= 0).sum()), n)
    for epoch in range(1, s.rerank_epochs + 1):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, s.rerank_batch_size):
            rows = order[start:start + s.rerank_batch_size]
            if len(rows) < 2:
                continue
            loss = batch_loss(E, W, data, rows, s, gamma, owned, slots)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            result.steps += 1
            if s.max_steps is not None and result.steps >= s.max_steps:
                break
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   **check(W.detach())}
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
