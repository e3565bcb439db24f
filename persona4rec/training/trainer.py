"""Fine-tuning the encoder on user–persona alignments (§3.1.3).

Loss: InfoNCE with in-batch negatives (van den Oord et al., 2018). For a batch of B aligned pairs,
u_b is the user vector — the L2-normalised γ-decayed weighted mean of the embeddings of the user's
k history interaction texts (newest weight 1) — and p_b the embedding of the aligned persona text.
With S = U Pᵀ / τ (B×B, cosine similarities over temperature τ), the loss is the cross-entropy of
each row against its diagonal: the user's own persona must score above the other B−1 personas of
the batch. Batches never hold the same user or item twice (those would be false negatives).
With `train.item_persona_negatives`, each row's denominator also holds the other personas of its
own item (hard negatives, embedded once per epoch without gradient): in-batch negatives come
from other items, so on their own they teach which item a user fits, not which of the item's
personas — the choice the index makes at scoring time. Only the LoRA adapters train; the base
weights stay frozen.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from persona4rec.config import TrainSettings
from persona4rec.scoring.rank import decayed_user_vectors
from persona4rec.training.data import Example, chunks, take, unique_batches
from persona4rec.training.encoder import decay_weights, embed


def info_nce(users: torch.Tensor, personas: torch.Tensor, temperature: float,
             negatives: torch.Tensor | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
    """users, personas: (B, d) L2-normalised; returns the mean cross-entropy over the batch.

    negatives (B, H, d) with `present` (B, H) bool: extra negatives per row (its item's other
    personas), appended to that row's logits; absent slots (padding) are masked out."""
    logits = users @ personas.T / temperature
    if negatives is not None:
        extra = torch.einsum("bd,bhd->bh", users, negatives) / temperature
        logits = torch.cat([logits, extra.masked_fill(~present, float("-inf"))], dim=1)
    return F.cross_entropy(logits, torch.arange(len(users), device=users.device))


def item_negatives(examples: list[Example], cache: dict[str, torch.Tensor],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, H, d) embeddings of each example's other item personas, zero-padded, and the (B, H)
    mask of real ones; None when no example's item has a second persona."""
    others = [[t for pid, t in e.item_personas if pid != e.persona_id] for e in examples]
    width = max((len(o) for o in others), default=0)
    if width == 0:
        return None
    dim = len(next(iter(cache.values())))
    out = torch.zeros(len(examples), width, dim)
    present = torch.zeros(len(examples), width, dtype=torch.bool)
    for b, texts in enumerate(others):
        for h, t in enumerate(texts):
            out[b, h] = cache[t]
            present[b, h] = True
    return out.to(device), present.to(device)


