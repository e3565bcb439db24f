"""Training step time (CPU by default, --device cuda on a GPU): our InfoNCE over γ-decayed user
vectors vs a plain sentence-transformers MultipleNegativesRankingLoss step on the same pairs, in the
same run.

    .venv/bin/python benchmarks/train.py [--steps 20] [--batch 16] [--k 10] [--device cpu|cuda]
        [--model packaged:all-MiniLM-L6-v2 | FOLDER] [--grad-items M] [--item-negatives 0|1]

All use the packaged all-MiniLM-L6-v2 with the same LoRA adapters (r 16), AdamW, batch 16,
max_seq_length 128 and the same (user, persona) pairs. Ours embeds the k interaction texts of each
user (the method); the baseline embeds one anchor text per pair — the user's history joined into
one string, cut at max_seq_length — so it sees less of the history. "ours" is the shipped
configuration from conf/base.yaml (or the flags): `train.history_grad_items` = m passes gradient
through m history texts per user drawn by decay weight, the others from a per-epoch cache;
`train.item_persona_negatives` adds the item's other personas (three per item here) as cached
hard negatives; the cache builds are included in the time. The exact step (gradient through all
k texts, in-batch negatives only: the paper's) is timed beside it. Ends with one JSON line:
{"bench": "train", "ours_s_per_step", "baseline_s_per_step", "ratio", "peak_rss_mb",
"history_grad_items", "item_persona_negatives", "exact_s_per_step", "ratio_exact", ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

import numpy as np
import torch

from persona4rec.config import load_config
from persona4rec.training.data import Example
from persona4rec.training.encoder import PACKAGED, add_lora, load_encoder
from persona4rec.training.trainer import (batch_user_vectors, encode_with_grad, history_cache, info_nce,
                                          item_negatives, persona_cache)

WORDS = ("warm tone sturdy strings cheap gift beginner stage studio bright loud quiet tuning pedal "
         "cable amp practice travel case hardware finish neck fret bridge pickup").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def examples(n: int, k: int, seed: int = 0, per_user: int = 5) -> list[Example]:
    """n pairs shaped like the training job's: a user's examples are consecutive interactions, each
    with the k interaction texts before it as history (so a user's histories overlap, as
    leave-one-out profiles do; every history is full) and an item with three personas. Ordered
    user-interleaved, so that a slice of up to n / per_user examples never holds a user twice
    (in-batch negatives)."""
    rng = random.Random(seed)
    users = -(-n // per_user)
    texts = [[f"Item summary: {text(rng, 25)} | prefers: {text(rng, 6)}" for _ in range(k + per_user - 1)]
             for _ in range(users)]
    out = []
    for j in range(per_user):
        for u in range(users):
            personas = tuple((f"P{u}-{j}-{p}", f"Persona. {text(rng, 30)}") for p in range(3))
            out.append(Example(f"U{u}", f"I{u}-{j}", tuple(texts[u][j:j + k]), *personas[0], personas))
    return out[:n]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time finished work only


def time_steps(step, batches) -> float:
    step(batches[0])  # warm-up (allocations, first kernels)
    sync()
    started = time.perf_counter()
    for b in batches[1:]:
        step(b)
    sync()
    return (time.perf_counter() - started) / (len(batches) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--grad-items", type=int, help="history_grad_items of 'ours' (default: conf/base.yaml)")
    ap.add_argument("--item-negatives", type=int, choices=(0, 1),
                    help="item_persona_negatives of 'ours' (default: conf/base.yaml)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--model", default=PACKAGED, help="encoder name or folder")
    args = ap.parse_args()
    defaults = load_config(None, []).train
    grad_items = args.grad_items if args.grad_items is not None else defaults.history_grad_items
    negatives = bool(args.item_negatives) if args.item_negatives is not None else defaults.item_persona_negatives
    torch.manual_seed(0)
    ex = examples(args.batch * (args.steps + 1), args.k)
    batches = [ex[i:i + args.batch] for i in range(0, len(ex), args.batch)]

    def lora_model():
        model = add_lora(load_encoder(args.model, args.device, 128), 16, 32, 0.05, seed=0)
        model.train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def our_s_per_step(m: int | None, hard: bool) -> float:
        model, opt = lora_model()
        # The caches are built for the timed examples and their cost spread over the timed steps,
        # as one build per epoch is in training (k + 4 texts per user for 5 examples here; in real
        # leave-one-out data, about one text per example).
        started = time.perf_counter()
        cache = history_cache(model, ex, m) if m else None
        hard_cache = persona_cache(model, ex) if hard else None
        cache_s = (time.perf_counter() - started) / len(batches)
        draws = np.random.default_rng(0)

        def step(b):
            users = batch_user_vectors(model, [e.history for e in b], args.gamma, cache, m, draws)
            extra = item_negatives(b, hard_cache, users.device) if hard else None
            loss = info_nce(users, encode_with_grad(model, [e.persona_text for e in b]), 0.05, *(extra or ()))
            loss.backward()
            opt.step()
            opt.zero_grad()

        return time_steps(step, batches) + cache_s

    ours_s = our_s_per_step(grad_items, negatives)
    exact_s = our_s_per_step(None, False) if grad_items or negatives else ours_s

    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    base, bopt = lora_model()
    mnrl = MultipleNegativesRankingLoss(base)

    def baseline_step(b):
        feats = [{k: (v.to(base.device) if hasattr(v, "to") else v) for k, v in base.preprocess(texts).items()}
                 for texts in ([" ; ".join(e.history) for e in b], [e.persona_text for e in b])]
        loss = mnrl(feats, None)
        loss.backward()
        bopt.step()
        bopt.zero_grad()

    base_s = time_steps(baseline_step, batches)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = str(base.device)
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    print(json.dumps({"bench": "train", "ours_s_per_step": round(ours_s, 3), "baseline_s_per_step": round(base_s, 3),
                      "ratio": round(ours_s / base_s, 3), "peak_rss_mb": round(peak_mb, 1),
                      "history_grad_items": grad_items, "item_persona_negatives": negatives, "exact_s_per_step": round(exact_s, 3),
                      "ratio_exact": round(exact_s / base_s, 3), "device": device,
                      **({"peak_cuda_mb": round(cuda_mb, 1)} if cuda_mb is not None else {}),
                      "batch": args.batch, "k": args.k, "steps": args.steps, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
