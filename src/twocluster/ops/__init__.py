"""What an operator looks at: the store read as a monitoring model, the ops page (FastAPI app mounted by the Airflow plugin), its SVG charts and the `twocluster` CLI."""