def encode_with_grad(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    features = model.preprocess(texts)
    features = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in features.items()}
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def encode_unique(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    """encode_with_grad, passing each distinct text through the model once: users of a batch
    share history texts where an interaction text carries no user-specific aspects (an item
    summary alone), and autograd sums the gradient of every use."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) == len(texts):
        return encode_with_grad(model, texts)
    at = {t: i for i, t in enumerate(distinct)}
    emb = encode_with_grad(model, distinct)
    return emb[torch.as_tensor([at[t] for t in texts], device=emb.device)]


def batch_user_vectors(model: SentenceTransformer, histories: list[tuple[str, ...]], gamma: float,
                       cache: dict[str, torch.Tensor] | None = None, grad_items: int | None = None,
                       rng: np.random.Generator | None = None) -> torch.Tensor:
    """One forward pass over the history texts of the batch, then per-user decayed means.

    Exact by default: every history text passes through the model with gradient. With
    `grad_items` = m and a `cache` of embeddings from the start of the epoch (see
    `history_cache`), only m texts per user do, drawn with probability proportional to their
    decay weight; the others come from the cache without gradient (`train.history_grad_items`).
    The drawn texts' gradient is scaled by Σw / Σw_drawn (`combine_history`), so that over the
    draw it equals the exact gradient wherever the cache is current; a step costs m instead of k
    forward and backward passes per user. Drawn texts write their new embedding back to the
    cache, so that texts used often (a user's recent interactions recur in each of their later
    profiles) stay close to current between the per-epoch rebuilds."""
    rng = rng or np.random.default_rng(0)
    weights = [decay_weights(len(h), gamma) for h in histories]
    sampled = grad_items is not None and cache is not None
    drawn = [draw_grad_items(w, grad_items, rng) if sampled else np.arange(len(w)) for w in weights]
    texts = [h[j] for h, d in zip(histories, drawn) for j in d]
    emb = encode_unique(model, texts)
    if sampled:  # write back: a drawn text's cached value is now current
        cache.update((t, row.clone()) for t, row in zip(texts, emb.detach().cpu()) if t in cache)
    out, start = [], 0
    for h, w, d in zip(histories, weights, drawn):
        fresh = emb[start:start + len(d)]
        start += len(d)
        fresh_at = set(d.tolist())
        rows = [None if j in fresh_at else cache[t].to(emb.device) for j, t in enumerate(h)]
        out.append(combine_history(rows, fresh, d, torch.as_tensor(w, dtype=emb.dtype, device=emb.device)))
    return F.normalize(torch.stack(out), dim=-1)


def draw_grad_items(weights: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m history positions (all when there are at most m), drawn without replacement with
    probability proportional to their weight; sorted."""
    if len(weights) <= m:
        return np.arange(len(weights))
    return np.sort(rng.choice(len(weights), size=m, replace=False, p=weights / weights.sum()))


def combine_history(cached: list[torch.Tensor | None], fresh: torch.Tensor, drawn: np.ndarray,
                    w: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j e_j / Σw with e_j fresh (with gradient) at the drawn positions and cached elsewhere.

    The value is the plain decayed mean. The drawn rows carry their gradient scaled by
    s = Σw / Σw_drawn (value x, gradient s·dx, as x·s − x.detach()·(s − 1)). With one draw, text j
    comes with probability w_j / Σw and then adds w_j·s·de_j / Σw = de_j to du; over the draw that is
    Σ_j (w_j / Σw)·de_j, the exact gradient (for m > 1 drawn without replacement, approximately).
    Unscaled, one text would carry only w_j / Σw of it."""
    total = w.sum()
    if len(drawn) == len(w):  # every text fresh: the plain exact mean
        return (w[:, None] * fresh).sum(0) / total
    scale = total / w[torch.as_tensor(drawn, device=w.device)].sum()
    boosted = fresh * scale - fresh.detach() * (scale - 1)
    rows = list(cached)
    for i, j in enumerate(drawn):
        rows[int(j)] = boosted[i]
    return (w[:, None] * torch.stack(rows)).sum(0) / total


def history_cache(model: SentenceTransformer, examples: Sequence[Example], grad_items: int,
                  batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Embeddings (no gradient, current weights) of every history text of an example with more
    than `grad_items` of them (any of its texts may be left undrawn) — refreshed once per epoch."""
    return frozen_embeddings(model, {t for e in examples if len(e.history) > grad_items for t in e.history},
                             batch_size)


def persona_cache(model: SentenceTransformer, examples: Sequence[Example],
                  batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Embeddings (no gradient, current weights) of the item personas that serve as hard
    negatives (`item_negatives`) — refreshed once per epoch."""
    return frozen_embeddings(model, {t for e in examples for pid, t in e.item_personas if pid != e.persona_id},
                             batch_size)


def frozen_embeddings(model: SentenceTransformer, texts: set[str], batch_size: int) -> dict[str, torch.Tensor]:
    ordered = sorted(texts)
    was_training = model.training
    model.eval()
    vecs = embed(model, ordered, batch_size)
    model.train(was_training)
    return {t: torch.from_numpy(v) for t, v in zip(ordered, vecs)}


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    step_losses: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(model: SentenceTransformer, train_set: Sequence[Example], val_set: Sequence[Example], s: TrainSettings,
          gamma: float, on_step: Callable[[int, dict], None] | None = None,
          on_epoch: Callable[[int, dict], None] | None = None) -> TrainResult:
    seed_everything(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate)
    rng = random.Random(s.seed)
    draws = np.random.default_rng(s.seed)  # which history texts get gradient (history_grad_items)
    result = TrainResult()
    started = time.time()
    optimizer_steps = 0
    for epoch in range(1, s.epochs + 1):
        if s.max_steps is not None and optimizer_steps >= s.max_steps:
            break
        model.train()
        cache = history_cache(model, train_set, s.history_grad_items) if s.history_grad_items else None
        hard = persona_cache(model, train_set) if s.item_persona_negatives else None
        batches = [b for b in unique_batches(train_set, s.batch_size, rng) if len(b) >= 2]
        bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", unit="batch", leave=False)
        optimizer.zero_grad()
        for i, idx in enumerate(bar, start=1):
            ex = take(train_set, idx)
            users = batch_user_vectors(model, [e.history for e in ex], gamma, cache, s.history_grad_items, draws)
            personas = encode_with_grad(model, [e.persona_text for e in ex])
            negatives = item_negatives(ex, hard, users.device) if hard else None
            loss = info_nce(users, personas, s.temperature, *(negatives or ())) / s.grad_accumulation
            loss.backward()
            if i % s.grad_accumulation == 0 or i == len(batches):
                optimizer.step()
                optimizer.zero_grad()
                optimizer_steps += 1
            value = float(loss.detach()) * s.grad_accumulation
            result.steps += 1
            result.step_losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}")
            if on_step:
                on_step(result.steps, {"train_loss": value, "learning_rate": optimizer.param_groups[0]["lr"]})
            if s.max_steps is not None and optimizer_steps >= s.max_steps:
                break
        metrics = evaluate(model, val_set, gamma, s.temperature, s.batch_size)
        metrics["epoch"] = epoch
        result.epochs.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
    result.seconds = time.time() - started
    model.eval()
    return result


EVAL_CHUNK = 16384  # examples whose texts are encoded together in `evaluate`


@torch.no_grad()
def evaluate(model: SentenceTransformer, examples: Sequence[Example], gamma: float, temperature: float,
             batch_size: int) -> dict:
    """val_loss: InfoNCE with in-batch negatives only (comparable whatever the training loss) over
    consecutive batches; top1_accuracy: share of pairs whose aligned persona scores highest among
    its own item's personas (items with one persona excluded).

    Batched: every distinct text of a chunk of examples (histories, aligned and item personas) is
    encoded once in large batches, user vectors are the batched γ-decayed means — not one encode
    call per example. Chunks (a multiple of the batch size, so the loss batches are the same) keep
    memory bounded on a large validation set; past one chunk the figures equal the one-pass ones
    to float tolerance (texts are encoded in other batches)."""
    model.eval()
    if not len(examples):
        return {"val_loss": float("nan"), "top1_accuracy": float("nan"), "val_pairs": 0}
    losses: list[float] = []
    hits = total = 0
    for chunk in chunks(examples, -(-EVAL_CHUNK // batch_size) * batch_size):
        h, t, chunk_losses = _evaluate_chunk(model, chunk, gamma, temperature, batch_size)
        hits, total = hits + h, total + t
        losses.extend(chunk_losses)
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"),
            "top1_accuracy": hits / total if total else float("nan"), "val_pairs": total}


def _evaluate_chunk(model: SentenceTransformer, examples: list[Example], gamma: float, temperature: float,
                    batch_size: int) -> tuple[int, int, list[float]]:
    texts = [t for e in examples for t in e.history] + [e.persona_text for e in examples] + \
        [t for e in examples for _, t in e.item_personas]
    distinct = list(dict.fromkeys(texts))
    at = {t: n for n, t in enumerate(distinct)}
    vectors = embed(model, distinct, batch_size=256)
    rows = lambda ts: vectors[[at[t] for t in ts]] if ts else np.zeros((0, vectors.shape[1]), np.float32)
    counts = np.array([len(e.history) for e in examples])
    users = decayed_user_vectors(rows([t for e in examples for t in e.history]), counts, gamma)
    aligned = rows([e.persona_text for e in examples])
    losses = []
    for start in range(0, len(examples), batch_size):
        u = torch.from_numpy(users[start:start + batch_size])
        p = torch.from_numpy(aligned[start:start + batch_size])
        if len(u) >= 2:
            losses.append(float(info_nce(u, p, temperature)))
    hits = total = 0
    for e, u in zip(examples, users):
        if len(e.item_personas) < 2:
            continue
        best = e.item_personas[int(np.argmax(rows([t for _, t in e.item_personas]) @ u))][0]
        hits += best == e.persona_id
        total += 1
    return hits, total, losses
