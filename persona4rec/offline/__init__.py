"""The paper's offline stage (§3.1.1): item summaries, review aspects and item personas via an LLM."""
