"""Job `train_encoder`: fine-tune the encoder as an MLflow run and register it as `@challenger`.

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
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import mlflow
import yaml
from pyspark.sql import SparkSession

from persona4rec.config import Config, to_dict
from persona4rec.schemas import ALIGNMENT_PAIRS, ITEM_PERSONAS, ITEM_SUMMARIES, REVIEW_ASPECTS
from persona4rec.tables import TableStore
from persona4rec.training.encoder import add_lora, load_encoder, merge_lora
from persona4rec.training.registry import CHALLENGER, register, setup_mlflow
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
        params.update({"profile.k": cfg.profile.k, "profile.gamma": cfg.profile.gamma,
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
