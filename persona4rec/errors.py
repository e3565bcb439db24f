"""Errors that end a job on purpose.

An `InputError` means a job's input is missing, stale or inconsistent with what was asked (an
input path that does not exist, a model version without its embeddings, candidates older than
the reviews, an α that was never chosen). Writing a partition of generic output instead would put wrong e-mails in front of
customers, so the job stops: the message names the table, the model version or the setting, and
what to run; the job entry prints it on one line and exits non-zero.
"""

from __future__ import annotations


class InputError(ValueError):
    """A job cannot produce correct output from its inputs; the message says why and what to run."""


class BatchesPending(RuntimeError):
    """LLM batches are still running at the provider after `llm.batch.wait_max_s`. Nothing is lost:
    their ids are in `llm_batches` and the next run of the same job resumes polling them (it never
    submits their requests again). Jobs exit with status 75 (EX_TEMPFAIL: retry later)."""

    exit_status = 75
