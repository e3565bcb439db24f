"""Job `evaluate` (see persona4rec/evaluation/job.py): every reranker variant against the CF
generator it reranks, HR/MRR/NDCG@K on validation and test; chooses the blend α on validation.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/evaluate.py [--target T] [--set k=v]
"""

from persona4rec.cli import run_job
from persona4rec.evaluation.job import run

if __name__ == "__main__":
    run_job(__doc__, run)
