"""The rerank objective (training/rerank.py), its data (training/lists.py) and the ranking gate.

The learnable synthetic task: users follow one of three hidden themes; their reviews name a sport,
an item's persona names a colour, and the sport → colour mapping is arbitrary. The un-tuned
encoder cannot know it; the generator's candidates are in random order. A head trained on the
generator's candidates learns to put the user's colour first.
"""

import json
import random
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch

from conftest import make_config, promote_counting
from persona4rec.config import TrainSettings
from persona4rec.schemas import ALIGNMENT_PAIRS, CANDIDATES, ITEM_PERSONAS, ITEM_SUMMARIES, REVIEWS, SPLITS
from persona4rec.tables import TableStore
from persona4rec.training import rerank
from persona4rec.training.lists import LEAVE_ONE_OUT, SAMPLED, Catalog, Examples, Lists, RerankData, Validation, \
    _csr
from persona4rec.training.promote import decide_ranking

SPORTS = ["tennis", "sailing", "climbing"]
COLOURS = ["crimson", "teal", "amber"]


def lists_of(rows) -> Lists:
    return Lists(_csr([len(r) for r in rows]), np.array([v for r in rows for v in r], dtype=np.int64))


def toy_data(rng: np.random.Generator, d=16, users=90, items=18, noise=0.15):
    """RerankData over random base embeddings: theme t's history texts lie near a_t, colour c's
    member texts near b_c, users of theme t buy colour (t + 1) % 3 — a linear map learns it."""
    a, b = rng.normal(size=(3, d)), rng.normal(size=(3, d))
    texts, E = [], []

    def text(centre):
        v = centre + noise * rng.normal(size=d)
        texts.append(f"t{len(texts)}")
        E.append(v / np.linalg.norm(v))
        return len(texts) - 1

    colour = np.arange(items) % 3
    catalog = Catalog([f"I{i}" for i in range(items)], _csr([1] * items), _csr([3] * items),
                      np.array([text(b[colour[i]]) for i in range(items) for _ in range(3)], dtype=np.int64))
    ex_user, hist, pos, negs, owned, v_hist, v_cands, v_target = [], [], [], [], [], [], [], []
    for u in range(users):
        t = u % 3
        mine = rng.permutation(np.flatnonzero(colour == (t + 1) % 3))[:5]
        others = np.flatnonzero(colour != (t + 1) % 3)
        h = [text(a[t]) for _ in range(4)]
        for j in (2, 3):  # training examples: items 2 and 3 after the ones before
            ex_user.append(u)
            hist.append(h[:j])
            pos.append(mine[j])
            negs.append(list(rng.choice(others, 6, replace=False)))
        owned.append(list(mine))
        cands = list(rng.permutation(np.concatenate([[mine[4]], rng.choice(others, 9, replace=False)])))
        v_hist.append(h)
        v_cands.append(cands)
        v_target.append(cands.index(mine[4]))
    train = Examples(np.array(ex_user), lists_of(hist), np.array(pos), lists_of(negs), lists_of(owned))
    cf = [list(np.linspace(1, 0, len(c))) for c in v_cands]
    val = Validation(["als"] * users, lists_of(v_hist), lists_of(v_cands),
                     Lists(_csr([len(c) for c in cf]), np.array([x for c in cf for x in c])), np.array(v_target),
                     LEAVE_ONE_OUT)
    return RerankData(texts, catalog, train, val), np.array(E, dtype=np.float32)



