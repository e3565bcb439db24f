"""User profiles: the last k history interactions strictly before each interaction, by windows."""

import numpy as np
import pytest

from persona4rec.alignment.profiles import profiles


def reference(rows, k, splits):
    """Plain Python: for each row, the last k rows of the same user from `splits` with an earlier ts."""
    out = {}
    for u, i, ts, seq, split, text in rows:
        earlier = sorted((r for r in rows if r[0] == u and r[4] in splits and r[2] < ts), key=lambda r: (r[2], r[3]))
        out[(u, i)] = [(r[1], r[2], r[5]) for r in earlier[-k:]] if k else []
    return out


@pytest.mark.spark
@pytest.mark.parametrize("k,splits", [(3, ("train",)), (1, ("train", "validation")), (10, ("train",))])
def test_profiles_equal_a_plain_python_reference(spark, k, splits):
    rng = np.random.default_rng(3)
    rows = []
    for u in range(6):
        n = 40 if u == 0 else int(rng.integers(1, 8))  # user 0 is heavy
        times = np.sort(rng.integers(0, 15, n))  # repeated timestamps: same-time history is not "earlier"
        for seq, ts in enumerate(times):
            split = "test" if seq == n - 1 else ("validation" if seq == n - 2 else "train")
            rows.append((f"U{u}", f"I{u}-{seq}", int(ts), seq, split, f"text {u}-{seq}"))
    texts = spark.createDataFrame(rows, "user_id string, item_id string, ts long, seq int, split string, text string")
    got = {(r["user_id"], r["item_id"]): [(h["item_id"], h["ts"], h["text"]) for h in r["history"]]
           for r in profiles(texts, k, splits).collect()}
    assert got == reference(rows, k, splits)
    assert max(len(h) for h in got.values()) == k


def profiles_by_copy(texts, k, splits=("train",)):
    """The previous implementation (every user's whole history copied onto each of their rows, then
    filtered): quadratic, kept here as the reference the windows must reproduce."""
    from pyspark.sql import functions as F

    hist = texts.filter(F.col("split").isin(*splits))
    per_user = hist.groupBy("user_id").agg(F.sort_array(F.collect_list(F.struct("ts", "seq", "item_id", "text")))
                                           .alias("_all"))
    rows = texts.join(per_user, "user_id", "left")
    earlier = F.filter(F.coalesce("_all", F.array()), lambda h: h["ts"] < F.col("ts"))
    n = F.size(earlier)
    last_k = F.when(n > k, F.slice(earlier, n - k + 1, k)).otherwise(earlier)
    return rows.select("user_id", "item_id", F.transform(last_k, lambda h: F.struct(
        h["item_id"].alias("item_id"), h["ts"].alias("ts"), h["text"].alias("text"))).alias("history"))


@pytest.mark.spark
def test_windowed_profiles_equal_the_previous_ones_on_the_shipped_sample(spark, extractive_run):
    from persona4rec.alignment.profiles import stored_interaction_texts
    from persona4rec.tables import TableStore

    _, cfg, _ = extractive_run
    texts = stored_interaction_texts(TableStore(spark, cfg), cfg).persist()
    for k, splits in ((cfg.profile.k, ("train",)), (2, ("train", "validation"))):
        new = {(r.user_id, r.item_id): r.history for r in profiles(texts, k, splits).collect()}
        old = {(r.user_id, r.item_id): r.history for r in profiles_by_copy(texts, k, splits).collect()}
        assert new == old and len(new) == texts.count()
        longest = max(len(h) for h in new.values())  # sample histories are short: k = 2 is reached
        assert longest == 2 if k == 2 else 0 < longest <= k
    texts.unpersist()
