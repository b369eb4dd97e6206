"""Devices and distribution for whichever Keras backend the trainer runs on.

* TensorFlow: tf.distribute (MultiWorkerMirrored across a ``TF_CONFIG`` cluster, Mirrored across
  local GPUs, one GPU, or the CPU);
* JAX: ``keras.distribution.DataParallel`` across the local accelerators;
* PyTorch: one device.

On a GPU the compute is float16 with float32 variables (tensor cores); the models keep their
logits in float32.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Distribution:
    name: str
    replicas: int
    scope: Any  # a context manager factory: variables are created inside it


def strategy_kind(num_gpus: int, tf_config: dict) -> str:
    """Which tf.distribute strategy fits the visible devices and cluster (pure, for tests)."""
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        return "multi_worker_mirrored"
    if num_gpus > 1:
        return "mirrored"
    if num_gpus == 1:
        return "one_gpu"
    return "cpu"


def is_chief(tf_config: dict) -> bool:
    """The one worker of a multi-worker job that writes: syncs checkpoints to the store and
    commits the model version (TensorFlow's rule: the ``chief`` task, else worker 0). The others
    train their share and write nothing shared (two committers would publish two versions of one
    run, and their checkpoint uploads would interleave)."""
    task = tf_config.get("task") or {}
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in tf_config.get("cluster", {})


def tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def choose_distribution() -> Distribution:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        kind = strategy_kind(len(gpus), tf_config())
        strategy = {"multi_worker_mirrored": tf.distribute.MultiWorkerMirroredStrategy, "mirrored": tf.distribute.MirroredStrategy,
                    "one_gpu": lambda: tf.distribute.OneDeviceStrategy("/gpu:0"), "cpu": tf.distribute.get_strategy}[kind]()
        distribution = Distribution(f"tensorflow/{kind}", strategy.num_replicas_in_sync, strategy.scope)
    elif backend == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform == "gpu"]
        if len(gpus) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel())
        distribution = Distribution(f"jax/{'data_parallel' if len(gpus) > 1 else 'one_gpu' if gpus else 'cpu'}", max(1, len(gpus)),
                                    contextlib.nullcontext)
    else:
        import torch

        gpus = ["cuda:0"] if torch.cuda.is_available() else []
        distribution = Distribution(f"{backend}/{'one_gpu' if gpus else 'cpu'}", 1, contextlib.nullcontext)
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        log.warning("no GPU found (CUDA_VISIBLE_DEVICES=%r): training on the CPU", os.environ.get("CUDA_VISIBLE_DEVICES"))
    log.info("distribution: %s, %d replica(s), GPUs: %s", distribution.name, distribution.replicas, gpus)
    return distribution
