"""The emptiest daily job (bench/spark_start.py runs it with spark-submit): a session with the
project's settings and one two-task job with Python tasks. Prints where its seconds went.

    spark-submit --master local[2] bench/empty_job.py <launched at, epoch s> [--pyspark-stop]
"""

import sys
import time

entered = time.time()
from twocluster.spark.session import get_spark, stop_spark  # noqa: E402


def identity(batches):
    yield from batches


def main() -> None:
    launched, pyspark_stop = float(sys.argv[1]), "--pyspark-stop" in sys.argv
    spark = get_spark("empty-job")
    session = time.time()
    rows = spark.range(2, numPartitions=2).mapInArrow(identity, "id long").count()
    job = time.time()
    spark.stop() if pyspark_stop else stop_spark(spark)
    stopped = time.time()
    assert rows == 2
    print(f"PHASES launch={entered - launched:.3f} session={session - entered:.3f} job={job - session:.3f} "
          f"stop={stopped - job:.3f}", flush=True)


if __name__ == "__main__":
    main()
