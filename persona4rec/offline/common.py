"""What the offline stages share: which reviews may be used, and running with an LLM endpoint."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pandas as pd
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


def per_item(batches: Iterator[pd.DataFrame], build: Callable[[pd.DataFrame], list[dict]],
             columns: list[str]) -> Iterator[pd.DataFrame]:
    """Inside mapInPandas over rows sorted by item: call `build` once per item with all of that
    item's rows (an item may straddle Arrow batches: its rows are carried to the next batch)."""
    carry = None
    for pdf in batches:
        pdf = pdf if carry is None else pd.concat([carry, pdf], ignore_index=True)
        last = pdf[ITEM_ID].iloc[-1]
        carry, done = pdf[pdf[ITEM_ID] == last], pdf[pdf[ITEM_ID] != last]
        out = [row for _, rows in done.groupby(ITEM_ID, sort=True) for row in build(rows)]
        if out:
            yield pd.DataFrame(out, columns=columns)
    if carry is not None and len(carry):
        yield pd.DataFrame(build(carry), columns=columns)


@contextlib.contextmanager
def endpoint_for(cfg: Config, endpoint: Endpoint | None) -> Iterator[Endpoint]:
    """Use the caller's endpoint (the pipeline shares one embedded server), else open one."""
    if endpoint is not None:
        yield endpoint
        return
    with llm_endpoint(cfg) as opened:
        yield opened
