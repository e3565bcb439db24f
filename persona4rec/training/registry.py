"""MLflow tracking and registry plumbing shared by training, promotion and scoring."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from persona4rec.config import Config
from persona4rec.errors import InputError

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"


def setup_mlflow(cfg: Config) -> MlflowClient:
    uri = cfg.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if client.get_experiment_by_name(cfg.mlflow.experiment) is None and not uri.startswith("databricks"):
        root = cfg.resolve_path(cfg.mlflow.artifact_root)
        location = root if "://" in root else Path(root).resolve().as_uri()
        client.create_experiment(cfg.mlflow.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.mlflow.experiment)
    return client


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the model or the alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_key(client: MlflowClient, name: str, version: str) -> str:
    """The registry version plus a fingerprint of the model it names, e.g. "3#5f0c2a91d4": what
    every embedding cache is keyed by (the driver's model folder, and the `model_version` column of
    persona_index, interaction_embeddings and user_vectors). A version number alone repeats when the
    registry is recreated (a new sqlite file) or another tracking URI serves the same warehouse, and
    the vectors another model cached under "1" would then be served as this model's."""
    mv = client.get_model_version(name, version)
    digest = hashlib.sha1(f"{name}|{mv.source}|{mv.run_id}|{mv.creation_timestamp}".encode()).hexdigest()[:10]
    return f"{version}#{digest}"


def registry_version(key: str) -> str:
    """The registry version of a `version_key` (a plain version is returned as it is)."""
    return key.split("#", 1)[0]


def model_uri(cfg: Config, alias: str) -> str:
    return f"models:/{cfg.mlflow.registered_model}@{alias}"


def load_alias(cfg: Config, alias: str):
    """The sentence-transformers model behind an alias (None if the alias is not set)."""
    import mlflow.sentence_transformers

    client = setup_mlflow(cfg)
    version = alias_version(client, cfg.mlflow.registered_model, alias)
    if version is None:
        return None, None
    model = mlflow.sentence_transformers.load_model(model_uri(cfg, alias))
    return model, version


def register(cfg: Config, client: MlflowClient, model, input_example: list[str], metadata: dict,
             alias: str = CHALLENGER) -> str:
    """Log `model` (sentence_transformers flavour) in the active run, register it, and point
    `alias` at the version this call created."""
    import mlflow.sentence_transformers

    info = mlflow.sentence_transformers.log_model(
        model, name="encoder", input_example=input_example,
        registered_model_name=cfg.mlflow.registered_model, metadata=metadata)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(cfg.mlflow.registered_model, alias, version)
    return version


BLEND_ALPHA_TAG = "blend_alpha_{generator}"


def set_blend_alpha(cfg: Config, client: MlflowClient, version: str, generator: str, alpha: float) -> None:
    """Store the blend α chosen on validation with the model version it was chosen for."""
    client.set_model_version_tag(cfg.mlflow.registered_model, registry_version(version),
                                 BLEND_ALPHA_TAG.format(generator=generator), str(alpha))


def blend_alpha(cfg: Config, version: str, generator: str) -> float | None:
    """The α `set_blend_alpha` stored for this model version and generator; None if never chosen.
    A `version_key` must name this registry's model of that number: vectors embedded with another
    registry's "v1" must not be served with this one's α (the run fails, naming both)."""
    if version.startswith("untuned:"):
        return None
    client = setup_mlflow(cfg)
    number = registry_version(version)
    if number != version and (here := version_key(client, cfg.mlflow.registered_model, number)) != version:
        raise InputError(f"model version {version} (the embeddings' key) is not version {number} of "
                         f"{cfg.mlflow.registered_model} at {cfg.tracking_uri()} (its key is {here}): rerun build_index")
    value = client.get_model_version(cfg.mlflow.registered_model, number).tags.get(
        BLEND_ALPHA_TAG.format(generator=generator))
    return float(value) if value is not None else None
