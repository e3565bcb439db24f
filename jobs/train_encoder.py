"""Job `train_encoder` (see persona4rec/training/job.py).

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/train_encoder.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.training.job import run

if __name__ == "__main__":
    run_job(__doc__, run)
