"""Ingestion: raw reviews and item metadata → validated, normalised Delta tables and LOO splits."""
