"""Job `train_encoder`: fine-tune the encoder as an MLflow run and register it as `@challenger`.

`train.objective: rerank` (the default, training/rerank.py) trains a linear head on the frozen
encoder to rank each user's next item above the CF generator's candidates, and keeps the epoch
with the best validation NDCG@10 of what will be served (`train.selection: served`: the blend at
the α of `scoring.alpha`, or for `auto` the α validation chooses; `pure`: the pure rerank); the
run logs the per-epoch validation curve (epoch 0 = the un-tuned encoder), the generator's own
NDCG@10 on the same lists, the blend α per generator (also tagged on the model version, for
`scoring.alpha: auto`), and registers the encoder with its head. `train.objective: alignment` is
the paper's objective, described below.

The run logs every setting that matters (never secrets), the loss and learning rate per step,
validation loss and top-1 persona accuracy per epoch (and of the un-tuned encoder, as step 0), a
loss-curve plot, the resolved config, and the Delta versions of the tables it read. The merged
model is logged with the sentence_transformers flavour, registered as a new version of
`mlflow.registered_model`, and that version — the one the log call returned, never "the
highest" — gets the alias `challenger`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import mlflow
import yaml
from pyspark.sql import SparkSession

from persona4rec.config import Config, to_dict
from persona4rec.errors import InputError
from persona4rec.schemas import ALIGNMENT_PAIRS, ITEM_PERSONAS, ITEM_SUMMARIES, REVIEW_ASPECTS
from persona4rec.tables import TableStore
from persona4rec.training.encoder import add_lora, load_encoder, merge_lora
from persona4rec.training.registry import CHALLENGER, register, set_blend_alpha, setup_mlflow
from persona4rec.training.source import open_examples
from persona4rec.training.trainer import evaluate, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    run_id: str
    model_version: str
    train_pairs: int
    val_pairs: int
    baseline: dict
    final: dict
    steps: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def loss_plot(step_losses: list[float], epochs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(step_losses) + 1), step_losses, label="train loss (per step)")
    steps_per_epoch = max(1, len(step_losses) // max(1, len(epochs)))
    ax.plot([steps_per_epoch * e["epoch"] for e in epochs], [e["val_loss"] for e in epochs], "o-",
            label="validation loss (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(spark: SparkSession, cfg: Config) -> TrainReport:
    return fit(spark, cfg)[0]


def fit(spark: SparkSession, cfg: Config):
    """Train, log and register; returns (report, the in-memory merged model)."""
    store = TableStore(spark, cfg)
    if cfg.train.objective == "rerank":
        return _fit_rerank(store, cfg)
    with open_examples(store, cfg) as (train_set, val_set):
        return _fit(store, cfg, train_set, val_set)


def _fit(store: TableStore, cfg: Config, train_set, val_set):
    s = cfg.train
    if len(train_set) < 2:
        raise ValueError(f"only {len(train_set)} training pair(s) in '{ALIGNMENT_PAIRS.name}': run `align` "
                         "first, or lower train.validation_fraction")
    inputs = {name: store.version(name) for name in
              (ALIGNMENT_PAIRS.name, ITEM_PERSONAS.name, ITEM_SUMMARIES.name, REVIEW_ASPECTS.name, "splits")
              if store.exists(name)}
    client = setup_mlflow(cfg)
    model = load_encoder(s.base_model, s.device, s.max_seq_length)
    baseline = evaluate(model, val_set, cfg.profile.gamma, s.temperature, s.batch_size)
    log.info("un-tuned encoder on %d validation pairs: %s", len(val_set), baseline)
    add_lora(model, s.lora_rank, s.lora_alpha, s.lora_dropout, s.seed)

    with mlflow.start_run(run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}") as active:
        params = {f"train.{k}": v for k, v in asdict(s).items()}
        params.update({"scoring.alpha": cfg.scoring.alpha, "profile.k": cfg.profile.k,
                       "profile.gamma": cfg.profile.gamma,
                       "offline.domain": cfg.offline.domain, "llm.model": cfg.llm.model,
                       "train_pairs": len(train_set), "val_pairs": len(val_set)})
        mlflow.log_params(params)
        mlflow.set_tags({f"input.{k}.delta_version": v for k, v in inputs.items()})
        mlflow.log_metrics({f"baseline_{k}": v for k, v in baseline.items() if k != "epoch"}, step=0)
        result = train(model, train_set, val_set, s, cfg.profile.gamma,
                       on_step=lambda step, m: mlflow.log_metrics(m, step=step),
                       on_epoch=lambda epoch, m: mlflow.log_metrics(
                           {k: v for k, v in m.items() if k != "epoch"}, step=epoch))
        final = result.epochs[-1]
        mlflow.log_metrics({"final_top1_accuracy": final["top1_accuracy"], "final_val_loss": final["val_loss"],
                            "train_seconds": result.seconds})
        with tempfile.TemporaryDirectory() as tmp:
            loss_plot(result.step_losses, result.epochs, os.path.join(tmp, "loss_curve.png"))
            with open(os.path.join(tmp, "config.yaml"), "w") as fh:
                yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
            with open(os.path.join(tmp, "input_versions.json"), "w") as fh:
                json.dump(inputs, fh, indent=2)
            mlflow.log_artifacts(tmp)
        merge_lora(model)
        version = register(cfg, client, model, [train_set[0].persona_text],
                           {"profile_k": cfg.profile.k, "profile_gamma": cfg.profile.gamma,
                            "validation_top1_accuracy": final["top1_accuracy"]})
        client.set_model_version_tag(cfg.mlflow.registered_model, version, "validation_top1_accuracy",
                                     str(final["top1_accuracy"]))
        log.info("registered %s version %s as @%s (run %s)", cfg.mlflow.registered_model, version,
                 CHALLENGER, active.info.run_id)
    report = TrainReport(active.info.run_id, version, len(train_set), len(val_set), baseline, final,
                         result.steps, round(result.seconds, 2))
    return report, model


def curve_plot(curve: list[dict], path: str, best_epoch: int | None = None) -> None:
    """Validation NDCG@10 per epoch: per generator the pure rerank, the served blend (where it
    differs) and the generator itself; the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [c["epoch"] for c in curve]
    for g in sorted(curve[0]["generators"]):
        line, = ax.plot(epochs, [c["generators"][g]["pure"] for c in curve], "o-", label=f"rerank over {g}")
        served = [c["generators"][g]["served"] for c in curve]
        if served != [c["generators"][g]["pure"] for c in curve]:
            ax.plot(epochs, served, "s:", color=line.get_color(), label=f"served blend over {g}")
        own = curve[0]["generators"][g]["generator"]
        if own is not None:
            ax.axhline(own, ls="--", color=line.get_color(), label=f"{g} alone")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", lw=0.8, label=f"kept (epoch {best_epoch})")
    ax.set_xlabel("epoch (0 = un-tuned)")
    ax.set_ylabel("validation NDCG@10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epoch_metrics(m: dict) -> dict[str, float]:
    """One epoch's figures as flat MLflow metric names."""
    out = {"val_ndcg10": m["selection"], "val_pure_ndcg10": m["pure"], "val_served_ndcg10": m["served"]}
    if "train_loss" in m:
        out["train_loss"] = m["train_loss"]
    for g, v in m["generators"].items():
        out[f"val_ndcg10_{g}"] = v["pure"]
        out[f"val_blend_ndcg10_{g}"] = v["best_blend"]
        out[f"val_served_ndcg10_{g}"] = v["served"]
    return {k: x for k, x in out.items() if x is not None and not math.isnan(x)}


def _fit_rerank(store: TableStore, cfg: Config):
    """train.objective=rerank (training/rerank.py): a linear head on the frozen encoder, trained
    on the generator's candidates, the epoch with the best validation NDCG@10 kept."""
    from persona4rec.training import lists, rerank
    from persona4rec.training.encoder import embed

    s = cfg.train
    data = lists.collect(store, cfg)
    if not len(data.validation):
        raise InputError("no validation lists for train.objective=rerank: the splits table has no validation "
                         "interactions of users with candidates (run ingest, then generate_candidates)")
    inputs = {name: store.version(name) for name in
              (ALIGNMENT_PAIRS.name, ITEM_PERSONAS.name, ITEM_SUMMARIES.name, REVIEW_ASPECTS.name, "splits",
               "review_clusters", "candidates") if store.exists(name)}
    client = setup_mlflow(cfg)
    model = load_encoder(s.base_model, s.device, s.max_seq_length)
    started = time.time()
    E = embed(model, data.texts, batch_size=128)
    embed_seconds = time.time() - started
    served_alpha = cfg.scoring.served_alpha
    if served_alpha == 0.0 and s.selection == "served":
        log.warning("scoring.alpha is 0: the e-mails get the generator's own order, which no head changes, so "
                    "train.selection=served keeps the un-tuned encoder (set train.selection=pure to train anyway)")
    alphas = tuple(sorted(set(cfg.evaluation.alpha_grid) | {1.0} | ({served_alpha} - {None})))
    with mlflow.start_run(run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}") as active:
        params = {f"train.{k}": v for k, v in asdict(s).items()}
        params.update({"scoring.alpha": cfg.scoring.alpha, "profile.k": cfg.profile.k,
                       "profile.gamma": cfg.profile.gamma,
                       "profile.persona_vectors": cfg.profile.persona_vectors,
                       "profile.centroid_members": cfg.profile.centroid_members,
                       "offline.persona_builder": cfg.offline.persona_builder, "train_examples": len(data.train),
                       "validation_lists": len(data.validation), "validation_protocol": data.validation.protocol,
                       "texts_embedded": len(data.texts)})
        mlflow.log_params(params)
        mlflow.set_tags({f"input.{k}.delta_version": v for k, v in inputs.items()})
        result = rerank.fit(E, data, s, cfg.profile.gamma, alphas,
                            on_epoch=lambda epoch, m: mlflow.log_metrics(epoch_metrics(m), step=epoch),
                            served_alpha=served_alpha)
        baseline, best = result.curve[0], result.curve[result.best_epoch]
        for g, m in baseline["generators"].items():
            if m["generator"] is not None:
                mlflow.log_metric(f"val_generator_ndcg10_{g}", m["generator"])
        mlflow.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds,
                            "embed_seconds": embed_seconds, "best_val_ndcg10": best["selection"],
                            "untuned_val_ndcg10": baseline["selection"]})
        with tempfile.TemporaryDirectory() as tmp:
            curve_plot(result.curve, os.path.join(tmp, "validation_ndcg10.png"), result.best_epoch)
            with open(os.path.join(tmp, "config.yaml"), "w") as fh:
                yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
            with open(os.path.join(tmp, "input_versions.json"), "w") as fh:
                json.dump(inputs, fh, indent=2)
            with open(os.path.join(tmp, "validation_curve.json"), "w") as fh:
                json.dump(result.curve, fh, indent=1)
            mlflow.log_artifacts(tmp)
        served = rerank.with_head(model, result.head)
        version = register(cfg, client, served, [data.texts[0]],
                           {"profile_k": cfg.profile.k, "profile_gamma": cfg.profile.gamma, "objective": "rerank",
                            "validation_ndcg10": best["selection"]})
        client.set_model_version_tag(cfg.mlflow.registered_model, version, "validation_ndcg10", str(best["selection"]))
        client.set_model_version_tag(cfg.mlflow.registered_model, version, "objective", "rerank")
        client.set_model_version_tag(cfg.mlflow.registered_model, version, "selection", s.selection)
        for key in ("pure", "served"):
            client.set_model_version_tag(cfg.mlflow.registered_model, version, f"validation_{key}_ndcg10",
                                         str(best[key]))
        for g, m in best["generators"].items():
            if m["generator"] is not None:  # the α this head is best blended at, for scoring.alpha=auto
                set_blend_alpha(cfg, client, version, g, m["best_alpha"])
        log.info("registered %s version %s as @%s (run %s): validation NDCG@10 %.5f at epoch %d (un-tuned %.5f)",
                 cfg.mlflow.registered_model, version, CHALLENGER, active.info.run_id, best["selection"],
                 result.best_epoch, baseline["selection"])
    summary = lambda m: {"val_ndcg10": m["selection"], "val_served_ndcg10": m["served"],
                         **{f"val_ndcg10_{g}": v["pure"] for g, v in m["generators"].items()},
                         **{f"val_served_ndcg10_{g}": v["served"] for g, v in m["generators"].items()},
                         **{f"val_generator_ndcg10_{g}": v["generator"] for g, v in m["generators"].items()}}
    report = TrainReport(active.info.run_id, version, len(data.train), len(data.validation), summary(baseline),
                         {"best_epoch": result.best_epoch, **summary(best)}, result.steps, round(result.seconds, 2))
    return report, served
