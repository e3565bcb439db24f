"""Offline LLM stage `extract_aspects` (see persona4rec/offline/aspects.py).

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/extract_aspects.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.offline.aspects import run

if __name__ == "__main__":
    run_job(__doc__, run)
