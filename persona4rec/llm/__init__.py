"""LLM access: a thin layer over the official `openai` client.

Plain Python (no Spark) for building requests, calling with retries/backoff/re-asks, and rate
limiting; `persona4rec.llm.runner` adds the Spark side: anti-join against the persistent cache,
bounded concurrency per task, a journal that makes every finished call durable, and MERGE.
Nothing on the scoring side imports this package.
"""
