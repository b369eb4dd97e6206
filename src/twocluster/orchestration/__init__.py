"""The Airflow side: the DAG factory, the run-time decisions its tasks make (arrivals, retrain policy, run summary), the training backends and the notifiers."""
