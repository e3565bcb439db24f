"""Job `promote_model` (see persona4rec/training/promote.py).

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/promote_model.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.training.promote import run

if __name__ == "__main__":
    run_job(__doc__, run)
