#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript): prints the GPU
# addresses of this host as Spark's ResourceInformation JSON, e.g. {"name":"gpu","addresses":["0","1"]}.
set -eu
# No nvidia-smi or no GPU: an empty list (the executor then gets no GPU tasks).
addresses=$( (nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true) | sed -e 's/^ *//' -e 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
