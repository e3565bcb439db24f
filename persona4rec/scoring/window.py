"""Which interactions `build_index` embeds: the window every user vector reads, and its check.

Kept apart from index.py (which loads the encoder stack) so that `score_users` checks the window
without importing torch on the driver.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from persona4rec.errors import InputError
from persona4rec.schemas import INTERACTION_EMBEDDINGS, SPLIT, TS, USER_ID
from persona4rec.tables import TableStore

WINDOW_PROPERTY = "persona4rec.embedded_window"


def window_value(k: int, splits: tuple[str, ...]) -> str:
    return f"k={k};history_splits={','.join(sorted(splits))}"


def check_window(store: TableStore, k: int, splits: tuple[str, ...] | None) -> None:
    """Fail when interaction_embeddings was built for a smaller k (or, in evaluation, other
    history splits) than a user vector now needs: its rows would silently be too few."""
    held = store.properties(INTERACTION_EMBEDDINGS.name).get(WINDOW_PROPERTY)
    if held is None:  # built before windows were kept: every interaction is there
        return
    fields = dict(part.split("=", 1) for part in held.split(";"))
    if int(fields["k"]) < k or (splits is not None and fields["history_splits"] != ",".join(sorted(splits))):
        raise InputError(f"interaction_embeddings holds each user's last {fields['k']} interactions (history splits "
                         f"{fields['history_splits']}), this run needs the last {k}"
                         f"{'' if splits is None else ' of ' + ','.join(sorted(splits))}: rerun build_index with "
                         f"the same profile.k and scoring.history_splits")


def vector_inputs(texts: DataFrame, k: int, splits: tuple[str, ...]) -> DataFrame:
    """The rows of `texts` some user vector reads (users.py: the last k by ts, seq): each user's
    last k overall and last k within `splits`."""
    newest = lambda *by: Window.partitionBy(USER_ID, *by).orderBy(F.col(TS).desc(), F.col("seq").desc())
    in_splits = F.col(SPLIT).isin(*splits)
    return texts.withColumn("_all", F.row_number().over(newest())) \
        .withColumn("_in", F.row_number().over(newest(in_splits))) \
        .filter((F.col("_all") <= k) | (in_splits & (F.col("_in") <= k))).drop("_all", "_in")
