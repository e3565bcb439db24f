"""Fine-tuning the encoder on user–persona alignments (§3.1.3).

Loss: InfoNCE with in-batch negatives (van den Oord et al., 2018). For a batch of B aligned pairs,
u_b is the user vector — the L2-normalised γ-decayed weighted mean of the embeddings of the user's
k history interaction texts (newest weight 1) — and p_b the embedding of the aligned persona text.
With S = U Pᵀ / τ (B×B, cosine similarities over temperature τ), the loss is the cross-entropy of
each row against its diagonal: the user's own persona must score above the other B−1 personas of
the batch. Batches never hold the same user or item twice (those would be false negatives).
Only the LoRA adapters train; the base weights stay frozen.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from persona4rec.config import TrainSettings
from persona4rec.training.data import Example, unique_batches
from persona4rec.training.encoder import decay_weights, embed, user_vector


def info_nce(users: torch.Tensor, personas: torch.Tensor, temperature: float) -> torch.Tensor:
    """users, personas: (B, d) L2-normalised; returns the mean cross-entropy over the batch."""
    logits = users @ personas.T / temperature
    return F.cross_entropy(logits, torch.arange(len(users), device=users.device))


def encode_with_grad(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    features = model.tokenize(texts)
    features = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in features.items()}
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def batch_user_vectors(model: SentenceTransformer, histories: list[tuple[str, ...]], gamma: float,
                       cache: dict[str, torch.Tensor] | None = None, grad_items: int | None = None) -> torch.Tensor:
    """One forward pass over the history texts of the batch, then per-user decayed means.

    Exact by default: every history text passes through the model with gradient. With
    `grad_items` = m and a `cache` of embeddings from the start of the epoch (see
    `history_cache`), only each user's newest m texts do; older ones come from the cache without
    gradient. The γ-decay gives those the least weight, and a step then costs m instead of k
    forward and backward passes per user (`train.history_grad_items`)."""
    cut = [0 if grad_items is None or cache is None else max(len(h) - grad_items, 0) for h in histories]
    flat = [t for h, c in zip(histories, cut) for t in h[c:]]
    emb = encode_with_grad(model, flat)
    out, start = [], 0
    for h, c in zip(histories, cut):
        fresh = emb[start:start + len(h) - c]
        rows = torch.cat([torch.stack([cache[t] for t in h[:c]]).to(emb.device), fresh]) if c else fresh
        w = torch.as_tensor(decay_weights(len(h), gamma), dtype=emb.dtype, device=emb.device)
        out.append((w[:, None] * rows).sum(0) / w.sum())
        start += len(h) - c
    return F.normalize(torch.stack(out), dim=-1)


def history_cache(model: SentenceTransformer, examples: list[Example], grad_items: int,
                  batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Embeddings (no gradient, current weights) of every history text that some example uses
    outside its newest `grad_items` — refreshed once per epoch."""
    texts = sorted({t for e in examples for t in e.history[:max(len(e.history) - grad_items, 0)]})
    was_training = model.training
    model.eval()
    vecs = embed(model, texts, batch_size)
    model.train(was_training)
    return {t: torch.from_numpy(v) for t, v in zip(texts, vecs)}


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


def train(model: SentenceTransformer, train_set: list[Example], val_set: list[Example], s: TrainSettings,
          gamma: float, on_step: Callable[[int, dict], None] | None = None,
          on_epoch: Callable[[int, dict], None] | None = None) -> TrainResult:
    seed_everything(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate)
    rng = random.Random(s.seed)
    result = TrainResult()
    started = time.time()
    optimizer_steps = 0
    for epoch in range(1, s.epochs + 1):
        if s.max_steps is not None and optimizer_steps >= s.max_steps:
            break
        model.train()
        cache = history_cache(model, train_set, s.history_grad_items) if s.history_grad_items else None
        batches = [b for b in unique_batches(train_set, s.batch_size, rng) if len(b) >= 2]
        bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", unit="batch", leave=False)
        optimizer.zero_grad()
        for i, idx in enumerate(bar, start=1):
            ex = [train_set[j] for j in idx]
            users = batch_user_vectors(model, [e.history for e in ex], gamma, cache, s.history_grad_items)
            personas = encode_with_grad(model, [e.persona_text for e in ex])
            loss = info_nce(users, personas, s.temperature) / s.grad_accumulation
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


@torch.no_grad()
def evaluate(model: SentenceTransformer, examples: list[Example], gamma: float, temperature: float,
             batch_size: int) -> dict:
    """val_loss: InfoNCE over consecutive batches; top1_accuracy: share of pairs whose aligned
    persona scores highest among its own item's personas (items with one persona excluded)."""
    model.eval()
    if not examples:
        return {"val_loss": float("nan"), "top1_accuracy": float("nan"), "val_pairs": 0}
    users = np.stack([user_vector(embed(model, list(e.history)), gamma) for e in examples])
    aligned = embed(model, [e.persona_text for e in examples])
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
        cands = embed(model, [t for _, t in e.item_personas])
        best = e.item_personas[int(np.argmax(cands @ u))][0]
        hits += best == e.persona_id
        total += 1
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"),
            "top1_accuracy": hits / total if total else float("nan"), "val_pairs": total}
