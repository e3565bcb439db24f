"""The rerank objective's data, built in Spark from the tables scoring reads (training/rerank.py).

Everything refers to texts by a dense integer id, so a text (an interaction text, a persona's
member text) is held and embedded once however many examples, histories or centroids use it:

* texts: tid → text — the training interaction texts of the sampled users and the member texts
  of the personas of every item the examples or the validation lists name. In Spark a text is
  named by a 64-bit hash of it, so histories and centroids carry integers, each text crosses to
  the driver once, and a user's items travel once per user (not once per example: that would be
  quadratic in a long history).
* catalog: per item, its personas, per persona the tids its vector averages
  (`scoring.personas`: centroid members, else the persona text itself).
* examples: one per training interaction with an earlier one (the user's next item is the
  positive): the tids of the user's last k training interactions before it in (ts, seq) order —
  the order scoring's window uses, so same-day purchases count as history as they do when
  scoring — and the hard negatives: the generator's top candidates for the user (every
  generator's, best rank first) minus every item the user is known to have interacted with
  (items the user buys later are no negatives): every interaction in production, the training
  split in an evaluation (the held-out items are the labels: masking them would leak them).
  Each example also carries its own interaction text's tid (`own`) and, when that interaction is
  one of the members its positive item's centroids average, that persona's position
  (`own_slot`, matched by user and item, not by text); each persona carries its text's tid
  (`Catalog.persona_tid`). The loss leaves the example's text out of that centroid.
* validation lists (`protocol = leave_one_out`): each user's validation item among the
  evaluation-mode candidates of each generator, the history being the user's last k training
  interactions — exactly the `evaluate` job's validation protocol, so the metric the checkpoint is
  chosen on is the one the blend α is chosen on. Without evaluation-mode candidates (a production
  run) the validation item is appended to the user's candidates (`protocol = sampled`; the
  generator's own rank of it is unknown, so only the pure rerank is measured).

Sizes: `train.max_examples` bounds the training examples (users beyond it are sampled by a hash of
their id, all of a user's examples or none), the validation users are sampled with the same
fraction; what reaches the driver is proportional to that sample, not to the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.alignment.profiles import stored_interaction_texts, stored_interactions
from persona4rec.config import EVALUATION, Config
from persona4rec.errors import InputError
from persona4rec.schemas import (ALIGNMENT_PAIRS, CANDIDATES, ITEM_ID, ITEM_PERSONAS, SPLIT, TEST, TRAIN, TS, USER_ID,
                                 VALIDATION)
from persona4rec.scoring.personas import persona_members
from persona4rec.tables import TableStore

log = logging.getLogger(__name__)
LEAVE_ONE_OUT, SAMPLED = "leave_one_out", "sampled"


@dataclass
class Catalog:
    """Items → personas → member tids, as CSR arrays (item row i has personas
    persona_ptr[i]:persona_ptr[i+1]; persona p averages member_tid[member_ptr[p]:member_ptr[p+1]])."""
    item_ids: list[str]
    persona_ptr: np.ndarray
    member_ptr: np.ndarray
    member_tid: np.ndarray
    # per persona row: the tid of its own text — its vector when no member is left (what the index
    # does for a persona nobody's interaction is assigned to); None = its members only
    persona_tid: np.ndarray | None = None

    def row(self) -> dict[str, int]:
        return {item: r for r, item in enumerate(self.item_ids)}


@dataclass
class Lists:
    """Ragged per-row lists as CSR: row r holds values[ptr[r]:ptr[r+1]]."""
    ptr: np.ndarray
    values: np.ndarray

    def of(self, r: int) -> np.ndarray:
        return self.values[self.ptr[r]:self.ptr[r + 1]]


@dataclass
class Examples:
    user: np.ndarray  # user row (an index into `user_items`)
    history: Lists  # tids, oldest first
    positive: np.ndarray  # item row
    negatives: Lists  # item rows, best generator rank first
    user_items: Lists  # per user row: every item row the user interacted with (masked as negatives)
    user_ids: list[str] | None = None  # per user row
    # per example: the position among its item's personas of the persona aligned to (user, item) —
    # the judge's or the review cluster's (alignment_pairs) — or -1 (train.alignment_weight)
    aligned: np.ndarray | None = None
    # per example: the tid of its own interaction text (user, positive item), and the position
    # among the positive's personas of the one whose centroid averages that interaction, or -1.
    # The review clusters and the judge's pairs are built from the interactions a run may read, so
    # an example's own interaction usually is a member; a recommended item never holds its
    # reader's review, so the loss leaves it out (rerank.left_out). None = nothing to leave out.
    own: np.ndarray | None = None
    own_slot: np.ndarray | None = None

    def owned_keys(self, n_items: int) -> np.ndarray:
        """Sorted user_row · n_items + item_row of every (user, item) in `user_items`: one array
        searched per batch, so masking costs the batch's cells, not each user's whole history."""
        users = np.repeat(np.arange(len(self.user_items.ptr) - 1), np.diff(self.user_items.ptr))
        return np.sort(users * n_items + self.user_items.values)

    def __len__(self) -> int:
        return len(self.positive)


@dataclass
class Validation:
    generator: list[str]  # per list
    history: Lists  # tids
    candidates: Lists  # item rows (the generator's order)
    cf_score: Lists  # float64, NaN for an appended target
    target: np.ndarray  # position of the target within its list, -1 where the generator missed it
    protocol: str
    # per list, likewise: the user's text with the target and the target's persona whose centroid
    # averages that interaction (a production run's sampled lists; never in an evaluation, whose
    # clusters hold no held-out interaction), or -1
    own: np.ndarray | None = None
    own_slot: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class RerankData:
    texts: list[str]
    catalog: Catalog
    train: Examples
    validation: Validation


def _csr(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.fromiter(lengths, dtype=np.int64))]).astype(np.int64)


def _lists(column: pa.ChunkedArray, mapping: dict | None = None, dtype=np.int64) -> Lists:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if mapping is not None:
        flat = np.array([mapping[v] for v in flat], dtype=dtype)
    return Lists(offsets - offsets[0], np.asarray(flat, dtype=dtype))


def sample_fraction(n: int, cap: int) -> float:
    return 1.0 if n <= cap else cap / n


def _user_sample(col, fraction: float, seed: int):
    return (F.abs(F.xxhash64(F.lit(seed), col)) % 1_000_000) < int(round(fraction * 1_000_000))


def rerank_frames(store: TableStore, cfg: Config, validation_only: bool = False) -> dict[str, DataFrame]:
    """The Spark frames behind `RerankData` (see the module docstring)."""
    k, s = cfg.profile.k, cfg.train
    texts = stored_interaction_texts(store, cfg).withColumn("tkey", F.xxhash64("text"))
    train_rows = texts.filter(F.col(SPLIT) == TRAIN)
    by_time = Window.partitionBy(USER_ID).orderBy(TS, "seq")
    examples = (train_rows.withColumn("history", F.collect_list("tkey").over(by_time.rowsBetween(-k, -1)))
                .filter(F.size("history") > 0).select(USER_ID, ITEM_ID, "history", F.col("tkey").alias("own")))
    n_examples = examples.count()  # the gate (validation_only) samples the validation users as training did
    fraction = sample_fraction(n_examples, s.max_examples)
    if fraction < 1.0:
        log.info("rerank training: %d examples > train.max_examples %d: sampling %.3f of the users", n_examples,
                 s.max_examples, fraction)
        examples = examples.filter(_user_sample(F.col(USER_ID), fraction, s.seed))
    # What the user is known to have: in production every interaction; in an evaluation the
    # training split only — masking the held-out items as negatives would use the labels.
    interactions = stored_interactions(store)
    if cfg.mode == EVALUATION:
        interactions = interactions.filter(~F.col(SPLIT).isin(VALIDATION, TEST))
    user_items = interactions.groupBy(USER_ID).agg(F.collect_set(ITEM_ID).alias("user_items"))
    candidates = store.read(CANDIDATES.name)
    # Hard negatives: the generators' candidates of either mode (the nightly's, or an evaluation
    # run's when the training job runs before any nightly): both are the generator's best unseen
    # items for the user, and every item the user ever interacted with is removed below.
    negatives = (candidates.join(interactions.select(USER_ID, ITEM_ID), [USER_ID, ITEM_ID], "left_anti")
                 .groupBy(USER_ID, ITEM_ID).agg(F.min("cf_rank").alias("r"))
                 .withColumn("_n", F.row_number().over(Window.partitionBy(USER_ID).orderBy("r", ITEM_ID)))
                 .filter(F.col("_n") <= s.hard_negatives)
                 .groupBy(USER_ID).agg(F.sort_array(F.collect_list(F.struct("r", ITEM_ID))).alias("_neg"))
                 .select(USER_ID, F.transform("_neg", lambda x: x[ITEM_ID]).alias("negatives")))
    examples = (examples.join(negatives, USER_ID, "left")
                .withColumn("negatives", F.coalesce("negatives", F.array().cast("array<string>"))))
    # a persona's position among its item's personas (the catalogue's persona_index order); a
    # pair naming another item's persona, or one gone from item_personas, has none
    position = store.read(ITEM_PERSONAS.name).select(ITEM_ID, "persona_id", (F.row_number().over(
        Window.partitionBy(ITEM_ID).orderBy("persona_index", "persona_id")) - 1).cast("int").alias("slot"))
    members = persona_members(store, cfg)
    if members is not None:  # which persona's centroid averages each interaction (at most one)
        own_at = members.select(USER_ID, ITEM_ID, "persona_id").join(position, [ITEM_ID, "persona_id"]) \
            .groupBy(USER_ID, ITEM_ID).agg(F.min("slot").alias("own_slot"))
        examples = examples.join(own_at, [USER_ID, ITEM_ID], "left")
    else:
        examples = examples.withColumn("own_slot", F.lit(None).cast("int"))
    if s.alignment_weight > 0 and store.exists(ALIGNMENT_PAIRS.name):
        aligned = store.read(ALIGNMENT_PAIRS.name).select(USER_ID, ITEM_ID, "persona_id") \
            .join(position.withColumnRenamed("slot", "aligned"), [ITEM_ID, "persona_id"]) \
            .select(USER_ID, ITEM_ID, "aligned")
        examples = examples.join(aligned, [USER_ID, ITEM_ID], "left")  # one pair per (user, item): its keys
    else:
        if s.alignment_weight > 0:
            log.warning("train.alignment_weight=%s but no %s table (run align): training without the "
                        "alignment term", s.alignment_weight, ALIGNMENT_PAIRS.name)
        examples = examples.withColumn("aligned", F.lit(None).cast("int"))
    if validation_only:
        examples = examples.limit(0)
    users = user_items.join(examples.select(USER_ID), USER_ID, "left_semi")  # one row per user: linear

    # validation: the held-out item among each generator's candidates, history = last k training rows
    last_train = (train_rows.withColumn("_n", F.row_number().over(
        Window.partitionBy(USER_ID).orderBy(F.col(TS).desc(), F.col("seq").desc())))
        .filter(F.col("_n") <= k)
        .groupBy(USER_ID).agg(F.sort_array(F.collect_list(F.struct(TS, "seq", "tkey"))).alias("_h"))
        .select(USER_ID, F.transform("_h", lambda h: h["tkey"]).alias("history")))
    targets = stored_interactions(store).filter(F.col(SPLIT) == VALIDATION).select(USER_ID, F.col(ITEM_ID).alias("target"))
    if fraction < 1.0:
        targets = targets.filter(_user_sample(F.col(USER_ID), fraction, s.seed))
    held_out = candidates.filter(F.col("mode") == EVALUATION)
    protocol = LEAVE_ONE_OUT if (cfg.mode == EVALUATION or held_out.limit(1).count()) else SAMPLED
    pool = held_out if protocol == LEAVE_ONE_OUT else candidates.filter(F.col("mode") == cfg.mode)
    lists = (pool.select("generator", USER_ID, ITEM_ID, "cf_score", "cf_rank").join(targets, USER_ID)
             .groupBy("generator", USER_ID, "target")
             .agg(F.sort_array(F.collect_list(F.struct("cf_rank", ITEM_ID, "cf_score"))).alias("_c")))
    if protocol == SAMPLED:  # the target is a known interaction there: never among the candidates
        lists = lists.withColumn("_c", F.concat(F.filter("_c", lambda c: c[ITEM_ID] != F.col("target")), F.array(
            F.struct(F.lit(1 << 30).alias("cf_rank"), F.col("target").alias(ITEM_ID),
                     F.lit(None).cast("double").alias("cf_score")))))
    validation = (lists.join(last_train, USER_ID)
                  .select("generator", USER_ID, "history", "target",
                          F.transform("_c", lambda c: c[ITEM_ID]).alias("candidates"),
                          F.transform("_c", lambda c: c["cf_score"]).alias("cf_score")))
    # a target whose centroid averages the user's own interaction with it (a production run's
    # clusters read every review): its text, left out of that centroid when validating
    held_out_texts = None
    if members is not None:
        held_out_texts = (texts.filter(F.col(SPLIT) == VALIDATION)
                          .join(own_at, [USER_ID, ITEM_ID])
                          .select(USER_ID, F.col(ITEM_ID).alias("target"), F.col("tkey").alias("own"), "own_slot",
                                  "text"))
        validation = validation.join(held_out_texts.drop("text"), [USER_ID, "target"], "left")
    else:
        validation = validation.withColumn("own", F.lit(None).cast("bigint")) \
            .withColumn("own_slot", F.lit(None).cast("int"))

    items = (examples.select(F.explode(F.array_union(F.array(ITEM_ID), "negatives")).alias(ITEM_ID))
             .unionByName(validation.select(F.explode("candidates").alias(ITEM_ID))).distinct())
    personas = store.read(ITEM_PERSONAS.name).join(items, ITEM_ID, "left_semi")
    if members is not None:
        members = members.join(personas.select("persona_id"), "persona_id", "left_semi") \
            .withColumn("tkey", F.xxhash64("text"))
        personas = personas.join(members.groupBy("persona_id").agg(F.collect_list("tkey").alias("members")),
                                 "persona_id", "left")
    else:
        personas = personas.withColumn("members", F.lit(None).cast("array<bigint>"))
    own_text = F.xxhash64("persona_text")
    personas = personas.select(ITEM_ID, "persona_index", "persona_id", "persona_text", own_text.alias("own_text"),
                               F.coalesce("members", F.array(own_text)).alias("members"))
    # every text a key above names, once (a 64-bit hash collision among the sample's texts would
    # merge two texts: ~n²/2⁶⁵, negligible at millions of texts)
    needed = examples.select(USER_ID).unionByName(validation.select(USER_ID)).distinct()
    text_rows = train_rows.join(needed, USER_ID, "left_semi").select("tkey", "text") \
        .unionByName(personas.select(own_text.alias("tkey"), F.col("persona_text").alias("text")))
    if members is not None:
        text_rows = text_rows.unionByName(members.select("tkey", "text")).unionByName(
            held_out_texts.join(validation.select(USER_ID, "target").distinct(), [USER_ID, "target"], "left_semi")
            .select(F.col("own").alias("tkey"), "text"))
    return {"examples": examples, "users": users, "validation": validation, "personas": personas.drop("persona_text"),
            "texts": text_rows.dropDuplicates(["tkey"]), "protocol": protocol}


def collect(store: TableStore, cfg: Config, validation_only: bool = False) -> RerankData:
    """rerank_frames, brought to the driver as Arrow and turned into id arrays."""
    frames = rerank_frames(store, cfg, validation_only)
    ex = frames["examples"].select(USER_ID, ITEM_ID, "history", "negatives", "aligned", "own", "own_slot").toArrow()
    owners = frames["users"].toArrow()
    text_table = frames["texts"].toArrow()
    val = frames["validation"].orderBy("generator", USER_ID).toArrow()
    per = frames["personas"].orderBy(ITEM_ID, "persona_index", "persona_id").toArrow()
    if not validation_only and ex.num_rows < 2:
        raise InputError(f"only {ex.num_rows} training example(s) for train.objective=rerank: it needs training "
                         "interactions with an earlier one, and candidates (run generate_candidates first)")
    ordered = text_table.column("text").to_pylist()
    tid_of = {key: n for n, key in enumerate(text_table.column("tkey").to_pylist())}
    tid = tid_of.__getitem__

    item_ids = sorted(set(per.column(ITEM_ID).to_pylist()))
    item_row = {item: r for r, item in enumerate(item_ids)}
    p_items = per.column(ITEM_ID).to_pylist()
    p_members = per.column("members").to_pylist()
    counts = np.zeros(len(item_ids), dtype=np.int64)
    for item in p_items:
        counts[item_row[item]] += 1
    member_lists = [[tid(t) for t in m] for m in p_members]
    catalog = Catalog(item_ids, _csr(counts), _csr([len(m) for m in member_lists]),
                      np.array([t for m in member_lists for t in m], dtype=np.int64),
                      np.array([tid(t) for t in per.column("own_text").to_pylist()], dtype=np.int64))

    def known(items: list[str]) -> list[int]:  # items without a persona (none in practice) are left out
        return [item_row[i] for i in items if i in item_row]

    users = {u: n for n, u in enumerate(owners.column(USER_ID).to_pylist())}
    user_items_rows = {users[u]: known(owned) for u, owned in
                       zip(owners.column(USER_ID).to_pylist(), owners.column("user_items").to_pylist())}
    positives, keep, histories, negs, aligned, own, own_slot = [], [], [], [], [], [], []
    for u, item, hist, neg, at, text, slot in zip(*(ex.column(c).to_pylist() for c in (
            USER_ID, ITEM_ID, "history", "negatives", "aligned", "own", "own_slot"))):
        if item not in item_row:
            continue
        aligned.append(-1 if at is None else at)
        own.append(tid(text))
        own_slot.append(-1 if slot is None else slot)
        positives.append(item_row[item])
        keep.append(users[u])
        histories.append([tid(t) for t in hist])
        negs.append(known(neg))
    train = Examples(np.array(keep, dtype=np.int64), Lists(_csr(map(len, histories)), np.array(
        [t for h in histories for t in h], dtype=np.int64)), np.array(positives, dtype=np.int64),
        Lists(_csr(map(len, negs)), np.array([t for n in negs for t in n], dtype=np.int64)),
        Lists(_csr([len(user_items_rows.get(r, [])) for r in range(len(users))]),
              np.array([t for r in range(len(users)) for t in user_items_rows.get(r, [])], dtype=np.int64)),
        list(users), np.array(aligned, dtype=np.int64), np.array(own, dtype=np.int64),
        np.array(own_slot, dtype=np.int64))

    v_hist, v_cands, v_cf, v_target, v_gen, v_own, v_slot = [], [], [], [], [], [], []
    for gen, hist, target, cands, cf, text, slot in zip(*(val.column(c).to_pylist() for c in (
            "generator", "history", "target", "candidates", "cf_score", "own", "own_slot"))):
        v_own.append(-1 if text is None else tid(text))
        v_slot.append(-1 if slot is None else slot)
        keep_at = [j for j, c in enumerate(cands) if c in item_row]
        cands = [cands[j] for j in keep_at]
        v_gen.append(gen)
        v_hist.append([tid(t) for t in hist])
        v_cands.append([item_row[c] for c in cands])
        v_cf.append([np.nan if cf[j] is None else cf[j] for j in keep_at])
        v_target.append(cands.index(target) if target in cands else -1)
    validation = Validation(v_gen, Lists(_csr(map(len, v_hist)), np.array([t for h in v_hist for t in h], dtype=np.int64)),
                            Lists(_csr(map(len, v_cands)), np.array([c for cs in v_cands for c in cs], dtype=np.int64)),
                            Lists(_csr(map(len, v_cf)), np.array([x for cs in v_cf for x in cs], dtype=np.float64)),
                            np.array(v_target, dtype=np.int64), frames["protocol"], np.array(v_own, dtype=np.int64),
                            np.array(v_slot, dtype=np.int64))
    log.info("rerank data: %d training examples, %d validation lists (%s), %d items, %d personas, %d texts",
             len(train), len(validation), validation.protocol, len(item_ids), len(member_lists), len(ordered))
    if cfg.train.alignment_weight > 0:
        several = np.diff(catalog.persona_ptr)[train.positive] >= 2
        log.info("alignment term: %d of %d examples have an aligned persona on an item with 2+ personas",
                 int(((train.aligned >= 0) & several).sum()), len(train))
    return RerankData(ordered, catalog, train, validation)
