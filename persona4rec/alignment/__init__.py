"""User–persona alignment (§3.1.2): user profiles from history, and the LLM judge."""
