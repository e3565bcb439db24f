"""Run every stage in order on one Spark session (the README's main command).

    python jobs/run_pipeline.py [--target T] [--set key=value ...]
"""

from persona4rec.cli import run_job
from persona4rec.ingest.job import check_inputs
from persona4rec.pipeline import run

if __name__ == "__main__":
    run_job(__doc__, run, preflight=check_inputs)
