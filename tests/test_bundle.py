"""databricks.yml deploys the same jobs/*.py with arguments those jobs accept."""

import re

import pytest
import yaml

from conftest import ROOT
from persona4rec.cli import parser
from persona4rec.config import load_config

pytestmark = pytest.mark.unit

BUNDLE = yaml.safe_load((ROOT / "databricks.yml").read_text())


def substitute(value: str) -> str:
    defaults = {k: str(v.get("default")) for k, v in BUNDLE["variables"].items()}
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: defaults[m.group(1)], value)


def tasks():
    for job_name, job in BUNDLE["resources"]["jobs"].items():
        for task in job["tasks"]:
            yield job_name, task


def test_bundle_has_dev_and_prod_and_the_expected_jobs():
    assert set(BUNDLE["targets"]) == {"dev", "prod"}
    assert BUNDLE["targets"]["dev"]["presets"]["trigger_pause_status"] == "PAUSED"
    assert {"offline_reasoning", "training"} <= set(BUNDLE["resources"]["jobs"])


@pytest.mark.parametrize("job_name, task", list(tasks()), ids=lambda x: x if isinstance(x, str) else x["task_key"])
def test_every_task_runs_an_existing_job_with_valid_arguments(job_name, task):
    assert (ROOT / task["spark_python_task"]["python_file"]).is_file()
    cfg = _config(task)  # unknown keys or bad values would raise
    assert cfg.storage.schema
    for dep in task.get("depends_on", []):
        assert dep["task_key"] in {t["task_key"] for _, t in tasks()}


def test_scoring_job_is_scheduled_and_paused_in_dev():
    scoring = BUNDLE["resources"]["jobs"]["scoring"]
    assert scoring["schedule"]["quartz_cron_expression"]
    assert [t["task_key"] for t in scoring["tasks"]] == ["build_index", "generate_candidates", "score_users"]


def _args(task):
    return parser("x").parse_args([substitute(p) for p in task["spark_python_task"].get("parameters", [])])


def _overrides(task):
    return _args(task).overrides


def _config(task):
    """The task's config as the job resolves it: its --target layer and --set overrides."""
    args = _args(task)
    return load_config(args.target, args.overrides)


def test_scoring_job_runs_production_mode_and_evaluate_gets_evaluation_candidates():
    jobs = BUNDLE["resources"]["jobs"]
    for task in jobs["scoring"]["tasks"]:
        assert load_config(None, _overrides(task)).mode == "production", task["task_key"]
    training = {t["task_key"]: t for t in jobs["training"]["tasks"]}
    assert load_config(None, _overrides(training["generate_candidates"])).mode == "evaluation"
    assert "generate_candidates" in {d["task_key"] for d in training["evaluate"]["depends_on"]}


def test_training_selects_and_promotion_gates_on_the_blend_the_emails_are_served_with():
    jobs = BUNDLE["resources"]["jobs"]
    training = {t["task_key"]: t for t in jobs["training"]["tasks"]}
    served = {name: _config(task) for name, task in
              [("train_encoder", training["train_encoder"]), ("promote_model", training["promote_model"]),
               ("score_users", jobs["scoring"]["tasks"][-1])]}
    assert {name: cfg.scoring.alpha for name, cfg in served.items()} == dict.fromkeys(served, "auto")
    assert {cfg.train.selection for cfg in served.values()} == {"served"}


def test_llm_tasks_carry_provider_sized_limits_and_the_papers_persona_range():
    prod = BUNDLE["targets"]["prod"]["variables"]
    defaults = {k: v.get("default") for k, v in BUNDLE["variables"].items()}
    assert prod["llm_requests_per_minute"] > defaults["llm_requests_per_minute"]
    assert prod["llm_tokens_per_minute"] > defaults["llm_tokens_per_minute"]
    llm_tasks = [t for _, t in tasks() if any("llm.base_url" in p for p in t["spark_python_task"]["parameters"])]
    assert {t["task_key"] for t in llm_tasks} == {"summarise_items", "extract_aspects", "build_personas", "align"}
    for task in llm_tasks:
        cfg = load_config(None, _overrides(task))
        assert cfg.offline.max_personas == 7 and cfg.llm.requests_per_minute == defaults["llm_requests_per_minute"]
        assert cfg.llm.concurrency_per_task == defaults["llm_concurrency_per_task"]
