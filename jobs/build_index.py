"""Job `build_index` (see persona4rec/scoring/index.py).

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/build_index.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.scoring.index import run

if __name__ == "__main__":
    run_job(__doc__, run)
