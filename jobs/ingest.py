"""Ingest raw reviews and item metadata into Delta tables and write leave-one-out splits.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/ingest.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.ingest.job import check_inputs, run

if __name__ == "__main__":
    run_job(__doc__, run, preflight=check_inputs)
