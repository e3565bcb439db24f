"""Batch scoring: Eq. 10 against plain numpy, candidate and persona integrity, safe explanations."""

import datetime as dt
import re

import numpy as np
import pytest
from pyspark.sql import functions as F

from conftest import make_config
from persona4rec.errors import InputError
from persona4rec.schemas import CANDIDATES, INTERACTION_EMBEDDINGS, PERSONA_INDEX
from persona4rec.scoring import score
from persona4rec.scoring.explain import sanitize
from persona4rec.scoring.rank import PersonaMatrix, blend_rows, decayed_user_vectors, max_sim
from persona4rec.training.encoder import user_vector
from persona4rec.tables import TableStore

NASTY = ("<b>Jazz</b> lover. Write to jazz.fan@example.com or call +1 (555) 123-4567, "
         "see https://evil.example/x?y=1 and www.spam.net <script>alert(1)</script>")


@pytest.mark.unit
def test_sanitize_removes_markup_links_addresses_and_phones():
    out = sanitize(NASTY, 500)
    assert "<" not in out and ">" not in out
    assert not re.search(r"https?://|www\.|\.net|@|555|123-4567", out)
    assert "Jazz lover" in out
    assert len(sanitize("word " * 200, 50)) <= 50


@pytest.mark.unit
def test_scoring_index_takes_the_layouts_texts_by_persona_id_or_computes_the_same_ones():
    import pyarrow as pa

    from persona4rec.scoring.explain import persona_texts

    rng = np.random.default_rng(3)
    rows = [("I2", "I2#0", NASTY, "Reads on trains.", "Wants short stories."), ("I1", "I1#0", "Jazz fan", "d", "r"),
            ("I2", "I2#1", "Night owl", "Listens late.", "Quiet tone."), ("I3", "I3#0", "Gift giver", "x", "y")]
    table = pa.table({"item_id": [r[0] for r in rows], "persona_id": [r[1] for r in rows],
                      "name": [r[2] for r in rows], "description": [r[3] for r in rows],
                      "preference_rationale": [r[4] for r in rows],
                      "embedding": [list(v) for v in rng.normal(size=(4, 8)).astype(np.float32)]})
    local = score.ScoringIndex.build(table, 80)
    # the layout's texts, in another order and without I3#0 (a persona the layout lacks gets none)
    pairs = {r[1]: persona_texts(r[2], r[3], r[4], 80) for r in rows[:3]}
    texts = pa.table({"persona_id": list(reversed(pairs)), "persona_name": [pairs[k][0] for k in reversed(pairs)],
                      "explanation": [pairs[k][1] for k in reversed(pairs)]})
    taken = score.ScoringIndex.build(table.select(["item_id", "persona_id", "embedding"]), 80, texts=texts)
    bare = score.ScoringIndex.build(table.select(["item_id", "persona_id", "embedding"]), 80, texts=False)
    # slots: rows I1, I2, I3 × 2 personas; padded cells are null
    assert local.persona_id.to_pylist() == ["I1#0", None, "I2#0", "I2#1", "I3#0", None]
    assert taken.persona_id.equals(local.persona_id) and bare.persona_id.equals(local.persona_id)
    assert local.explanation[2].as_py() == persona_texts(*rows[0][2:], 80)[1] and "evil" not in str(local.explanation)
    assert taken.explanation.to_pylist()[:4] == local.explanation.to_pylist()[:4]
    assert taken.persona_name.to_pylist()[:4] == local.persona_name.to_pylist()[:4]
    assert taken.explanation[4].as_py() is None and local.explanation[4].as_py() is not None
    assert bare.explanation.null_count == 6 and bare.persona_name.null_count == 6
    np.testing.assert_array_equal(taken.pm.vectors, local.pm.vectors)


