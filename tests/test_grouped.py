"""The grouped persona builder: aspect tuples grouped into voices, one LLM persona per group."""

import pytest
from pyspark.sql import functions as F

from conftest import make_config
from persona4rec.ingest import job as ingest
from persona4rec.llm.fake_server import FakeLLMServer, schema_name, schema_responder, user_text
from persona4rec.llm.outputs import Persona
from persona4rec.offline import aspects, grouped, personas, summarise
from persona4rec.scoring.embedding import worker_model
from persona4rec.tables import TableStore
from persona4rec.training.encoder import resolve_model_name

GIFT = {"value": "gift for grandchildren", "reason": "bought it for the kids in the family"}
PUZZLE = {"value": "crossword puzzles", "reason": "solves the puzzles on the train to work"}


def test_the_check_refuses_praise_and_a_repeated_sentence():
    good = Persona(name="Commuting puzzle solver", description="Solves crosswords on the train.",
                   preference_rationale="Fresh puzzles every month fit a daily commute.")
    grouped.check_group_persona({}, good)
    for bad in (good.model_copy(update={"name": "The Best Product Ever"}),
                good.model_copy(update={"name": "2 to 5 words"}), good.model_copy(update={"name": "2"}),
                good.model_copy(update={"preference_rationale": " solves crosswords on the  train."})):
        with pytest.raises(ValueError):
            grouped.check_group_persona({}, bad)


def test_two_voices_make_two_groups():
    model = worker_model(resolve_model_name("packaged:all-MiniLM-L6-v2"), 128)
    tuples = []
    for i in range(8):
        voice = GIFT if i % 2 else PUZZLE
        tuples.append({"user_id": f"U{i}", "rating": 5.0, "helpful_votes": 0,
                       "category_preference": voice["value"], "category_preference_reason": voice["reason"],
                       "purchase_purpose": voice["reason"], "purchase_purpose_reason": voice["reason"],
                       "quality_criteria": None, "usage_context": None})
    groups = grouped.group_tuples(tuples, model, 3, 7)
    assert sorted(len(g) for g in groups) == [4, 4]
    assert {frozenset(i % 2 for i in g) for g in groups} == {frozenset({0}), frozenset({1})}


def _voices(body: dict) -> dict:
    """Aspects in two voices (by a hash of the review), one persona per group that always takes
    the same name (so the builder must tell them apart), schema replies otherwise."""
    name = schema_name(body)
    if name == "ReviewAspects":
        voice = GIFT if sum(map(ord, user_text(body))) % 2 else PUZZLE
        return {"category_preference": voice, "purchase_purpose": voice, "quality_criteria": None,
                "usage_context": None}
    if name == "Persona":
        block = user_text(body).split("<aspects>")[1].split("</aspects>")[0]
        return {"name": "Loyal reader", "description": "Reads every issue cover to cover.",
                "preference_rationale": f"gift {block.count('grandchildren')}, puzzle {block.count('crossword')}"}
    return schema_responder(body)


def _aspects_ready(spark, tmp_path, srv):
    """A grouped-builder config against `srv`, with ingest, summaries and aspects done."""
    cfg = make_config(tmp_path, "llm.provider=openai", f"llm.base_url={srv.base_url}",
                      "llm.requests_per_minute=100000", "llm.backoff_initial_s=0.01",
                      "llm.backoff_max_s=0.05", "llm.timeout_s=5", "offline.persona_builder=grouped",
                      # The voices' reasons are synthetic, not quotes of the sample's reviews.
                      "offline.aspect_grounding=0")
    ingest.run(spark, cfg)
    for stage in (summarise, aspects):
        stage.run(spark, cfg)
    return cfg


@pytest.mark.spark
@pytest.mark.integration
def test_grouped_builder_writes_one_grounded_persona_per_voice(spark, tmp_path):
    with FakeLLMServer(_voices) as srv:
        cfg = _aspects_ready(spark, tmp_path, srv)
        first = personas.run(spark, cfg)
        calls = len(srv.log.requests)
        store = TableStore(spark, cfg)
        version = store.version("item_personas")
        second = personas.run(spark, cfg)
        assert len(srv.log.requests) == calls and second["llm"]["called"] == 0  # a rerun calls nothing
        assert store.version("item_personas") == version

    assert first["llm"]["task"] == grouped.TASK and first["llm"]["failed"] == 0
    rows = store.read("item_personas")
    kept = store.read("review_aspects").filter("kept").groupBy("item_id").agg(F.count("*").alias("tuples"))
    llm = rows.filter("source = 'llm'")
    # Support: every kept tuple is in exactly one persona's group.
    support = llm.groupBy("item_id").agg(F.sum("pool_size").alias("tuples"))
    assert sorted(support.collect()) == sorted(kept.collect())
    # Distinct by construction: the same name from two groups is told apart by the group's words.
    assert llm.groupBy("item_id", F.lower("name")).count().filter("count > 1").count() == 0
    assert llm.filter(F.col("name").contains("(")).count() > 0  # ... which happened here
    # Every item has a persona; items without kept tuples keep the summary-only one.
    items = store.read("items").select("item_id")
    assert items.join(rows, "item_id", "left_anti").count() == 0
    assert rows.filter("source = 'summary_only'").join(kept, "item_id").count() == 0
    # Grounded: where an item's reviewers split into voices, each persona's prompt held one voice
    # (a lone reviewer of the other voice is no persona: they join the nearest group).
    split_items = {r.item_id for r in llm.groupBy("item_id").count().filter("count > 1").collect()}
    for r in llm.filter(F.col("item_id").isin(*split_items)).collect():
        counts = dict(part.split() for part in r.preference_rationale.split(", "))
        assert min(int(counts["gift"]), int(counts["puzzle"])) <= 1 < max(int(counts["gift"]), int(counts["puzzle"])), r
    assert len(split_items) >= 5


@pytest.mark.spark
@pytest.mark.integration
def test_praise_is_reasked_and_then_falls_back_to_the_summary(spark, tmp_path):
    def praise(body):
        if schema_name(body) == "Persona":
            return {"name": "The Best Product Ever", "description": "Loves it.", "preference_rationale": "Loves it."}
        return schema_responder(body)

    with FakeLLMServer(praise) as srv:
        cfg = _aspects_ready(spark, tmp_path, srv)
        out = personas.run(spark, cfg)
    assert out["llm"]["failed"] == out["llm"]["requested"] > 0
    rows = TableStore(spark, cfg).read("item_personas")
    assert rows.filter("source = 'llm'").count() == 0
    assert rows.filter("source = 'summary_only' AND status = 'fallback'").count() > 0
