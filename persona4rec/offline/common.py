"""What the offline stages share: which reviews may be used, and running with an LLM endpoint."""

from __future__ import annotations

import contextlib
from typing import Iterator

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from persona4rec.config import Config
from persona4rec.llm.embedded import llm_endpoint
from persona4rec.llm.runner import Endpoint
from persona4rec.schemas import ITEM_ID, SPLIT, TRAIN, USER_ID
from persona4rec.tables import TableStore


def usable_reviews(store: TableStore, cfg: Config) -> DataFrame:
    """Reviews the offline stages may read. In evaluation mode the reviews of validation and
    test interactions are left out, so personas never describe what the model is tested on."""
    reviews = store.read("reviews")
    if not cfg.offline.evaluation_mode:
        return reviews
    held_out = store.read("splits").filter(F.col(SPLIT) != TRAIN).select(USER_ID, ITEM_ID)
    return reviews.join(held_out, [USER_ID, ITEM_ID], "left_anti")


@contextlib.contextmanager
def endpoint_for(cfg: Config, endpoint: Endpoint | None) -> Iterator[Endpoint]:
    """Use the caller's endpoint (the pipeline shares one embedded server), else open one."""
    if endpoint is not None:
        yield endpoint
        return
    with llm_endpoint(cfg) as opened:
        yield opened
