"""Training step time (CPU by default, --device cuda on a GPU): our InfoNCE over γ-decayed user
vectors vs a plain sentence-transformers MultipleNegativesRankingLoss step on the same pairs, in the
same run.

    .venv/bin/python benchmarks/train.py [--steps 20] [--batch 16] [--k 10] [--device cpu|cuda]
                                         [--model packaged:all-MiniLM-L6-v2 | FOLDER]

Both use the packaged all-MiniLM-L6-v2 with the same LoRA adapters (r 16), AdamW, batch 16,
max_seq_length 128 and the same (user, persona) pairs. Ours embeds the k interaction texts of each
user (the method); the baseline embeds one anchor text per pair — the user's history joined into
one string, cut at max_seq_length — so it sees less of the history. A third timing runs our loss
with `train.history_grad_items` (gradient through the newest m history texts, the rest from a
per-epoch cache; its build cost is included). Ends with one JSON line:
{"bench": "train", "ours_s_per_step", "baseline_s_per_step", "ratio", "peak_rss_mb",
 "ours_cached_s_per_step", "ratio_cached", ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

import torch

from persona4rec.training.data import Example
from persona4rec.training.encoder import PACKAGED, add_lora, load_encoder
from persona4rec.training.trainer import batch_user_vectors, encode_with_grad, history_cache, info_nce

WORDS = ("warm tone sturdy strings cheap gift beginner stage studio bright loud quiet tuning pedal "
         "cable amp practice travel case hardware finish neck fret bridge pickup").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def examples(n: int, k: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(f"U{i}", f"I{i}", tuple(f"Item summary: {text(rng, 25)} | prefers: {text(rng, 6)}"
                                            for _ in range(k)), f"P{i}", f"Persona. {text(rng, 30)}", ())
            for i in range(n)]


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
    ap.add_argument("--grad-items", type=int, default=2, help="history_grad_items for the cached variant")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--model", default=PACKAGED, help="encoder name or folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    ex = examples(args.batch * (args.steps + 1), args.k)
    batches = [ex[i:i + args.batch] for i in range(0, len(ex), args.batch)]

    ours = add_lora(load_encoder(args.model, args.device, 128), 16, 32, 0.05, seed=0)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-4)
    ours.train()

    def our_step(b):
        users = batch_user_vectors(ours, [e.history for e in b], args.gamma)
        loss = info_nce(users, encode_with_grad(ours, [e.persona_text for e in b]), 0.05)
        loss.backward()
        opt.step()
        opt.zero_grad()

    ours_s = time_steps(our_step, batches)

    # The same loss with train.history_grad_items = m: gradient through each user's newest m
    # history texts, older ones from a cache refreshed once per epoch. The cache is built for the
    # timed examples here (no text is shared between examples in this synthetic set, so this is
    # the worst case: real LOO histories overlap) and its cost is spread over the timed steps.
    cached = add_lora(load_encoder(args.model, args.device, 128), 16, 32, 0.05, seed=0)
    copt = torch.optim.AdamW([p for p in cached.parameters() if p.requires_grad], lr=2e-4)
    cached.train()
    started = time.perf_counter()
    cache = history_cache(cached, ex, args.grad_items)
    cache_s = (time.perf_counter() - started) / len(batches)

    def cached_step(b):
        users = batch_user_vectors(cached, [e.history for e in b], args.gamma, cache, args.grad_items)
        loss = info_nce(users, encode_with_grad(cached, [e.persona_text for e in b]), 0.05)
        loss.backward()
        copt.step()
        copt.zero_grad()

    cached_s = time_steps(cached_step, batches) + cache_s

    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    base = add_lora(load_encoder(args.model, args.device, 128), 16, 32, 0.05, seed=0)
    mnrl = MultipleNegativesRankingLoss(base)
    bopt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=2e-4)
    base.train()

    def baseline_step(b):
        feats = [{k: (v.to(base.device) if hasattr(v, "to") else v) for k, v in base.tokenize(texts).items()}
                 for texts in ([" ; ".join(e.history) for e in b], [e.persona_text for e in b])]
        loss = mnrl(feats, None)
        loss.backward()
        bopt.step()
        bopt.zero_grad()

    base_s = time_steps(baseline_step, batches)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = str(ours.device)
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    print(json.dumps({"bench": "train", "ours_s_per_step": round(ours_s, 3), "baseline_s_per_step": round(base_s, 3),
                      "ratio": round(ours_s / base_s, 3), "peak_rss_mb": round(peak_mb, 1),
                      "ours_cached_s_per_step": round(cached_s, 3), "ratio_cached": round(cached_s / base_s, 3),
                      "grad_items": args.grad_items, "device": device,
                      **({"peak_cuda_mb": round(cuda_mb, 1)} if cuda_mb is not None else {}),
                      "batch": args.batch, "k": args.k, "steps": args.steps, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
