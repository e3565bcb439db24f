"""Training examples from the Delta tables: alignment pairs joined with profiles and personas."""

from __future__ import annotations

from pyspark.sql import functions as F

from persona4rec.alignment.profiles import profiles, stored_interaction_texts
from persona4rec.config import Config
from persona4rec.schemas import ALIGNMENT_PAIRS, ITEM_ID, ITEM_PERSONAS, USER_ID
from persona4rec.tables import TableStore
from persona4rec.training.data import Example


def load_examples(store: TableStore, cfg: Config) -> list[Example]:
    """alignment_pairs ⋈ profiles ⋈ personas, collected to the driver (training is single-node)."""
    prof = profiles(stored_interaction_texts(store, cfg), cfg.profile.k)
    personas = store.read(ITEM_PERSONAS.name)
    per_item = personas.groupBy(ITEM_ID).agg(
        F.sort_array(F.collect_list(F.struct("persona_index", "persona_id", "persona_text"))).alias("all_personas"))
    rows = (store.read(ALIGNMENT_PAIRS.name).select(USER_ID, ITEM_ID, "persona_id")
            .join(prof.select(USER_ID, ITEM_ID, "history"), [USER_ID, ITEM_ID])
            .join(personas.select("persona_id", "persona_text"), "persona_id")
            .join(per_item, ITEM_ID)
            .orderBy(USER_ID, ITEM_ID).collect())
    return [Example(r[USER_ID], r[ITEM_ID], tuple(h["text"] for h in r["history"]), r["persona_id"],
                    r["persona_text"], tuple((p["persona_id"], p["persona_text"]) for p in r["all_personas"]))
            for r in rows if r["history"]]