@pytest.mark.unit
def test_the_alignment_term_scores_the_aligned_persona_among_the_items_own():
    """alignment_loss: the cross-entropy of the aligned persona among the positive item's personas;
    examples without an aligned persona, or whose item has a single persona, add nothing."""
    d = 4
    P = torch.eye(d)[:3]  # item 0: personas 0, 1; item 1: persona 2
    pad = torch.tensor([[0, 1], [2, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    U = torch.stack([torch.eye(d)[1], torch.eye(d)[1], torch.eye(d)[2]])  # both users sit on persona 1
    label = np.array([0, 0, 1])
    own = rerank.persona_sims(U, P, pad, mask)[torch.arange(3), torch.as_tensor(label)]
    right = rerank.alignment_loss(own, np.array([1, -1, 0]), 0.1)
    wrong = rerank.alignment_loss(own, np.array([0, -1, 0]), 0.1)
    # one qualifying example of a batch of 3: log(1 + e^10) / 3 ≈ 3.33 when its choice is wrong
    assert float(right) < 0.01 and 3.2 < float(wrong) < 3.5
    none = rerank.alignment_loss(own, np.array([-1, -1, 0]), 0.1)
    assert float(none) == 0.0  # only a single-persona item is left: no persona choice to learn

    # In batch_loss: + λ · the term over the batch's positive items' own personas.
    rng = np.random.default_rng(1)
    E = rng.normal(size=(8, d)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    catalog = Catalog(["I0", "I1"], _csr([2, 2]), _csr([1, 1, 1, 1]), np.array([4, 5, 6, 7]))
    train = Examples(np.array([0, 1, 2]), lists_of([[0], [1, 2], [3]]), np.array([0, 1, 0]), lists_of([[1], [0], []]),
                     lists_of([[0], [1], [0]]), aligned=np.array([1, 0, -1]))
    data = RerankData([f"t{i}" for i in range(8)], catalog, train, None)
    rows, W, Et = np.arange(3), torch.eye(d), torch.from_numpy(E)
    base = rerank.batch_loss(Et, W, data, rows, TrainSettings(), 0.9)
    on = rerank.batch_loss(Et, W, data, rows, TrainSettings(alignment_weight=0.5), 0.9)
    U = rerank.user_block(Et, W, train.history, rows, 0.9)
    sums, _, _, pad, mask = rerank.persona_sums(Et, W, catalog, np.array([0, 1]))
    P = torch.nn.functional.normalize(sums, dim=-1)
    own = rerank.persona_sims(U, P, pad, mask)[torch.arange(3), torch.as_tensor(train.positive)]
    term = rerank.alignment_loss(own, train.aligned, TrainSettings().temperature)
    assert float(term) > 0 and torch.isclose(on, base + 0.5 * term)


@pytest.mark.unit
def test_an_examples_own_review_is_left_out_of_its_positives_centroid_as_when_served():
    """In training the positive item's persona centroids are built from the training split, so they
    hold the example's own interaction text; a held-out interaction never is a member. The loss
    must see the centroid without it: the same loss as a catalogue from which it was removed; a
    persona whose only member it was scores by its text's vector, as the index does."""
    d = 6
    rng = np.random.default_rng(3)
    E = rng.normal(size=(12, d)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    Et = torch.from_numpy(E)
    # item 0: persona 0 (members 1, 2; text 9), persona 1 (member 3; text 10); item 1: persona 2 (member 4; text 11)
    members = [[1, 2], [3], [4]]
    catalog = Catalog(["I0", "I1"], _csr([2, 1]), _csr(map(len, members)), np.array([1, 2, 3, 4]),
                      np.array([9, 10, 11]))
    # examples: own interaction a member of persona 0 (text 1); the only member of persona 1 (text
    # 3); no member, though another user's identical text 2 is (membership is by interaction)
    train = Examples(np.array([0, 1, 2]), lists_of([[5], [6], [8]]), np.array([0, 0, 0]), lists_of([[1], [1], [1]]),
                     lists_of([[0], [0], [0]]), own=np.array([1, 3, 2]), own_slot=np.array([0, 1, -1]))
    data = RerankData([f"t{i}" for i in range(12)], catalog, train, None)
    s = TrainSettings(in_batch_negatives=False)

    def by_hand(n: int, members_of_item0) -> torch.Tensor:
        """the loss of example n alone, on a catalogue whose item 0 has these member lists"""
        cat = Catalog(["I0", "I1"], _csr([2, 1]), _csr(map(len, [*members_of_item0, [4]])),
                      np.array([t for m in [*members_of_item0, [4]] for t in m]), np.array([9, 10, 11]))
        alone = Examples(train.user[[n]], lists_of([train.history.of(n)]), train.positive[[n]],
                         lists_of([train.negatives.of(n)]), lists_of([[0]]))
        return rerank.batch_loss(Et, None, RerankData(data.texts, cat, alone, None), np.array([0]), s, 0.9)

    for n, item0 in ((0, [[2], [3]]), (1, [[1, 2], [10]]), (2, [[1, 2], [3]])):
        got = rerank.batch_loss(Et, None, data, np.array([n]), s, 0.9)
        assert torch.isclose(got, by_hand(n, item0), atol=1e-6), n
    # the leak it removes: with the own text kept, example 0's loss is another number
    assert not torch.isclose(rerank.batch_loss(Et, None, data, np.array([0]), s, 0.9), by_hand(0, [[1, 2], [3]]))
    # in a batch, only each example's own positive changes: the same figures row by row
    rows = np.arange(3)
    together = rerank.batch_loss(Et, None, data, rows, s, 0.9)
    assert torch.isclose(together, torch.stack([by_hand(n, m) for n, m in
                                                ((0, [[2], [3]]), (1, [[1, 2], [10]]), (2, [[1, 2], [3]]))]).mean())


@pytest.mark.unit
def test_a_validation_target_is_scored_without_the_users_own_review_of_it():
    """A production run's sampled lists read every review, so the held-out item's centroid holds
    the user's review of it; validate scores the target as a recommendation would see it."""
    E = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
    # item 0 (the target): one persona, members 1 (the user's own review, like their history text 5)
    # and 2; item 1: one persona, member 3
    catalog = Catalog(["I0", "I1"], _csr([1, 1]), _csr([2, 1]), np.array([1, 2, 3]), np.array([0, 4]))

    def pure(own, slot):
        val = Validation(["g"], lists_of([[5]]), lists_of([[1, 0]]), Lists(_csr([2]), np.array([1.0, np.nan])),
                         np.array([1]), SAMPLED, own, slot)
        data = RerankData([f"t{i}" for i in range(6)], catalog, None, val)
        return rerank.validate(torch.from_numpy(E), None, data, 0.9, (1.0,))["generators"]["g"]["pure"]

    assert pure(None, None) == pytest.approx(1.0)  # with the review inside: first, 0.707 against 0.6
    assert pure(np.array([1]), np.array([0])) == pytest.approx(1 / np.log2(3))  # without it: second, 0 against 0.6
    # the same text, but the user's interaction is no member (an evaluation): nothing is left out
    assert pure(np.array([1]), np.array([-1])) == pytest.approx(1.0)


@pytest.mark.unit
def test_the_rerank_head_learns_what_the_untuned_encoder_cannot_and_keeps_the_best_epoch():
    data, E = toy_data(np.random.default_rng(0))
    s = TrainSettings(rerank_epochs=15, rerank_batch_size=16, rerank_learning_rate=0.01, rerank_patience=15)
    result = rerank.fit(E, data, s, 0.9, (0.0, 0.5, 1.0))
    first, best = result.curve[0], result.curve[result.best_epoch]
    assert first["generators"]["als"]["pure"] < 0.5 < best["generators"]["als"]["pure"], result.curve
    assert best["selection"] == max(c["selection"] for c in result.curve)
    assert result.curve[1]["train_loss"] > result.curve[-1]["train_loss"]
    # the kept head is the best epoch's: validating with it reproduces that epoch's figure
    again = rerank.validate(torch.from_numpy(E), torch.from_numpy(result.head), data, 0.9, (0.0, 0.5, 1.0))
    assert again["selection"] == pytest.approx(best["selection"]) and again["served"] == pytest.approx(best["served"])


@pytest.mark.unit
def test_the_checkpoint_is_chosen_on_what_will_be_served():
    """train.selection: served measures the blend at the α scoring uses. Served at α 0 (the
    generator's own order, which no head changes) no epoch is better than the un-tuned encoder, so
    the identity head is kept although the pure rerank improves; selected on the pure rerank, or
    served at the α validation chooses (auto), training is kept."""
    data, E = toy_data(np.random.default_rng(0))
    s = TrainSettings(rerank_epochs=4, rerank_batch_size=16, rerank_learning_rate=0.01, rerank_patience=4)
    grid = (0.0, 0.5, 1.0)
    at_zero = rerank.fit(E, data, s, 0.9, grid, served_alpha=0.0)
    assert at_zero.best_epoch == 0 and np.array_equal(at_zero.head, np.eye(E.shape[1], dtype=np.float32))
    assert at_zero.curve[-1]["pure"] > at_zero.curve[0]["pure"]  # training did help the pure rerank
    assert {c["served"] for c in at_zero.curve} == {at_zero.curve[0]["generators"]["als"]["generator"]}
    for selection in ("pure", "served"):
        kept = rerank.fit(E, data, replace(s, selection=selection), 0.9, grid)
        assert kept.best_epoch > 0
        assert kept.curve[kept.best_epoch][selection] == max(c[selection] for c in kept.curve)


@pytest.mark.unit
def test_the_served_figure_is_the_blend_at_the_served_alpha_or_the_pure_rerank_without_generator_ranks():
    data, E = toy_data(np.random.default_rng(2))
    E = torch.from_numpy(E)
    auto = rerank.validate(E, None, data, 0.9, (0.0, 0.5, 1.0))
    m = auto["generators"]["als"]
    assert m["served_alpha"] == m["best_alpha"] and m["served"] == m["best_blend"] == max(m["blend"].values())
    assert auto["selection"] == auto["served"] and auto["pure"] == m["pure"]
    fixed = rerank.validate(E, None, data, 0.9, (0.0, 0.5, 1.0), served_alpha=0.0, selection="pure")
    f = fixed["generators"]["als"]
    assert f["served_alpha"] == 0.0 and f["served"] == f["generator"] and fixed["selection"] == f["pure"]
    val = data.validation  # without the generator's ranks of the target (sampled lists): the pure rerank
    cf = Lists(val.cf_score.ptr, np.full(len(val.cf_score.values), np.nan))
    sampled = replace(data, validation=replace(val, cf_score=cf, protocol=SAMPLED))
    g = rerank.validate(E, None, sampled, 0.9, (0.0, 0.5, 1.0), served_alpha=0.5)["generators"]["als"]
    assert g["served_alpha"] == 1.0 and g["served"] == g["pure"] and g["generator"] is None


@pytest.mark.unit
def test_no_epoch_better_than_the_untuned_encoder_keeps_the_identity_head():
    data, E = toy_data(np.random.default_rng(1))
    s = TrainSettings(rerank_epochs=2, rerank_batch_size=16, rerank_learning_rate=1e-9, rerank_patience=1)
    result = rerank.fit(E, data, s, 0.9, (1.0,))
    assert result.best_epoch == 0 and np.array_equal(result.head, np.eye(E.shape[1], dtype=np.float32))


@pytest.mark.unit
def test_validation_ranks_by_the_max_over_personas_and_ties_keep_the_generators_order():
    # one user (history: text 0), three candidates in the generator's order; item 2 has two
    # personas, one of them equal to the user: its max is 1, the others score lower.
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
    catalog = Catalog(["A", "B", "C"], _csr([1, 1, 2]), _csr([1, 1, 1, 1]), np.array([1, 2, 4, 3]))

    def data(target, cf):
        val = Validation(["g"], lists_of([[0]]), lists_of([[0, 1, 2]]), Lists(_csr([3]), np.array(cf, dtype=float)),
                         np.array([target]), LEAVE_ONE_OUT)
        return RerankData([], catalog, None, val)

    m = rerank.validate(E, None, data(2, [3.0, 2.0, 1.0]), 0.9, (0.0, 1.0))["generators"]["g"]
    assert m["pure"] == pytest.approx(1.0)  # C (max over its personas = 1.0) ranks first
    assert m["generator"] == pytest.approx(1 / np.log2(4))  # third in the generator's order
    assert m["blend"][0.0] == pytest.approx(m["generator"])  # α = 0 is the generator's order
    # A and B tie at 0 with a user vector orthogonal to both: the generator's order breaks it
    E2 = E.clone()
    E2[0] = torch.tensor([0.7071, -0.7071])
    E2[1], E2[2] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])
    tie = rerank.validate(E2, None, data(1, [3.0, 2.0, 1.0]), 0.9, (1.0,))["generators"]["g"]
    assert tie["pure"] == pytest.approx(1 / np.log2(3))  # B behind A (same score, A first) = rank 2
    missed = rerank.validate(E, None, data(-1, [3.0, 2.0, 1.0]), 0.9, (1.0,))["generators"]["g"]
    assert missed["pure"] == 0 and missed["generator"] == 0


def metrics(pure, blend, generator, selection=None):
    return {"selection": pure if selection is None else selection,
            "generators": {"als": {"pure": pure, "blend": {1.0: pure, **blend}, "generator": generator}}}


@pytest.mark.unit
def test_the_gate_refuses_a_challenger_below_the_generator_at_the_served_alpha():
    untuned = metrics(0.02, {}, 0.05)
    # pure rerank below ALS: refused when served pure ...
    ok, reason = decide_ranking(metrics(0.04, {0.5: 0.06}, 0.05), None, untuned, {"als": 1.0}, 0.0)
    assert not ok and "below als alone" in reason
    # ... promoted when served at the α whose blend beats ALS
    ok, reason = decide_ranking(metrics(0.04, {0.5: 0.06}, 0.05), None, untuned, {"als": 0.5}, 0.0)
    assert ok and reason == "no champion yet"
    # below the un-tuned encoder; not better than the champion; no generator ranks (sampled lists)
    ok, reason = decide_ranking(metrics(0.06, {}, 0.05), None, metrics(0.07, {}, 0.05), {"als": 1.0}, 0.0)
    assert not ok and "un-tuned" in reason
    ok, reason = decide_ranking(metrics(0.06, {}, 0.05), metrics(0.061, {}, 0.05), untuned, {"als": 1.0}, 0.0)
    assert not ok and "does not beat champion" in reason
    ok, reason = decide_ranking(metrics(0.06, {}, None), metrics(0.05, {}, None), untuned, {"als": 1.0}, 0.0)
    assert ok and "generator not compared" in reason
    assert not decide_ranking(metrics(float("nan"), {}, 0.05), None, untuned, {}, 0.0)[0]


def rerank_tables(spark, cfg, users=36, items=18, modes=("evaluation",)):
    """Synthetic tables for the rerank job: item i has one persona of colour i % 3; users of
    theme t review five items of colour t with their sport; candidates in random order, but for the
    validation item, which the generator ranks third."""
    rng = random.Random(0)
    store = TableStore(spark, cfg)
    reviews, splits, cands = [], [], []
    personas = [(f"I{i}#0", f"I{i}", 0, f"The {COLOURS[i % 3]} collector", f"Wants {COLOURS[i % 3]} editions.",
                 f"Picks {COLOURS[i % 3]}.", f"The {COLOURS[i % 3]} collector. Wants {COLOURS[i % 3]} editions.",
                 "llm", 3, "succeeded", None, None, None) for i in range(items)]
    for u in range(users):
        t = u % 3
        mine = rng.sample([i for i in range(items) if i % 3 == t], 5)
        for seq, i in enumerate(mine, start=1):
            ts = 1_000 + seq * 10 + (seq == 2) * -10  # items 1 and 2 the same day: seq orders them
            split = "train" if seq <= 3 else ("validation" if seq == 4 else "test")
            splits.append((f"U{u}", f"I{i}", ts, seq, split))
            reviews.append((f"U{u}", f"I{i}", 5.0, ts, None, f"{SPORTS[t]} gear for weekends", None, None,
                            "amazon2018", "synthetic", seq))
        train_items = set(mine[:3])
        for mode in modes:
            pool = [i for i in range(items) if i not in (train_items if mode == "evaluation" else set(mine))]
            rng.shuffle(pool)
            if mode == "evaluation":  # the generator ranks the validation item third: NDCG@10 0.5
                pool.remove(mine[3])
                pool.insert(2, mine[3])
            for r, i in enumerate(pool[:12], start=1):
                cands.append((mode, "als", f"U{u}", f"I{i}", 1.0 / r, r, "cf"))
    summaries = [(f"I{i}", f"Item {i}, a general product.", "llm", "succeeded", None, None, None) for i in range(items)]
    store.upsert(spark.createDataFrame(reviews, REVIEWS.schema), REVIEWS)
    store.upsert(spark.createDataFrame(splits, SPLITS.schema), SPLITS)
    store.upsert(spark.createDataFrame(summaries, ITEM_SUMMARIES.schema), ITEM_SUMMARIES)
    store.upsert(spark.createDataFrame(personas, ITEM_PERSONAS.schema), ITEM_PERSONAS)
    store.upsert(spark.createDataFrame(cands, CANDIDATES.schema), CANDIDATES)
    return store


def rerank_config(tmp_path, *extra):
    return make_config(tmp_path, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                       f"mlflow.artifact_root={tmp_path / 'mlruns'}", "train.max_seq_length=32", "profile.k=5",
                       "profile.interaction_text=review", "train.rerank_batch_size=16",
                       "train.rerank_learning_rate=0.01", "train.rerank_epochs=12", "train.rerank_patience=12",
                       "train.hard_negatives=8", *extra)


@pytest.mark.spark
def test_rerank_lists_exclude_the_users_items_and_follow_the_scoring_window(spark, tmp_path):
    from persona4rec.training.lists import collect

    cfg = rerank_config(tmp_path, "mode=evaluation")
    store = rerank_tables(spark, cfg)
    data = collect(store, cfg)
    splits = {(r.user_id, r.item_id): r for r in store.read("splits").collect()}
    owned, trained = {}, {}
    for (u, i), r in splits.items():
        owned.setdefault(u, set()).add(i)
        if r.split == "train":
            trained.setdefault(u, set()).add(i)
    held_out_negatives = 0
    items = data.catalog.item_ids
    text_of = data.texts
    assert len(data.train) == 36 * 2  # train items 2 and 3 of each user (item 1 has no history)
    for n in range(len(data.train)):
        user = data.train.user_ids[data.train.user[n]]
        negatives = {items[j] for j in data.train.negatives.of(n)}
        # an evaluation knows the training items only: the held-out ones are the labels, not masked
        assert negatives and not negatives & trained[user]
        held_out_negatives += len(negatives & (owned[user] - trained[user]))
        assert len(negatives) <= 8
        me = splits[(user, items[data.train.positive[n]])]
        # history = the training items before it in (ts, item_id) order: a same-day one counts
        before = [r for (u, _), r in splits.items() if u == user and r.split == "train"
                  and (r.ts, r.item_id) < (me.ts, me.item_id)]
        assert len(data.train.history.of(n)) == len(before)
        assert len(before) >= 1
        assert {text_of[t] for t in data.train.history.of(n)} == {f"{SPORTS[int(user[1:]) % 3]} gear for weekends"}
        assert text_of[data.train.own[n]] == f"{SPORTS[int(user[1:]) % 3]} gear for weekends"  # its own review
    assert held_out_negatives > 0  # the generator ranks each validation item third
    # each persona's own text travels with the catalogue (the vector of a persona left with no member)
    assert [text_of[t] for t in data.catalog.persona_tid] == [
        f"The {COLOURS[int(i[1:]) % 3]} collector. Wants {COLOURS[int(i[1:]) % 3]} editions." for i in items]
    same_day = [(u, i) for (u, i), r in splits.items() if r.ts == 1010 and r.split == "train"]
    assert len(same_day) == 2 * 36  # every user's first two items share a day: both orders were checked
    assert data.validation.protocol == LEAVE_ONE_OUT and len(data.validation) == 36
    for n in range(len(data.validation)):
        assert len(data.validation.history.of(n)) == 3  # the user's training interactions
    assert (data.validation.target >= 0).sum() > 0  # some validation items are among the candidates
    assert (data.train.aligned == -1).all()  # train.alignment_weight 0: the pairs are not read
    assert (data.train.own_slot == -1).all() and (data.validation.own_slot == -1).all()  # no membership yet

    # train.alignment_weight > 0: each example carries its aligned persona's position in its item
    # (-1 without a pair, or for a pair naming another item's persona)
    train_rows = sorted((u, i, r.ts) for (u, i), r in splits.items() if r.split == "train")
    # a second persona per item, index 1, whose id sorts before the first one's: positions follow
    # persona_index, not the id
    extra = [(f"I{i}#!", f"I{i}", 1, "The gift giver", "Buys it as a present.", "Gifts.",
              "The gift giver. Buys it as a present.", "llm", 3, "succeeded", None, None, None) for i in range(18)]
    store.upsert(spark.createDataFrame(extra, ITEM_PERSONAS.schema), ITEM_PERSONAS)
    target = {0: "I999#0", 1: "{}#0", 2: "{}#!"}
    pairs = [(u, i, ts, target[n % 3].format(i), "j", [], "cluster", None, None, None)
             for n, (u, i, ts) in enumerate(train_rows)]
    store.upsert(spark.createDataFrame(pairs, ALIGNMENT_PAIRS.schema), ALIGNMENT_PAIRS)
    weighted = collect(store, rerank_config(tmp_path, "mode=evaluation", "train.alignment_weight=0.5"))
    named = {(u, i): pid for u, i, _, pid, *_ in pairs}
    for n in range(len(weighted.train)):
        key = (weighted.train.user_ids[weighted.train.user[n]], weighted.catalog.item_ids[weighted.train.positive[n]])
        expected = {key[1] + "#0": 0, key[1] + "#!": 1}.get(named[key], -1)
        assert weighted.train.aligned[n] == expected, (key, named[key])
    assert {0, 1, -1} <= set(weighted.train.aligned.tolist())
    # the pairs are also the centroids' membership: each example's own interaction sits in the
    # persona it is aligned to (matched by user and item), whose position is its own_slot
    assert (weighted.train.own_slot == weighted.train.aligned).all()
    assert all(weighted.texts[t] == f"{SPORTS[int(weighted.train.user_ids[u][1:]) % 3]} gear for weekends"
               for t, u in zip(weighted.train.own, weighted.train.user))
    # an evaluation's held-out interactions are no members, though other users' identical texts are
    assert (weighted.validation.own_slot == -1).all()

    production = rerank_config(tmp_path / "production", "mode=production")  # no evaluation-mode candidates
    prod_store = rerank_tables(spark, production, modes=("production",))
    sampled = collect(prod_store, production)
    owned = {}
    for r in prod_store.read("splits").collect():
        owned.setdefault(r.user_id, set()).add(r.item_id)
    assert sampled.validation.protocol == SAMPLED
    assert (sampled.validation.target == sampled.validation.candidates.ptr[1:] - sampled.validation.candidates.ptr[
        :-1] - 1).all()  # the held-out item appended last
    assert np.isnan(sampled.validation.cf_score.values).sum() == len(sampled.validation)
    assert (sampled.validation.own_slot == -1).all()  # no membership table: nothing to leave out
    # production clusters read every review: with the validation interactions among the members,
    # each target's own interaction is left out of its persona (position 0)
    prod_pairs = [(r.user_id, r.item_id, r.ts, f"{r.item_id}#0", "j", [], "cluster", None, None, None)
                  for r in prod_store.read("splits").collect()]
    prod_store.upsert(spark.createDataFrame(prod_pairs, ALIGNMENT_PAIRS.schema), ALIGNMENT_PAIRS)
    members = collect(prod_store, production)
    assert (members.validation.own_slot == 0).all() and (members.validation.own >= 0).all()
    assert (members.train.own_slot == 0).all()
    items = sampled.catalog.item_ids
    for n in range(len(sampled.train)):  # production knows every interaction: none is a negative
        user = sampled.train.user_ids[sampled.train.user[n]]
        assert not {items[j] for j in sampled.train.negatives.of(n)} & owned[user]


@pytest.mark.spark
@pytest.mark.slow
def test_the_rerank_job_trains_registers_a_served_head_and_the_gate_refuses_a_worse_model(spark, tmp_path,
                                                                                         monkeypatch):
    from persona4rec.training import job, promote
    from persona4rec.training.encoder import load_encoder
    from persona4rec.training.registry import CHALLENGER, CHAMPION, blend_alpha, register, setup_mlflow

    cfg = rerank_config(tmp_path, "mode=evaluation")
    rerank_tables(spark, cfg)
    report, served = job.fit(spark, cfg)
    assert report.final["best_epoch"] >= 1
    assert report.final["val_ndcg10_als"] > report.baseline["val_ndcg10_als"] + 0.2, report
    assert report.final["val_generator_ndcg10_als"] == pytest.approx(0.5)
    assert report.final["val_ndcg10_als"] > 0.5
    client = setup_mlflow(cfg)
    name = cfg.mlflow.registered_model
    run = client.get_run(report.run_id)
    history = client.get_metric_history(report.run_id, "val_ndcg10_als")
    assert [m.step for m in history][:2] == [0, 1] and "validation_ndcg10.png" in \
        [a.path for a in client.list_artifacts(report.run_id)]
    assert run.data.params["train.objective"] == "rerank"
    assert blend_alpha(cfg, report.model_version, "als") is not None
    # what is served is the encoder with its head: normalize(W · base(text))
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{CHALLENGER}")
    texts = ["tennis gear for weekends", "The teal collector. Wants teal editions."]
    base = load_encoder(cfg.train.base_model, "cpu", 32).encode(texts, normalize_embeddings=True)
    head = served[len(served) - 2].linear.weight.detach().numpy()
    expected = base @ head.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(np.asarray(pyfunc.predict(texts)), expected, atol=1e-5)
    assert not np.allclose(head, np.eye(len(head)))

    first = promote.run(spark, cfg)
    assert first.promoted and first.metric == "validation_ndcg10", first
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == report.model_version
    # a rerun: the champion is the challenger — measured once (it and the un-tuned encoder), and
    # the version's promotion tags stay "promoted"
    again, validated = promote_counting(spark, cfg, monkeypatch, rerank, "validate")
    assert not again.promoted and again.reason == "challenger is already the champion" and validated == 2
    assert client.get_model_version(name, report.model_version).tags["promotion_decision"] == "promoted"
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.decision = 'unchanged'")) == 1

    # a random head (its rerank below the generator's on validation) is refused
    torch.manual_seed(3)
    broken = rerank.with_head(load_encoder(cfg.train.base_model, "cpu", 32), torch.randn(384, 384).numpy())
    with mlflow.start_run(run_name="broken"):
        v2 = register(cfg, client, broken, ["x"], {})
    second = promote.run(spark, cfg)
    assert not second.promoted and second.challenger_version == v2
    assert "below als alone" in second.reason, second
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == report.model_version
    assert client.get_model_version(name, v2).tags["promotion_decision"] == "refused"

    # a model trained with the paper's objective is served for the same rerank: the same gate
    paper = rerank_config(tmp_path, "mode=evaluation", "train.objective=alignment")
    with mlflow.start_run(run_name="broken-paper"):
        v3 = register(paper, client, broken, ["x"], {})
    third = promote.run(spark, paper)
    assert not third.promoted and third.challenger_version == v3 and third.metric == "validation_ndcg10", third
    assert "below als alone" in third.reason, third
    # with scoring.alpha auto and no α chosen for it (only the rerank trainer tags one), the gate
    # judges the challenger at its best α on the same lists and tags it, as scoring will read it
    auto = rerank_config(tmp_path, "mode=evaluation", "train.objective=alignment", "scoring.alpha=auto")
    with mlflow.start_run(run_name="untuned-paper"):
        v4 = register(auto, client, load_encoder(cfg.train.base_model, "cpu", 32), ["x"], {})
    assert blend_alpha(auto, v4, "als") is None
    fourth = promote.run(spark, auto)
    assert not fourth.promoted and "does not beat champion" in fourth.reason, fourth
    assert blend_alpha(auto, v4, "als") is not None
    # ... and compares it on what is served with auto (train.selection: served), the blend at that α
    logged = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'promote'",
                                order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
    assert fourth.challenger_score == pytest.approx(logged["metrics.challenger_val_served_ndcg10_als"])
    assert logged["metrics.challenger_val_served_ndcg10_als"] != logged["metrics.challenger_val_ndcg10_als"]

    # trained for a numeric α that is not on the grid: every epoch is measured, and the checkpoint
    # chosen, at that α
    off_grid = rerank_config(tmp_path, "mode=evaluation", "scoring.alpha=0.35")
    trained, _ = job.fit(spark, off_grid)
    path = mlflow.artifacts.download_artifacts(run_id=trained.run_id, artifact_path="validation_curve.json")
    curve = json.loads(open(path).read())
    assert {c["generators"]["als"]["served_alpha"] for c in curve} == {0.35}
    kept = curve[trained.final["best_epoch"]]
    assert kept["selection"] == max(c["selection"] for c in curve) == kept["generators"]["als"]["blend"]["0.35"]
    assert client.get_model_version(name, trained.model_version).tags["selection"] == "served"
