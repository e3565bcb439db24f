"""Training examples, the validation split, and batches without false negatives.

Plain Python (no Spark): the trainer built on it runs wherever torch runs, e.g. a single GPU node
fed a list of examples or `persona4rec.training.source.ExampleSet`, which streams them from the
Delta tables through a memory-mapped file. The helpers below accept either.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Sequence


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


def take(examples: Sequence[Example], positions) -> list[Example]:
    """The examples at `positions`: one read per batch from an ExampleSet, indexing from a list."""
    if hasattr(examples, "take"):
        return examples.take(positions)
    return [examples[int(j)] for j in positions]


def chunks(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive runs of at most `size` examples, materialised one at a time."""
    for start in range(0, len(examples), size):
        yield take(examples, range(start, min(start + size, len(examples))))


def batch_keys(examples: Sequence[Example]) -> tuple[list, list]:
    """The user and item key of every example: an ExampleSet gives them without reading texts."""
    if hasattr(examples, "keys"):
        return examples.keys()
    return [e.user_id for e in examples], [e.item_id for e in examples]


def unique_batches(examples: Sequence[Example], batch_size: int, rng: random.Random,
                   scan: int = 64) -> list[list[int]]:
    """Shuffled batches in which no user and no item appears twice; every example once per epoch.

    With in-batch negatives, a second pair of the same user or item in the batch would be scored
    as a negative although it is a positive: a false negative. One pass over the shuffled
    examples, first fit: each goes to the first batch that is not full and holds neither its user
    nor its item, looking at no more than `scan` open batches; past that it goes to the first open
    batch after every batch holding its user or item (which therefore holds neither). So the work
    per example is bounded by `scan` plus the full batches it steps over (batches fill roughly in
    order, so these are few) — rescanning everything pending for each batch was quadratic, and a
    user with thousands of pairs made plain first fit scan thousands of batches per pair.
    Only the keys are held (never the texts), and a batch's key sets are dropped once it is full.
    """
    user_of, item_of = batch_keys(examples)
    order = list(range(len(user_of)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    users: list[set | None] = []  # None once the batch is full
    items: list[set | None] = []
    after_user: dict[str, int] = {}
    after_item: dict[str, int] = {}
    first_open = 0
    for i in order:
        user, item = user_of[i], item_of[i]
        b, tried = first_open, 0
        while b < len(batches) and tried < scan:
            if len(batches[b]) < batch_size:
                if user not in users[b] and item not in items[b]:
                    break
                tried += 1
            b += 1
        if tried == scan:
            b = max(b, after_user.get(user, 0), after_item.get(item, 0))
            while b < len(batches) and len(batches[b]) >= batch_size:
                b += 1
        if b == len(batches):
            batches.append([])
            users.append(set())
            items.append(set())
        batches[b].append(i)
        if len(batches[b]) >= batch_size:  # full: never consulted again
            users[b] = items[b] = None
        else:
            users[b].add(user)
            items[b].add(item)
        after_user[user] = max(after_user.get(user, 0), b + 1)
        after_item[item] = max(after_item.get(item, 0), b + 1)
        while first_open < len(batches) and len(batches[first_open]) >= batch_size:
            first_open += 1
    return batches
