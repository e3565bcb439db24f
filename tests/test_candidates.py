"""Candidate generators: vectorised BPR-MF and LightGCN, one distributed top-N with seen-item exclusion."""

import numpy as np
import pytest

from conftest import make_config
from persona4rec.errors import InputError
from persona4rec.scoring import candidates
from persona4rec.scoring.factorize import (BPRParams, LightGCNParams, NegativeSampler, lightgcn_batch,
                                           normalised_adjacency, train_bpr, train_lightgcn)
from persona4rec.scoring.topn import check_item_budget, item_matrix, top_n_rows, write_factors


def brute_top_n(U, Q, seen: list[set[int]], n: int) -> list[list[tuple[int, float]]]:
    out = []
    for r, u in enumerate(U):
        scores = [(float(u @ Q[j]), j) for j in range(len(Q)) if j not in seen[r]]
        scores.sort(key=lambda t: (-t[0], t[1]))
        out.append([(j, s) for s, j in scores[:n]])
    return out


@pytest.mark.unit
@pytest.mark.parametrize("block_elems", [1, 7, 10_000])
def test_top_n_rows_equals_brute_force_whatever_the_block(block_elems):
    rng = np.random.default_rng(1)
    U, Q = rng.normal(size=(9, 4)).astype(np.float32), rng.normal(size=(12, 4)).astype(np.float32)
    Q[5] = Q[3]  # a tie: broken by item id
    seen = [set(rng.choice(12, size, replace=False).tolist()) for size in (0, 1, 3, 11, 12, 5, 2, 0, 9)]
    flat = np.array([j for s in seen for j in sorted(s)], dtype=np.int64)
    rows, items, scores, ranks = top_n_rows(U, flat, np.array([len(s) for s in seen]), Q, 5, block_elems)
    got = [[] for _ in seen]
    for r, j, s, k in zip(rows, items, scores, ranks):
        assert k == len(got[r]) + 1
        got[r].append((int(j), float(s)))
    want = brute_top_n(U, Q, seen, 5)
    for g, w in zip(got, want):
        assert [j for j, _ in g] == [j for j, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-5)
    assert got[4] == [] and len(got[3]) == 1  # everything seen → nothing; one unseen → one


@pytest.mark.unit
def test_ties_across_the_cut_off_go_to_the_smaller_item_id():
    U = np.ones((3, 2), dtype=np.float32)
    Q = np.zeros((50, 2), dtype=np.float32)  # every item ties at 0 ...
    Q[40] = 1.0  # ... but one
    seen = np.array([40, 3], dtype=np.int64)  # user 1 saw item 40, user 2 saw item 3
    rows, items, _, _ = top_n_rows(U, seen, np.array([0, 1, 1]), Q, 4, 10_000)
    got = {r: items[rows == r].tolist() for r in range(3)}
    assert got == {0: [40, 0, 1, 2], 1: [0, 1, 2, 3], 2: [40, 0, 1, 2]}
    rows, items, _, _ = top_n_rows(U[2:], np.array([3], dtype=np.int64), np.array([1]), Q[:10], 4, 10_000)
    assert items.tolist() == [0, 1, 2, 4]


@pytest.mark.unit
def test_negative_sampler_avoids_observed_pairs():
    import torch
    u = torch.tensor([0, 0, 0, 1, 2, 2])
    i = torch.tensor([0, 1, 2, 3, 0, 4])
    sampler = NegativeSampler(u, i, 20, torch.Generator().manual_seed(0))
    users = torch.tensor([0, 1, 2] * 2000)
    j = sampler(users)
    observed = {(0, 0), (0, 1), (0, 2), (1, 3), (2, 0), (2, 4)}
    assert not any((a, b) in observed for a, b in zip(users.tolist(), j.tolist()))
    assert set(j[users == 0].tolist()) == set(range(3, 20))  # still over every unobserved item


@pytest.mark.unit
def test_normalised_adjacency_is_symmetric_with_degree_weights():
    import torch
    adj = normalised_adjacency(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 1, 0]), 2, 2).to_dense()
    assert torch.allclose(adj, adj.T)
    # user 0 has degree 2 (items 0, 1; the duplicate counts once), item 1 has degree 2
    assert adj[0, 3].item() == pytest.approx(1 / 2) and adj[0, 2].item() == pytest.approx(1 / np.sqrt(2))


