"""persona4rec: Persona4Rec (offline LLM reasoning → persona-profiled item index → cheap rerank) on Spark."""

__version__ = "0.1.0"
