"""Failure notifications for the pipeline DAGs, pluggable by configuration.

The default logs the failure (task, run, try, exception and log URL) at ERROR, which every
deployment collects. To page a team instead, point ``TWOCLUSTER_FAILURE_NOTIFIER`` at any Airflow
notifier class (the providers ship Slack, SMTP, PagerDuty, Opsgenie, ...) with its arguments:

    TWOCLUSTER_FAILURE_NOTIFIER='{"class": "airflow.providers.slack.notifications.slack.SlackNotifier",
                                  "kwargs": {"slack_conn_id": "slack_ops", "channel": "#ml-ops",
                                             "text": "{{ ti.dag_id }}.{{ ti.task_id }} failed: {{ exception }}"}}'

Credentials stay in the notifier's Airflow connection, never in this setting.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os

from airflow.sdk import BaseNotifier
from airflow.sdk.module_loading import import_string

NOTIFIER_ENV = "TWOCLUSTER_FAILURE_NOTIFIER"
log = logging.getLogger("twocluster.notifications")


class LogNotifier(BaseNotifier):
    """Log a task failure with what an operator needs to find it."""

    def notify(self, context) -> None:
        ti = context.get("ti") or context.get("task_instance")
        log.error(
            "FAILED %s.%s run=%s try=%s date=%s: %s (log: %s)",
            getattr(ti, "dag_id", "?"), getattr(ti, "task_id", "?"), getattr(ti, "run_id", "?"),
            getattr(ti, "try_number", "?"), context.get("ds"), context.get("exception"), getattr(ti, "log_url", "n/a"),
        )


class ApprovalWaitingNotifier(BaseNotifier):
    """Log that a model version waits for a person's approval, with where to answer (Airflow has
    no in-app notice of pending approvals, apache/airflow#64847)."""

    def notify(self, context) -> None:
        ti = context.get("ti") or context.get("task_instance")
        task = context.get("task")
        log.warning("APPROVAL WAITING %s.%s run=%s: %s (answer on Airflow's Required Actions page; log: %s)",
                    getattr(ti, "dag_id", "?"), getattr(ti, "task_id", "?"), getattr(ti, "run_id", "?"),
                    getattr(task, "subject", "?"), getattr(ti, "log_url", "n/a"))


def _configured(env: str, setting: str | None, default: BaseNotifier) -> BaseNotifier:
    setting = os.environ.get(env) if setting is None else setting
    if not setting:
        return default
    try:
        config = json.loads(setting)
        cls = import_string(config["class"])
        return cls(**config.get("kwargs", {}))
    except (ValueError, KeyError, ImportError, TypeError) as e:
        raise ValueError(f"{env}: cannot build the notifier from {setting!r}: {e}") from None


def failure_notifier(setting: str | None = None) -> BaseNotifier:
    """The configured notifier (``$TWOCLUSTER_FAILURE_NOTIFIER``), or :class:`LogNotifier`."""
    return _configured(NOTIFIER_ENV, setting, LogNotifier())


APPROVAL_NOTIFIER_ENV = "TWOCLUSTER_APPROVAL_NOTIFIER"


def approval_notifier(setting: str | None = None) -> BaseNotifier:
    """Who is told an approval waits (``$TWOCLUSTER_APPROVAL_NOTIFIER``, the same form as the
    failure notifier's setting), or :class:`ApprovalWaitingNotifier`."""
    return _configured(APPROVAL_NOTIFIER_ENV, setting, ApprovalWaitingNotifier())


def task_defaults(*, retries: int, retry_delay: dt.timedelta, execution_timeout: dt.timedelta, **more) -> dict:
    """``default_args`` of this project's DAGs: the owner, retries with exponential backoff, a
    timeout, and the configured failure notifier."""
    return {"owner": "ml-platform", "retries": retries, "retry_delay": retry_delay, "retry_exponential_backoff": True,
            "execution_timeout": execution_timeout, "on_failure_callback": [failure_notifier()], **more}
