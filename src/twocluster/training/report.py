"""What a trained model is judged and shown by: accuracy per split, the confusion matrix and
per-class recall on the test split, and the training curves (``training_curves.png``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def predict_labels(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) label ids over a pipeline of ``(features, labels)`` batches."""
    labels, predicted = [], []
    for x, y in batches:
        predicted.append(np.argmax(np.asarray(model.predict_on_batch(x)), axis=-1))
        labels.append(np.asarray(y))
    return np.concatenate(labels), np.concatenate(predicted)


def evaluate(model, splits: dict, vocabulary: list[str]) -> dict:
    """Loss and accuracy per split (``{name: batches}``, which must include ``test``), and the
    test split's confusion matrix and per-class recall."""
    metrics: dict = {}
    for split, batches in splits.items():
        loss, accuracy = model.evaluate(batches, verbose=0)
        metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = float(loss), float(accuracy)
    y_true, y_pred = predict_labels(model, splits["test"])
    n = len(vocabulary)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    support = confusion.sum(axis=1)
    metrics["confusion_matrix"] = {"labels": vocabulary, "rows_true_cols_predicted": confusion.tolist()}
    metrics["per_class_recall"] = {label: (float(confusion[i, i] / support[i]) if support[i] else None) for i, label in enumerate(vocabulary)}
    metrics["test_examples"] = int(len(y_true))
    return metrics


def plot_history(history_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [float(r[metric]) for r in rows], label=f"train {metric}")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
