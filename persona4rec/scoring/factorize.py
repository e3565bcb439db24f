"""Collaborative-filtering factor models trained in torch: BPR-MF and LightGCN.

Both learn from implicit (user, item) pairs given as dense integer ids and return a user and an
item factor matrix whose dot product is the generator's score, so one top-N (`topn.py`) serves
every generator. They run on one node — the GPU of the task when there is one, else the CPU — and
are vectorised per minibatch: no Python step per interaction or per sampled negative.

* BPR-MF (Rendle et al., UAI 2009): for a minibatch of observed pairs (u, i) and one sampled
  negative j per pair (an item u never interacted with), plain SGD on
  ``-log σ(p_u·q_i − p_u·q_j)`` with L2 on the touched rows — the update of the original paper,
  rows updated with `index_add_` (a user or item twice in a batch gets both updates).
* LightGCN (He et al., SIGIR 2020): embeddings E⁰ of users and items propagated K times over the
  symmetrically normalised bipartite graph, Eᵏ⁺¹ = D^-½ A D^-½ Eᵏ (a sparse matmul), final
  embedding the mean of E⁰..Eᴷ; BPR loss on sampled negatives + L2 on the minibatch's E⁰ rows,
  Adam. The served factors are the propagated ones.

Negatives: drawn uniformly over items and redrawn (vectorised, at most 10 rounds) where the pair
is observed — membership by binary search in the sorted observed keys u·n_items + i.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BPRParams:
    dim: int = 32
    epochs: int = 40
    lr: float = 0.05
    reg: float = 0.001
    batch: int = 256
    seed: int = 7


@dataclass(frozen=True)
class LightGCNParams:
    dim: int = 64
    layers: int = 3
    epochs: int = 100
    lr: float = 0.005
    reg: float = 1e-4
    batch: int = 2048
    seed: int = 7
    max_steps_per_epoch: int = 500


def lightgcn_batch(n_pairs: int, p: LightGCNParams) -> int:
    """The minibatch: `p.batch`, grown so that an epoch takes at most `p.max_steps_per_epoch`
    steps. Every step propagates the whole graph (cost ∝ pairs), so with a fixed batch an epoch
    costs pairs²/batch — doubling the data quadrupled it (nightly_scale: 61 → 227 s); with the
    step count capped an epoch is linear in the pairs. Below the cap (pairs ≤ batch × cap, e.g.
    1M pairs at the defaults) nothing changes."""
    return max(p.batch, -(-n_pairs // p.max_steps_per_epoch))


def device(preference: str = "auto"):
    """torch device: `auto` = the task's GPU when torch sees one, else the CPU."""
    import torch
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


class NegativeSampler:
    """Uniform item negatives that avoid the user's observed items (up to `rounds` redraws; with
    a user who saw nearly every item a few positives may remain, as in the reference BPR)."""

    def __init__(self, u, i, n_items: int, gen, rounds: int = 10):
        import torch
        self.keys = torch.unique(u.long() * n_items + i.long())  # sorted
        self.n_items, self.gen, self.rounds = n_items, gen, rounds
        self._torch = torch

    def observed(self, u, j):
        key = u.long() * self.n_items + j
        pos = self._torch.searchsorted(self.keys, key).clamp_(max=len(self.keys) - 1)
        return self.keys[pos] == key

    def __call__(self, u):
        torch = self._torch
        j = torch.randint(0, self.n_items, (len(u),), generator=self.gen, device=u.device)
        for _ in range(self.rounds):
            bad = self.observed(u, j)
            if not bool(bad.any()):
                break
            j[bad] = torch.randint(0, self.n_items, (int(bad.sum()),), generator=self.gen, device=u.device)
        return j


def _tensors(u: np.ndarray, i: np.ndarray, dev):
    import torch
    return torch.as_tensor(np.asarray(u, dtype=np.int64), device=dev), \
        torch.as_tensor(np.asarray(i, dtype=np.int64), device=dev)


