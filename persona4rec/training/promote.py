"""Job `promote_model`: move `@champion` to `@challenger` only when the challenger is better.

On ranking quality (the default, `train.objective: rerank` — issue 14): the challenger, the
champion and the un-tuned base encoder each rerank the same validation lists (training/lists.py:
each user's validation item among the generator's candidates, as `evaluate` measures it) and are
compared on NDCG@10 of what the e-mails will rank (`train.selection`, mean over the generators:
`served` = the blend at the α of `scoring.alpha` — for `auto`, the α each model's validation
chooses —, `pure` = the pure rerank), the metric the rerank trainer chose its checkpoint on.
(With `auto` each model is measured at the α these lists choose for it: what training tags, and
what `evaluate` re-chooses on every validation user before scoring reads it.) The
challenger is promoted only if (1) it beats the champion by more than `mlflow.promotion_margin`
(or there is none), (2) it is not below the un-tuned encoder, and (3) where the generator's own
ranks are known (leave-one-out lists: evaluation-mode candidates exist), its rerank at the α it
will be served with (`scoring.alpha`, or for `auto` the α chosen on validation and tagged on the
version) is not below any generator's NDCG@10: a model that makes the e-mails worse than the
generator alone never becomes champion. Lists of a production run carry no generator rank of the
held-out item (the `sampled` protocol): check (3) is then skipped and the decision says so.

The ranking gate applies whatever the training objective: a model trained on the paper's
`train.objective: alignment` is served for the same rerank, so it is promoted on the same metric.
Only before any candidates exist (an alignment-objective run that has not run
generate_candidates: there is nothing to rank) do both models fall back to the paper's own measure,
top-1 persona accuracy on the same held-out validation pairs (users the training never saw; the
split is the deterministic one of `train.seed` and `train.validation_fraction`); the decision's
metric says which gate ran. Ties and small gains within `mlflow.promotion_margin` keep the current champion. The
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
from persona4rec.schemas import CANDIDATES
from persona4rec.tables import TableStore
from persona4rec.training.registry import (CHALLENGER, CHAMPION, alias_version, blend_alpha, load_alias,
                                          set_blend_alpha, setup_mlflow)
from persona4rec.training.source import open_examples
from persona4rec.training.trainer import evaluate

log = logging.getLogger(__name__)
ALREADY_CHAMPION = "challenger is already the champion"


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


def decide_ranking(challenger: dict, champion: dict | None, untuned: dict, alphas: dict[str, float],
                   margin: float) -> tuple[bool, str]:
    """Ranking gate (see the module docstring). Each argument is `rerank.validate`'s output;
    `alphas`: the α each generator will be served with."""
    score = challenger["selection"]
    if math.isnan(score):
        return False, "challenger has no validation score"
    for g, m in sorted(challenger["generators"].items()):
        if m["generator"] is None:
            continue
        alpha = alphas.get(g, 1.0)
        served = m["blend"].get(alpha)
        if served is None:
            return False, f"no validation score for {g} at the served alpha {alpha}"
        if served < m["generator"]:
            return False, (f"challenger's rerank of {g} at alpha {alpha} ({served:.4f}) is below {g} alone "
                           f"({m['generator']:.4f}) on validation NDCG@10")
    if score < untuned["selection"]:
        return False, f"challenger {score:.4f} is below the un-tuned encoder {untuned['selection']:.4f}"
    unchecked = "" if any(m["generator"] is not None for m in challenger["generators"].values()) else \
        " (generator not compared: no evaluation-mode candidates, sampled lists)"
    if champion is None:
        return True, "no champion yet" + unchecked
    if score > champion["selection"] + margin:
        return True, f"challenger beats champion by {score - champion['selection']:.4f} > margin {margin}" + unchecked
    return False, (f"challenger {score:.4f} does not beat champion {champion['selection']:.4f} by more than "
                   f"{margin}")


def served_alphas(cfg: Config, version: str, generators) -> dict[str, float | None]:
    """The α each generator's e-mails will blend with when `version` serves; None where
    `scoring.alpha: auto` finds none chosen yet (a model the rerank trainer did not select)."""
    if cfg.scoring.served_alpha is not None:
        return {g: cfg.scoring.served_alpha for g in generators}
    return {g: blend_alpha(cfg, version, g) for g in generators}


def run(spark: SparkSession, cfg: Config) -> Decision:
    client = setup_mlflow(cfg)
    name = cfg.mlflow.registered_model
    if alias_version(client, name, CHALLENGER) is None:
        raise LookupError(f"no @{CHALLENGER} version of '{name}' at {cfg.tracking_uri()}: run train_encoder first")
    store = TableStore(spark, cfg)
    if cfg.train.objective == "rerank" or has_candidates(store):
        return _decide_ranking(spark, cfg, client, name)
    log.warning("no candidates to rank (run generate_candidates): promotion falls back to top-1 persona accuracy")
    with open_examples(store, cfg, validation_only=True) as (_, val_set):
        return _decide(cfg, client, name, val_set)


def has_candidates(store: TableStore) -> bool:
    """Whether the generators' candidates exist, i.e. the ranking gate has lists to rank."""
    return store.exists(CANDIDATES.name) and bool(store.read(CANDIDATES.name).limit(1).count())


