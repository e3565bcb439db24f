"""Training examples, the validation split, and batches without false negatives.

Plain Python (no Spark): the trainer built on it runs wherever torch runs, e.g. a single GPU node
fed a list of examples. `persona4rec.training.source` builds the examples from the Delta tables.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    user_id: str
    item_id: str
    history: tuple[str, ...]  # interaction texts, oldest first (at most k)
    persona_id: str  # the aligned persona
    persona_text: str
    item_personas: tuple[tuple[str, str], ...]  # every (persona_id, text) of the item, for accuracy


def is_validation_user(user_id: str, fraction: float, seed: int) -> bool:
    """Deterministic, seedable user-level split: a user's pairs are all train or all validation."""
    h = int(hashlib.sha256(f"{seed}:{user_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    train = [e for e in examples if not is_validation_user(e.user_id, fraction, seed)]
    val = [e for e in examples if is_validation_user(e.user_id, fraction, seed)]
    return train, val


def unique_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches in which no user and no item appears twice.

    With in-batch negatives, a second pair of the same user or item in the batch would be scored
    as a negative although it is a positive: a false negative. An example that does not fit the
    current batch waits for the next one; every example is used once per epoch.
    """
    pending = list(range(len(examples)))
    rng.shuffle(pending)
    batches: list[list[int]] = []
    while pending:
        batch, users, items, rest = [], set(), set(), []
        for i in pending:
            e = examples[i]
            if len(batch) < batch_size and e.user_id not in users and e.item_id not in items:
                batch.append(i)
                users.add(e.user_id)
                items.add(e.item_id)
            else:
                rest.append(i)
        batches.append(batch)
        pending = rest
    return batches
