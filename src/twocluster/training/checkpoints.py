"""Resumable training runs: each epoch's checkpoint is copied to the store, so a retry on another
node continues where the last attempt stopped.

    models/<model>/runs/<run key>/epoch=0003/...      an epoch's BackupAndRestore files
    models/<model>/runs/<run key>/epoch=0003/_COMPLETE.json   written after them
    models/<model>/runs/<run key>/LATEST.json         the pointer, moved last

(``layout.model_run_prefix``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from twocluster.store.storage import ObjectStore

log = logging.getLogger(__name__)

CHECKPOINT_POINTER = "LATEST.json"
EPOCH_COMPLETE = "_COMPLETE.json"  # written into an epoch's checkpoint folder after its files


def _complete_epochs(store: ObjectStore, prefix: str) -> list[int]:
    """Epoch folders whose upload finished (their marker is written after their files)."""
    epochs = []
    for obj in store.list(prefix):
        rel = obj.key[len(prefix) + 1 :]
        folder, _, name = rel.partition("/")
        if name == EPOCH_COMPLETE and folder.startswith("epoch=") and folder[6:].isdigit():
            epochs.append(int(folder[6:]))
    return sorted(epochs)


def last_checkpoint_epoch(store: ObjectStore, prefix: str) -> int:
    """The epoch of the run's last checkpoint (0: none). The pointer says; an unreadable pointer
    (cut short by a crash mid-write, or hand-edited) is not a reason to fail every retry: the
    newest epoch folder whose upload completed is used instead, with a warning."""
    key = f"{prefix}/{CHECKPOINT_POINTER}"
    try:
        pointer = json.loads(store.read_bytes(key))
        epoch = int(pointer["epoch"])
        if epoch < 1:
            raise ValueError(f"epoch {epoch}")
        return epoch
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as e:
        complete = _complete_epochs(store, prefix)
        log.warning("checkpoint pointer %s is unreadable (%s); resuming from the newest complete epoch folder: %s",
                    store.uri(key), e, complete[-1] if complete else "none, starting over")
        return complete[-1] if complete else 0


def restore_checkpoint(store: ObjectStore, prefix: str, backup_dir: Path) -> int:
    """Bring the run's last checkpoint from the store into ``backup_dir``; returns its epoch
    (0 if the run has none)."""
    epoch = last_checkpoint_epoch(store, prefix)
    if not epoch:
        return 0
    epoch_prefix = f"{prefix}/epoch={epoch:04d}"
    for obj in store.list(epoch_prefix):
        if obj.key.rsplit("/", 1)[-1] != EPOCH_COMPLETE:
            store.download_file(obj.key, backup_dir / obj.key[len(epoch_prefix) + 1 :])
    return epoch


def checkpoint_sync_callback(store: ObjectStore, prefix: str, backup_dir: Path, chief: bool = True):
    import keras

    class CheckpointSync(keras.callbacks.Callback):
        """After BackupAndRestore wrote the epoch's backup locally, copy it to the store under
        its own epoch folder, mark the folder complete, then move the pointer (so a reader never
        sees half a checkpoint). Only the chief of a multi-worker job writes."""

        def on_epoch_end(self, epoch, logs=None):
            if not chief:
                return
            epoch_prefix = f"{prefix}/epoch={epoch + 1:04d}"
            for path in sorted(backup_dir.rglob("*")):
                if path.is_file():
                    store.upload_file(path, f"{epoch_prefix}/{path.relative_to(backup_dir).as_posix()}")
            store.write_bytes(f"{epoch_prefix}/{EPOCH_COMPLETE}", json.dumps({"epoch": epoch + 1}).encode())
            store.write_bytes(f"{prefix}/{CHECKPOINT_POINTER}", json.dumps({"epoch": epoch + 1}).encode())

    return CheckpointSync()