def measured(cfg: Config, client, name: str, measure) -> tuple[dict, dict]:
    """({alias: measure(model)}, {alias: version}) for the challenger and the champion (absent
    where the alias is not set); a champion that is the challenger (a rerun after promotion) is
    loaded and measured once."""
    results, versions = {}, {}
    for alias in (CHALLENGER, CHAMPION):
        if alias == CHAMPION and CHALLENGER in results and alias_version(client, name, CHAMPION) == versions[CHALLENGER]:
            versions[CHAMPION], results[CHAMPION] = versions[CHALLENGER], results[CHALLENGER]
            continue
        model, versions[alias] = load_alias(cfg, alias)
        if model is not None:
            results[alias] = measure(model)
    return results, versions


def _decide(cfg: Config, client, name: str, val_set) -> Decision:
    score, versions = measured(cfg, client, name, lambda model: evaluate(
        model, val_set, cfg.profile.gamma, cfg.train.temperature, cfg.train.batch_size)["top1_accuracy"])
    if versions[CHALLENGER] == versions[CHAMPION]:
        promoted, reason = False, ALREADY_CHAMPION
    else:
        promoted, reason = decide(score[CHALLENGER], score.get(CHAMPION), cfg.mlflow.promotion_margin)
    decision = Decision(promoted, reason, versions[CHALLENGER], versions[CHAMPION], score.get(CHALLENGER),
                        score.get(CHAMPION))
    with mlflow.start_run(run_name="promote"):
        mlflow.log_params({"challenger_version": versions[CHALLENGER], "champion_version": versions[CHAMPION],
                           "margin": cfg.mlflow.promotion_margin, "val_pairs": len(val_set)})
        mlflow.log_metrics({f"{k}_top1_accuracy": v for k, v in score.items() if not math.isnan(v)})
        mlflow.set_tags({"decision": outcome(promoted, reason), "reason": reason})
    record(client, name, versions[CHALLENGER], promoted, reason,
           {"promotion_challenger_score": str(score.get(CHALLENGER)),
            "promotion_champion_score": str(score.get(CHAMPION))})
    return decision


def outcome(promoted: bool, reason: str) -> str:
    return "promoted" if promoted else ("unchanged" if reason == ALREADY_CHAMPION else "refused")