def train_bpr(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, p: BPRParams,
              dev_pref: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(user factors [n_users, dim], item factors [n_items, dim]) float32, by BPR-MF SGD."""
    import torch
    dev = device(dev_pref)
    gen = torch.Generator(device=dev).manual_seed(p.seed)
    tu, ti = _tensors(u, i, dev)
    sampler = NegativeSampler(tu, ti, n_items, gen)
    P = torch.randn(n_users, p.dim, generator=gen, device=dev) * 0.1
    Q = torch.randn(n_items, p.dim, generator=gen, device=dev) * 0.1
    with torch.no_grad():
        for _ in range(p.epochs):
            order = torch.randperm(len(tu), generator=gen, device=dev)
            for s in range(0, len(order), p.batch):
                idx = order[s:s + p.batch]
                bu, bi = tu[idx], ti[idx]
                bj = sampler(bu)
                pu, qi, qj = P[bu], Q[bi], Q[bj]
                diff = qi - qj
                g = torch.sigmoid(-(pu * diff).sum(1, keepdim=True))  # −d/dx log σ(x)
                P.index_add_(0, bu, p.lr * (g * diff - p.reg * pu))
                Q.index_add_(0, bi, p.lr * (g * pu - p.reg * qi))
                Q.index_add_(0, bj, p.lr * (-g * pu - p.reg * qj))
    return P.cpu().numpy(), Q.cpu().numpy()


def normalised_adjacency(u, i, n_users: int, n_items: int):
    """D^-½ A D^-½ of the user–item bipartite graph as a sparse (n_users+n_items)² tensor
    (duplicate pairs count once)."""
    import torch
    keys = torch.unique(u * n_items + i)
    uu, ii = keys // n_items, keys % n_items + n_users
    rows, cols = torch.cat([uu, ii]), torch.cat([ii, uu])
    n = n_users + n_items
    deg = torch.bincount(rows, minlength=n).float()
    w = deg[rows].rsqrt() * deg[cols].rsqrt()
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), w, (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "CSR support is in beta": CSR is what makes spmm fast on the CPU
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()


def train_lightgcn(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, p: LightGCNParams,
                   dev_pref: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) float32: LightGCN's propagated embeddings after training.

    Shapes: E⁰ [n_users + n_items, dim]; A sparse [n, n]; per step the whole graph is
    propagated K times (the cost of a step is K sparse matmuls over 2·|pairs| edges), then the
    BPR loss of the minibatch's (u, i, j) is back-propagated into E⁰. The minibatch grows with
    the pairs past `max_steps_per_epoch` steps (`lightgcn_batch`)."""
    import torch
    dev = device(dev_pref)
    torch.manual_seed(p.seed)
    gen = torch.Generator(device=dev).manual_seed(p.seed)
    tu, ti = _tensors(u, i, dev)
    sampler = NegativeSampler(tu, ti, n_items, gen)
    adj = normalised_adjacency(tu, ti, n_users, n_items)
    emb = torch.nn.Parameter(torch.empty(n_users + n_items, p.dim, device=dev))
    torch.nn.init.normal_(emb, std=0.1)
    opt = torch.optim.Adam([emb], lr=p.lr)
    batch = lightgcn_batch(len(tu), p)

    def propagate():
        layer, total = emb, emb
        for _ in range(p.layers):
            layer = adj @ layer
            total = total + layer
        return total / (p.layers + 1)

    for _ in range(p.epochs):
        order = torch.randperm(len(tu), generator=gen, device=dev)
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            bu, bi = tu[idx], ti[idx]
            bj = sampler(bu)
            out = propagate()
            pu, qi, qj = out[bu], out[n_users + bi], out[n_users + bj]
            x = (pu * (qi - qj)).sum(1)
            e0 = torch.cat([emb[bu], emb[n_users + bi], emb[n_users + bj]])
            loss = torch.nn.functional.softplus(-x).mean() + p.reg * e0.pow(2).sum() / (2 * len(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = propagate()
    return out[:n_users].cpu().numpy(), out[n_users:].cpu().numpy()
