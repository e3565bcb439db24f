from persona4rec.cli import run_job
from persona4rec.ingest.job import run

run_job("Ingest raw reviews and item metadata into Delta tables.", run)