def record(client, name: str, version: str, promoted: bool, reason: str, scores: dict[str, str]) -> None:
    """Tag the challenger's version with the decision and its scores; move `@champion` if promoted.
    A rerun after promotion (the challenger is the champion) leaves the version's tags as they
    are: its promotion decision stays readable in the registry."""
    if reason == ALREADY_CHAMPION:
        log.info("promotion of %s v%s: unchanged (%s)", name, version, reason)
        return
    tags = {"promotion_decision": "promoted" if promoted else "refused", "promotion_reason": reason, **scores}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("promotion of %s v%s: %s (%s)", name, version, tags["promotion_decision"], reason)


def _decide_ranking(spark: SparkSession, cfg: Config, client, name: str) -> Decision:
    from persona4rec.training import lists, rerank
    from persona4rec.training.encoder import embed, load_encoder

    data = lists.collect(TableStore(spark, cfg), cfg, validation_only=True)
    generators = sorted(set(data.validation.generator))
    alphas = served_alphas(cfg, alias_version(client, name, CHALLENGER), generators)
    grid = tuple(sorted(set(cfg.evaluation.alpha_grid) | {1.0} | {a for a in alphas.values() if a is not None}))

    def measure(model) -> dict:
        import torch

        E = torch.from_numpy(embed(model, data.texts, batch_size=128))
        return rerank.validate(E, None, data, cfg.profile.gamma, grid, selection=cfg.train.selection,
                               served_alpha=cfg.scoring.served_alpha)

    results, versions = measured(cfg, client, name, measure)
    s = cfg.train
    results["untuned"] = measure(load_encoder(s.base_model, s.device, s.max_seq_length))
    for g, a in alphas.items():  # `auto` with none chosen (e.g. a paper-objective model): the
        if a is None:            # challenger's best α on these lists, as the rerank trainer tags it
            alphas[g] = results[CHALLENGER]["generators"].get(g, {}).get("best_alpha", 1.0)
            set_blend_alpha(cfg, client, versions[CHALLENGER], g, alphas[g])
            log.info("scoring.alpha auto: no α chosen for %s yet, the gate chose %.2f on validation", g, alphas[g])
    if versions[CHALLENGER] == versions[CHAMPION]:
        promoted, reason = False, ALREADY_CHAMPION
    else:
        promoted, reason = decide_ranking(results[CHALLENGER], results.get(CHAMPION), results["untuned"], alphas,
                                          cfg.mlflow.promotion_margin)
    score = {k: v["selection"] for k, v in results.items()}
    decision = Decision(promoted, reason, versions[CHALLENGER], versions[CHAMPION], score[CHALLENGER],
                        score.get(CHAMPION), metric="validation_ndcg10")
    flat = {f"{who}_val_ndcg10": v for who, v in score.items() if not math.isnan(v)}
    for who, r in results.items():
        for g, m in r["generators"].items():
            flat[f"{who}_val_ndcg10_{g}"] = m["pure"]
            flat[f"{who}_val_served_ndcg10_{g}"] = m["served"]  # at m["served_alpha"]: what (1) and (2) compared
            flat[f"{who}_served_alpha_{g}"] = m["served_alpha"]
            if m["generator"] is not None:
                flat[f"generator_val_ndcg10_{g}"] = m["generator"]
    with mlflow.start_run(run_name="promote"):
        mlflow.log_params({"challenger_version": versions[CHALLENGER], "champion_version": versions[CHAMPION],
                           "margin": cfg.mlflow.promotion_margin, "validation_lists": len(data.validation),
                           "validation_protocol": data.validation.protocol,
                           **{f"served_alpha_{g}": a for g, a in alphas.items()}})
        mlflow.log_metrics({k: v for k, v in flat.items() if not math.isnan(v)})
        mlflow.set_tags({"decision": outcome(promoted, reason), "reason": reason})
    record(client, name, versions[CHALLENGER], promoted, reason,
           {"promotion_metric": "validation_ndcg10", "promotion_challenger_score": str(score[CHALLENGER]),
            "promotion_champion_score": str(score.get(CHAMPION)), "promotion_untuned_score": str(score["untuned"])})
    return decision