@pytest.mark.unit
def test_max_sim_equals_brute_force():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(11, 8)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    items = ["a", "a", "b", "c", "c", "c", "d", "e", "e", "f", "f"]
    pm = PersonaMatrix.build(items, vec)
    users = rng.normal(size=(5, 8)).astype(np.float32)
    cand = ["c", "a", "f", "b", "e"]
    s, b = max_sim(users, np.array([pm.item_index[c] for c in cand]), pm)
    for n, c in enumerate(cand):
        sims = [float(users[n] @ vec[j]) for j, it in enumerate(items) if it == c]
        assert s[n] == pytest.approx(max(sims), abs=1e-6)
        best = pm.slots[pm.item_index[c], b[n]]  # the input position of the winning persona
        assert best == [j for j, it in enumerate(items) if it == c][int(np.argmax(sims))]

    # Recurring items (scored by one product per item) and rare ones (gathered) give the same.
    many = np.array([pm.item_index[c] for c in [*rng.choice(["a", "b", "c", "e", "f"], 300), "d", "d"]])
    users = rng.normal(size=(len(many), 8)).astype(np.float32)
    s, b = max_sim(users, many, pm, chunk=7)
    sims = np.where(pm.mask[many], np.einsum("nd,nwd->nw", users, pm.vectors[many]), -np.inf)
    assert np.allclose(s, sims.max(axis=1), atol=1e-6) and (b == sims.argmax(axis=1)).all()
    assert max_sim(users[:0], many[:0], pm)[0].shape == (0,)


def blend(persona, cf, alpha):
    """Plain per-user reference of rank.blend_rows: α·z(persona) + (1−α)·z(cf)."""
    if alpha >= 1.0:
        return persona.astype(np.float64)
    z = lambda x: np.zeros_like(x) if x.std() < 1e-12 else (x - x.mean()) / x.std()
    return alpha * z(persona.astype(np.float64)) + (1 - alpha) * z(cf.astype(np.float64))


@pytest.mark.unit
def test_blend_alpha_one_is_the_pure_persona_order():
    p, cf = np.array([0.1, 0.9, 0.5]), np.array([3.0, 1.0, 2.0])
    valid = np.ones((1, 3), dtype=bool)
    assert list(np.argsort(-blend_rows(p[None], cf[None], valid, 1.0)[0])) == [1, 2, 0]
    assert list(np.argsort(-blend_rows(p[None], cf[None], valid, 0.0)[0])) == [0, 2, 1]


@pytest.mark.unit
def test_batched_user_vectors_and_blend_equal_the_per_user_versions():
    rng = np.random.default_rng(3)
    counts = np.array([3, 0, 1, 5])
    flat = rng.normal(size=(counts.sum(), 6)).astype(np.float32)
    got = decayed_user_vectors(flat, counts, 0.7)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for n, c in enumerate(counts):
        want = user_vector(flat[starts[n]:starts[n] + c], 0.7) if c else np.zeros(6)
        np.testing.assert_allclose(got[n], want, atol=1e-6)
    p, cf = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    for alpha in (0.0, 0.3, 1.0):
        rows = blend_rows(p, cf, valid, alpha)
        for r in range(3):
            np.testing.assert_allclose(rows[r, valid[r]], blend(p[r, valid[r]], cf[r, valid[r]], alpha), atol=1e-12)


@pytest.mark.unit
def test_rank_candidates_keeps_cf_order_without_history_and_never_rewards_unindexed_items():
    vec = np.eye(3, dtype=np.float32)
    pm = PersonaMatrix.build(["a", "b", "c"], vec)
    users = np.array([[0, 0, 1], [0, 0, 0]], dtype=np.float32)  # user 0 likes c; user 1 has no history
    rows = np.array([pm.item_index["a"], -1, pm.item_index["c"], pm.item_index["a"], pm.item_index["b"]])
    cf = np.array([3.0, 2.0, 1.0, 2.0, 1.0])
    cf_rank = np.array([1, 2, 3, 1, 2])
    r = score.rank_candidates(users, np.array([True, False]), np.array([3, 2]), rows, cf, cf_rank, pm, 1.0, 2)
    assert list(r.user) == [0, 0, 1, 1]
    assert list(r.candidate) == [2, 0, 3, 4]  # c first (persona match); the unindexed item never outranks a
    assert list(r.rank) == [1, 2, 1, 2]
    assert list(r.slot[2:]) == [-1, -1] and list(r.score[2:]) == [2.0, 1.0]


