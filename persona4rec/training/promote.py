"""Job `promote_model`: move `@champion` to `@challenger` only when the challenger is better.

Both models are scored on the same held-out validation pairs (users the training never saw; the
split is the deterministic one of `train.seed` and `train.validation_fraction`) by top-1 persona
accuracy. Ties and small gains within `mlflow.promotion_margin` keep the current champion. The
decision, both scores and both versions are recorded as an MLflow run and as tags on the
challenger's model version, so every alias move can be audited.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import mlflow
from pyspark.sql import SparkSession

from persona4rec.config import Config
from persona4rec.tables import TableStore
from persona4rec.training.registry import CHALLENGER, CHAMPION, alias_version, load_alias, setup_mlflow
from persona4rec.training.source import open_examples
from persona4rec.training.trainer import evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    challenger_version: str | None
    champion_version: str | None
    challenger_score: float | None
    champion_score: float | None
    metric: str = "validation_top1_accuracy"

    def as_dict(self) -> dict:
        return asdict(self)


def decide(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    if math.isnan(challenger):
        return False, "challenger has no validation score"
    if champion is None:
        return True, "no champion yet"
    if challenger > champion + margin:
        return True, f"challenger beats champion by {challenger - champion:.4f} > margin {margin}"
    return False, f"challenger {challenger:.4f} does not beat champion {champion:.4f} by more than {margin}"


def run(spark: SparkSession, cfg: Config) -> Decision:
    client = setup_mlflow(cfg)
    name = cfg.mlflow.registered_model
    if alias_version(client, name, CHALLENGER) is None:
        raise LookupError(f"no @{CHALLENGER} version of '{name}' at {cfg.tracking_uri()}: run train_encoder first")
    with open_examples(TableStore(spark, cfg), cfg, validation_only=True) as (_, val_set):
        return _decide(cfg, client, name, val_set)


def _decide(cfg: Config, client, name: str, val_set) -> Decision:
    score = {}
    versions = {}
    for alias in (CHALLENGER, CHAMPION):
        model, version = load_alias(cfg, alias)
        versions[alias] = version
        if model is not None:
            score[alias] = evaluate(model, val_set, cfg.profile.gamma, cfg.train.temperature,
                                    cfg.train.batch_size)["top1_accuracy"]
    if versions[CHALLENGER] == versions[CHAMPION]:
        promoted, reason = False, "challenger is already the champion"
    else:
        promoted, reason = decide(score[CHALLENGER], score.get(CHAMPION), cfg.mlflow.promotion_margin)
    decision = Decision(promoted, reason, versions[CHALLENGER], versions[CHAMPION], score.get(CHALLENGER),
                        score.get(CHAMPION))
    with mlflow.start_run(run_name="promote"):
        mlflow.log_params({"challenger_version": versions[CHALLENGER], "champion_version": versions[CHAMPION],
                           "margin": cfg.mlflow.promotion_margin, "val_pairs": len(val_set)})
        mlflow.log_metrics({f"{k}_top1_accuracy": v for k, v in score.items() if not math.isnan(v)})
        mlflow.set_tags({"decision": "promoted" if promoted else "refused", "reason": reason})
    tags = {"promotion_decision": "promoted" if promoted else "refused", "promotion_reason": reason,
            "promotion_challenger_score": str(score.get(CHALLENGER)),
            "promotion_champion_score": str(score.get(CHAMPION))}
    for key, value in tags.items():
        client.set_model_version_tag(name, versions[CHALLENGER], key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, versions[CHALLENGER])
    log.info("promotion of %s v%s: %s (%s)", name, versions[CHALLENGER], tags["promotion_decision"], reason)
    return decision