def planted(seed=0, users=60, items=40):
    """Two communities: users < half like items < half, the others the rest; 6 pairs each."""
    rng = np.random.default_rng(seed)
    u, i = [], []
    for a in range(users):
        pool = np.arange(items // 2) if a < users // 2 else np.arange(items // 2, items)
        for b in rng.choice(pool, 6, replace=False):
            u.append(a)
            i.append(int(b))
    return np.array(u), np.array(i), users, items


@pytest.mark.unit
@pytest.mark.parametrize("model", ["bpr", "lightgcn", "lightgcn-capped"])
def test_factor_models_learn_the_communities(model):
    u, i, nu, ni = planted()
    if model == "bpr":
        P, Q = train_bpr(u, i, nu, ni, BPRParams(dim=8, epochs=30, lr=0.05, reg=0.001, batch=32), "cpu")
    else:  # capped: two steps per epoch, the batch grown to half the pairs
        cap = {"lightgcn": 500, "lightgcn-capped": 2}[model]
        p = LightGCNParams(dim=8, layers=2, epochs=30 if cap > 2 else 60, lr=0.01, batch=64, max_steps_per_epoch=cap)
        P, Q = train_lightgcn(u, i, nu, ni, p, "cpu")
    assert P.shape == (nu, 8) and Q.shape == (ni, 8) and P.dtype == np.float32
    scores = P @ Q.T
    same = np.array([[(a < nu // 2) == (b < ni // 2) for b in range(ni)] for a in range(nu)])
    # every user ranks the unseen items of their own community above the other community's
    seen = np.zeros_like(same)
    seen[u, i] = True
    own = np.where(same & ~seen, scores, np.nan)
    other = np.where(~same, scores, np.nan)
    assert (np.nanmean(own, axis=1) > np.nanmean(other, axis=1)).mean() >= 0.95


@pytest.mark.unit
def test_lightgcn_steps_per_epoch_are_capped_by_growing_the_batch():
    p = LightGCNParams(batch=2048, max_steps_per_epoch=500)
    assert lightgcn_batch(10_000, p) == 2048 and lightgcn_batch(1_024_000, p) == 2048  # below the cap
    assert lightgcn_batch(2_000_000, p) == 4000 and lightgcn_batch(2_000_001, p) == 4001
    for n in (1_024_001, 2_000_001, 10**9 + 7):
        assert -(-n // lightgcn_batch(n, p)) <= 500  # steps in an epoch


@pytest.mark.spark
@pytest.mark.parametrize("generator", ["als", "bpr", "lightgcn"])
def test_every_generator_gives_top_n_unseen_items_and_a_heavy_user_costs_only_itself(spark, tmp_path, generator):
    rng = np.random.default_rng(0)
    seen = {(f"U{u:02d}", f"I{i:02d}") for u in range(40) for i in rng.choice(30, 5, replace=False)}
    seen |= {("U99", f"I{i:02d}") for i in range(27)}  # a heavy user: 3 items left unseen
    train = spark.createDataFrame(sorted(seen), "user_id string, item_id string")
    cfg = make_config(tmp_path, "candidates.bpr_epochs=5", "candidates.lightgcn_epochs=5")
    out = candidates.model_candidates(spark, train, generator, cfg.candidates, str(tmp_path / "work")).toPandas()
    n = cfg.candidates.top_n
    assert set(out["generator"]) == {generator}
    assert out["user_id"].nunique() == 41
    assert not any(pair in seen for pair in zip(out["user_id"], out["item_id"]))
    for user, g in out.groupby("user_id"):
        g = g.sort_values("cf_rank")
        assert list(g["cf_rank"]) == (list(range(1, min(n, 25) + 1)) if user != "U99" else [1, 2, 3])
        assert list(g["cf_score"]) == sorted(g["cf_score"], reverse=True)
    if generator != "als":  # the served list is the exact top-N of the written factors
        f = spark.read.parquet(str(tmp_path / "work" / "factors" / generator)).toPandas()
        users = sorted({a for a, _ in seen})
        items = sorted({b for _, b in seen})
        U = np.stack(f[f.side == "u"].sort_values("idx")["factors"].to_list())
        Q = np.stack(f[f.side == "i"].sort_values("idx")["factors"].to_list())
        sets = [{items.index(b) for a, b in seen if a == user} for user in users]
        want = brute_top_n(U, Q, sets, n)
        for r, user in enumerate(users):
            g = out[out.user_id == user].sort_values("cf_rank")
            assert list(g["item_id"]) == [items[j] for j, _ in want[r]]


@pytest.mark.spark
def test_item_factors_over_the_budget_are_refused_by_name_and_workers_read_them_from_the_folder(spark, tmp_path):
    with pytest.raises(InputError, match=r"1000000 items × 256 dims need 977 MB, over "
                                         r"candidates.item_factors_budget_mb = 100"):
        check_item_budget(1_000_000, 256, 100)
    check_item_budget(1_000_000, 16, 100)
    users = spark.createDataFrame([(0, [1.0, 2.0])], "u long, factors array<float>")
    items = spark.createDataFrame([(2, [5.0, 6.0]), (0, [1.0, 0.0]), (1, [0.0, 1.0])], "idx long, factors array<float>")
    path = str(tmp_path / "factors")
    write_factors(users, items, path)
    np.testing.assert_array_equal(item_matrix(path), [[1, 0], [0, 1], [5, 6]])
    write_factors(users, items.filter("idx = 2"), path)  # a rewrite of the folder is never served from the cache
    np.testing.assert_array_equal(item_matrix(path), [[0, 0], [0, 0], [5, 6]])
