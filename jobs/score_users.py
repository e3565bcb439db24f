"""Job `score_users` (see persona4rec/scoring/score.py).

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/score_users.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.scoring.score import run

if __name__ == "__main__":
    run_job(__doc__, run)
