"""LLM judge: align each training interaction with the item persona that explains it.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/align.py [--target T] [--set k=v]
"""

from persona4rec.alignment.align import run
from persona4rec.cli import run_job

if __name__ == "__main__":
    run_job(__doc__, run)
