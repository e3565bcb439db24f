"""Online/batch side (§3.2): persona index, candidates, scoring. Never imports the LLM layer."""
