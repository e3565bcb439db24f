"""Does the encoder work on a GPU? Embeddings on CUDA vs the CPU, and the real trainer on CUDA.

    python benchmarks/cuda_check.py --model FOLDER [--steps 40] [--texts 2000]

Needs torch, sentence-transformers and peft only (no Spark, no MLflow: the trainer and the encoder
do not import them), so it runs on a bare GPU machine. It embeds the same texts on the CPU and on
CUDA (max abs difference of the L2-normalised vectors, and CUDA encode throughput), then runs
`trainer.train` — the function the `train_encoder` job calls — for `--steps` optimizer steps on
CUDA, exact and with `history_grad_items = 1`, and reports validation top-1 persona accuracy
before and after. The
examples are the synthetic ones of benchmarks/train.py (random words), each scored against its own
persona and two others: top-1 there is a smoke value around chance (1/3), not a quality figure;
the loss falling on the training batches is the sign that training works. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import numpy as np
import torch

from persona4rec.config import TrainSettings
from persona4rec.training.data import Example
from persona4rec.training.encoder import add_lora, embed, load_encoder
from persona4rec.training.trainer import evaluate, train
from train import examples  # benchmarks/train.py, beside this script


def with_rivals(ex: list[Example], seed: int = 0) -> list[Example]:
    """Each example's item gets two other personas, so top-1 accuracy means something."""
    rng = random.Random(seed)
    out = []
    for i, e in enumerate(ex):
        rivals = rng.sample([j for j in range(len(ex)) if j != i], 2)
        personas = [(e.persona_id, e.persona_text)] + [(ex[j].persona_id, ex[j].persona_text) for j in rivals]
        rng.shuffle(personas)
        out.append(dataclasses.replace(e, item_personas=tuple(personas)))
    return out


def run_training(model_path: str, settings: TrainSettings, train_set, val_set, gamma: float) -> dict:
    model = add_lora(load_encoder(model_path, "cuda", settings.max_seq_length), settings.lora_rank,
                     settings.lora_alpha, settings.lora_dropout, settings.seed)
    before = evaluate(model, val_set, gamma, settings.temperature, settings.batch_size)
    stamps: list[float] = []  # each step ends with float(loss), a device sync
    result = train(model, train_set, val_set, settings, gamma, on_step=lambda *_: stamps.append(time.perf_counter()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"steps": result.steps, "s_per_step": round((stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), 4),
            "first_loss": round(result.step_losses[0], 4), "last_loss": round(result.step_losses[-1], 4),
            "top1_before": round(before["top1_accuracy"], 4),
            "top1_after": round(result.epochs[-1]["top1_accuracy"], 4),
            "trainable_on_cuda": all(p.is_cuda for p in trainable)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="sentence-transformers folder or name")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--gamma", type=float, default=0.9)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_check: torch sees no CUDA device")

    ex = with_rivals(examples(1200, 10))
    texts = [t for e in ex for t in e.history][:args.texts]
    cpu = embed(load_encoder(args.model, "cpu", 128), texts)
    gpu_model = load_encoder(args.model, "cuda", 128)
    embed(gpu_model, texts[:64])  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    gpu = embed(gpu_model, texts, batch_size=256)
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - started

    base = TrainSettings(max_steps=args.steps, epochs=1, batch_size=16, seed=13, history_grad_items=None)
    train_set, val_set = ex[:1000], ex[1000:]
    exact = run_training(args.model, base, train_set, val_set, args.gamma)
    cached = run_training(args.model, dataclasses.replace(base, history_grad_items=1), train_set, val_set,
                          args.gamma)
    print(json.dumps({"bench": "cuda_check", "device": torch.cuda.get_device_name(0),
                      "torch": torch.__version__, "texts": len(texts),
                      "embed_max_abs_diff": float(np.abs(cpu - gpu).max()),
                      "encode_texts_per_s": round(len(texts) / encode_s, 1),
                      "exact": exact, "grad_items_1": cached,
                      "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}))


if __name__ == "__main__":
    main()