def synthetic(spark, cfg, users=30, items=25, d=16, personas=3, cands=12, seed=0):
    """Evaluation-mode tables: persona index, train-split history embeddings and candidates."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    pvec = unit(rng.normal(size=(items, personas, d)))
    index = [(f"I{i}#{p}", f"I{i}", p, f"Persona {i}.{p}", NASTY if (i + p) % 4 == 0 else f"Likes item {i}",
              "Because of reasons.", pvec[i, p].tolist(), "v1") for i in range(items) for p in range(personas)]
    hist, cand = [], []
    history = {}
    for u in range(users):
        n = 3 + u % 12
        history[u] = unit(rng.normal(size=(n, d)))
        for s in range(n):
            hist.append((f"U{u}", f"H{s}", 100 + s, s + 1, "train", "h", history[u][s].tolist(), "v1"))
        for r, i in enumerate(rng.choice(items, cands, replace=False), start=1):
            cand.append(("evaluation", "bpr", f"U{u}", f"I{i}", float(cands - r), r, "cf"))
    store = TableStore(spark, cfg)
    store.upsert(spark.createDataFrame(index, PERSONA_INDEX.schema), PERSONA_INDEX)
    store.upsert(spark.createDataFrame(hist, INTERACTION_EMBEDDINGS.schema), INTERACTION_EMBEDDINGS)
    store.upsert(spark.createDataFrame(cand, CANDIDATES.schema), CANDIDATES)
    return store, pvec, history


@pytest.mark.spark
def test_scores_match_numpy_eq10_and_outputs_are_consistent(spark, tmp_path, caplog):
    cfg = make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", "profile.k=10",
                      "profile.gamma=0.8", "scoring.top_k=10", "scoring.explanation_max_chars=160")
    store, pvec, history = synthetic(spark, cfg)
    with caplog.at_level("INFO", logger="persona4rec.scoring"):
        first = score.run(spark, cfg)
    assert "persona layout written" in caplog.text and "e-mail texts" in caplog.text  # broadcast: texts only
    assert first["users"] == 30 and first["rows"] == 300 and first["users_by_path"] == {"cf": 30}
    assert first["user_vectors_recomputed"] == 30
    recs = store.read("recommendations").collect()

    for r in recs:
        u = int(r.user_id[1:])
        assert r.has_history and r.mode == "evaluation" and r.path == "cf"
        h = history[u][-10:]
        w = 0.8 ** np.arange(len(h) - 1, -1, -1)
        uv = (w[:, None] * h).sum(0) / w.sum()
        uv /= np.linalg.norm(uv)
        item = int(r.item_id[1:])
        sims = pvec[item] @ uv
        assert r.persona_score == pytest.approx(float(sims.max()), abs=1e-5)
        assert r.persona_id == f"I{item}#{int(sims.argmax())}"
        assert r.persona_id.split("#")[0] == r.item_id  # the explanation names one of the item's personas
        assert r.explanation.startswith(f"For {r.persona_name}:")
        assert len(r.explanation) <= 160
        assert not re.search(r"<|>|https?://|www\.|@|555", r.explanation)

    cands = {(c.user_id, c.item_id) for c in store.read("candidates").collect()}
    assert all((r.user_id, r.item_id) in cands for r in recs)
    by_user = {}
    for r in recs:
        by_user.setdefault(r.user_id, []).append(r)
    for rows in by_user.values():
        rows.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, 11))
        assert all(a.score >= b.score for a, b in zip(rows, rows[1:]))

    caplog.clear()
    with caplog.at_level("INFO", logger="persona4rec.scoring"):
        again = score.run(spark, cfg)
    assert again["rows"] == 300 and again["user_vectors_recomputed"] == 0  # nothing changed
    assert "persona blocks reused" in caplog.text  # the texts of this index version are not computed twice
    # the driver-computed texts (recommend without a layout folder) give the same rows
    index = store.read("persona_index")
    vectors = store.read("user_vectors")
    direct = score.recommend(spark, store.read("candidates").filter(F.col("mode") == "evaluation"), vectors, index,
                             cfg, "v1", dt.date(2026, 1, 2), "bpr", 1.0).collect()
    key = lambda r: (r.user_id, r["rank"])
    assert sorted((key(r), r.item_id, r.persona_id, r.persona_name, r.explanation) for r in direct) == \
        sorted((key(r), r.item_id, r.persona_id, r.persona_name, r.explanation) for r in recs)
    day = store.read("recommendations").filter(F.col("run_date") == "2026-01-02")
    assert day.count() == 300 and day.select("user_id", "rank").distinct().count() == 300

    # One new interaction for U0: only U0's vector is recomputed, and it equals the numpy one.
    new = np.ones(16, dtype=np.float32) / 4.0
    store.upsert(spark.createDataFrame([("U0", "Hnew", 999, 99, "train", "h", new.tolist(), "v1")],
                                       INTERACTION_EMBEDDINGS.schema), INTERACTION_EMBEDDINGS)
    third = score.run(spark, cfg)
    assert third["user_vectors_recomputed"] == 1
    h = np.vstack([history[0], new])[-10:]
    w = 0.8 ** np.arange(len(h) - 1, -1, -1)
    want = (w[:, None] * h).sum(0)
    got = store.read("user_vectors").filter("user_id = 'U0'").first()
    np.testing.assert_allclose(got.vector, want / np.linalg.norm(want), atol=1e-6)
    assert got.n_history == len(history[0]) + 1

    # A user with candidates but no history embedding of this model version: the run stops
    # instead of mailing them generic CF picks.
    store.upsert(spark.createDataFrame([("evaluation", "bpr", "U99", "I1", 1.0, 1, "cf")], CANDIDATES.schema),
                 CANDIDATES)
    with pytest.raises(InputError, match=r"1 user\(s\) to score have no user vector for model version v1 .*'U99'"):
        score.run(spark, cfg)
    assert store.read("recommendations").count() == 300  # nothing was written


def recommendations(store):
    return {(r.user_id, r["rank"]): r for r in store.read("recommendations").collect()}


@pytest.mark.spark
@pytest.mark.parametrize("alpha", ["1.0", "0.5"])
def test_item_blocks_give_the_same_recommendations_as_the_broadcast_index(spark, tmp_path, alpha, caplog):
    cfg = make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", f"scoring.alpha={alpha}",
                      "scoring.top_k=10")
    store, _, _ = synthetic(spark, cfg)
    # an item the index lacks, among U1's candidates: no persona score on either path
    store.upsert(spark.createDataFrame([("evaluation", "bpr", "U1", "I999", 20.0, 13, "cf")], CANDIDATES.schema),
                 CANDIDATES)
    score.run(spark, cfg)
    broadcast = recommendations(store)
    # the index is 25 items × 3 personas × 16 dims × 4 bytes ≈ 0.0046 MB: a 0.001 MB budget makes 7 blocks
    blocked_cfg = make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", f"scoring.alpha={alpha}",
                              "scoring.top_k=10", "scoring.index_budget_mb=0.001")
    with caplog.at_level("INFO", logger="persona4rec.scoring"):
        score.run(spark, blocked_cfg)
    blocked = recommendations(store)
    assert re.search(r"scored in 7 item blocks", caplog.text) and "persona layout written" in caplog.text
    # the layout stays for the next night's run of the same persona_index version, which reuses it
    layouts = {p.parents[2].name for p in (tmp_path / "warehouse").rglob("block-*")}
    assert len(layouts) == 1 and layouts.pop().startswith("persona_index-v")
    caplog.clear()
    with caplog.at_level("INFO", logger="persona4rec.scoring"):
        score.run(spark, blocked_cfg)
    assert "persona blocks reused" in caplog.text and recommendations(store).keys() == blocked.keys()
    assert broadcast.keys() == blocked.keys() and len(blocked) == 300
    for key, a in broadcast.items():
        b = blocked[key]
        for col in ("item_id", "persona_id", "persona_name", "explanation", "cf_rank", "has_history", "path"):
            assert a[col] == b[col], (key, col)
        assert b.score == pytest.approx(a.score, abs=1e-6)  # float32 sums in another order
        assert (a.persona_score is None and b.persona_score is None) or \
            b.persona_score == pytest.approx(a.persona_score, abs=1e-6)


@pytest.mark.spark
def test_the_broadcast_budget_counts_the_personas_e_mail_texts(spark, tmp_path, caplog):
    # 25 items × 3 personas: tensor 0.0046 MB (16 dims, float32) fits 0.01 MB; with the texts
    # (75 × (240 + 120) bytes ≈ 0.026 MB) the broadcast would not: one item block instead.
    cfg = make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", "scoring.index_budget_mb=0.01")
    synthetic(spark, cfg)
    with caplog.at_level("INFO", logger="persona4rec.scoring"):
        assert score.run(spark, cfg)["users"] == 30
    assert re.search(r"= 0 MB \(float32\) \+ 0 MB of texts > scoring.index_budget_mb 0.01: scored in 1 item blocks",
                     caplog.text)


@pytest.mark.spark
def test_a_float16_index_scores_within_1e_3_of_float32(spark, tmp_path):
    cfg = make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", "scoring.top_k=12")
    store, _, _ = synthetic(spark, cfg)
    score.run(spark, cfg)
    full = {(r.user_id, r.item_id): r.persona_score for r in recommendations(store).values()}
    for budget in ("1024", "0.001"):  # broadcast and blocked
        score.run(spark, make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", "scoring.top_k=12",
                                     "scoring.index_dtype=float16", f"scoring.index_budget_mb={budget}"))
        half = {(r.user_id, r.item_id): r.persona_score for r in recommendations(store).values()}
        assert half.keys() == full.keys()  # top 12 of 12 candidates: every pair on both sides
        assert max(abs(half[k] - full[k]) for k in full) < 1e-3


@pytest.mark.spark
def test_only_the_interactions_a_user_vector_reads_are_embedded(spark):
    from persona4rec.scoring.window import vector_inputs
    # U1: 25 interactions, the last 6 outside the training split; U2: 2 (fewer than k)
    rows = [("U1", f"I{t}", t, 0, "train" if t < 19 else ("validation" if t < 22 else "test"), f"text {t}")
            for t in range(25)] + [("U2", "A", 5, 0, "train", "a"), ("U2", "B", 5, 1, "test", "b")]
    texts = spark.createDataFrame(rows, "user_id string, item_id string, ts long, seq int, split string, text string")
    kept = {(r.user_id, r.ts, r.seq) for r in vector_inputs(texts, 3, ("train",)).collect()}
    # U1: the last 3 overall (22-24) and the last 3 training ones (16-18); U2: both
    assert kept == {("U1", t, 0) for t in (16, 17, 18, 22, 23, 24)} | {("U2", 5, 0), ("U2", 5, 1)}


@pytest.mark.spark
def test_vectors_are_looked_up_by_text_and_a_missing_text_fails_the_query(spark):
    import hashlib

    from persona4rec.scoring.embedding import with_vectors
    vectors = spark.createDataFrame([(hashlib.sha256(t.encode()).hexdigest(), [float(i), 1.0], "3#abc")
                                     for i, t in enumerate(["jazz", "chess"])],
                                    "text_hash string, embedding array<float>, model_version string")
    rows = spark.createDataFrame([("u1", "chess"), ("u2", "jazz"), ("u3", "chess")], "user_id string, t string")
    got = {r.user_id: (r.t, list(r.embedding), r.model_version) for r in with_vectors(rows, "t", vectors).collect()}
    assert got == {"u1": ("chess", [1.0, 1.0], "3#abc"), "u2": ("jazz", [0.0, 1.0], "3#abc"),
                   "u3": ("chess", [1.0, 1.0], "3#abc")}
    unknown = rows.unionByName(spark.createDataFrame([("u4", "knitting")], "user_id string, t string"))
    knitting = hashlib.sha256(b"knitting").hexdigest()
    with pytest.raises(Exception, match=rf"no embedding for a text of column 't' \(text_hash {knitting}\)"):
        with_vectors(unknown, "t", vectors).collect()


@pytest.mark.spark
def test_a_run_needing_more_history_than_build_index_embedded_fails(spark, tmp_path):
    from persona4rec.scoring.window import WINDOW_PROPERTY, check_window, window_value
    cfg = make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02")
    store, _, _ = synthetic(spark, cfg)
    check_window(store, 50, ("validation",))  # a table without the property holds every interaction
    before = store.version("interaction_embeddings")
    store.set_properties("interaction_embeddings", {WINDOW_PROPERTY: window_value(10, ("train",))})
    store.set_properties("interaction_embeddings", {WINDOW_PROPERTY: window_value(10, ("train",))})
    assert store.version("interaction_embeddings") == before + 1  # an unchanged value commits nothing
    check_window(store, 10, ("train",))
    check_window(store, 5, None)  # production: the last 10 overall hold any user's last 5
    with pytest.raises(InputError, match=r"holds each user's last 10 .* needs the last 20: rerun build_index"):
        check_window(store, 20, None)
    with pytest.raises(InputError, match=r"history splits train\), this run needs the last 10 of train,validation"):
        check_window(store, 10, ("train", "validation"))
    with pytest.raises(InputError, match="needs the last 20"):
        score.run(spark, make_config(tmp_path, "mode=evaluation", "scoring.run_date=2026-01-02", "profile.k=20"))
