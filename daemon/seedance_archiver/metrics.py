"""Prometheus metrics of the daemon: prefix ``seedance_``, base units, no task-id labels.

Each :class:`Metrics` has its own registry, so several services (tests, benchmarks) never collide in
prometheus_client's global one. ``web.py`` serves :meth:`Metrics.render` at ``/metrics``.
"""

from __future__ import annotations

import dataclasses

import prometheus_client as prom

# Seconds from the provider saying "completed" to the video being archived.
ARCHIVE_DELAY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 86400)
LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
TRANSFER_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


@dataclasses.dataclass
class Stats:
    """Counters of what this daemon did since it started (for the demo, benchmarks and metrics)."""

    polls: int = 0
    poll_errors: int = 0
    malformed: int = 0
    rate_limited: int = 0
    archived: int = 0
    archived_bytes: int = 0
    download_failures: int = 0
    ticks: int = 0


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.polls = prom.Counter(
            "seedance_polls",
            "Provider polls, by task mode and outcome.",
            ["mode", "outcome"],
            registry=r,
        )
        self.provider_responses = prom.Counter(
            "seedance_provider_responses",
            "Provider answers by HTTP class (2xx, 4xx, 5xx; 'none' when no answer came).",
            ["code_class"],
            registry=r,
        )
        self.malformed_answers = prom.Counter(
            "seedance_malformed_answers",
            "Provider answers that did not follow the API contract.",
            registry=r,
        )
        self.answer_fields_ignored = prom.Counter(
            "seedance_answer_fields_ignored",
            "Side fields of provider answers that could not be read (a drifted type) and were "
            "ignored; the video is archived all the same.",
            ["field"],
            registry=r,
        )
        self.tasks = prom.Gauge(
            "seedance_tasks",
            "Tracked tasks by state (refreshed by housekeeping).",
            ["state"],
            registry=r,
        )
        self.tasks_expired = prom.Counter(
            "seedance_tasks_expired",
            "Tasks that ended expired: the provider deleted them before their video was archived.",
            registry=r,
        )
        self.callbacks = prom.Counter(
            "seedance_callbacks",
            "Provider callbacks received: 'hastened' made a row due sooner; 'ignored' were "
            "malformed, unknown, finished, leased, due already or polled too recently; 'refused' "
            "had no or a wrong token (answered 404); 'busy' found the queue full (answered 503).",
            ["outcome"],
            registry=r,
        )
        self.http_connections_refused = prom.Counter(
            "seedance_http_connections_refused",
            "Connections to the HTTP port answered 503 and closed at once: "
            "SEEDANCE_HTTP_MAX_CONNECTIONS were open already.",
            registry=r,
        )
        self.tasks_at_risk = prom.Gauge(
            "seedance_tasks_at_risk",
            "Tasks not yet archived whose provider deadline is less than an hour away.",
            registry=r,
        )
        self.tasks_waiting_on_setting = prom.Gauge(
            "seedance_tasks_waiting_on_setting",
            "Finished videos not downloaded because one of our settings refuses them "
            "(SEEDANCE_MAX_VIDEO_BYTES, the video URL rules); they wait for the setting to change.",
            registry=r,
        )
        self.archived_bytes = prom.Counter(
            "seedance_archived_bytes", "Bytes of video archived.", registry=r
        )
        self.archive_seconds = prom.Histogram(
            "seedance_archive_duration_seconds",
            "Time to download and store one video.",
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.download_failures = prom.Counter(
            "seedance_download_failures",
            "Failed video downloads or uploads, by reason.",
            ["reason"],
            registry=r,
        )
        self.completion_to_archive = prom.Histogram(
            "seedance_completion_to_archive_seconds",
            "Time from the provider reporting a task completed to its video being archived.",
            buckets=ARCHIVE_DELAY_BUCKETS,
            registry=r,
        )
        self.poll_lateness = prom.Histogram(
            "seedance_poll_lateness_seconds",
            "How late each poll started against its row's due time.",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.last_tick = prom.Gauge(
            "seedance_last_tick_timestamp_seconds",
            "Unix time of the last successful tick.",
            registry=r,
        )
        self.provider_outage = prom.Gauge(
            "seedance_provider_outage",
            "1 while most polls get no answer from the provider's API (5xx, timeouts, 404s that are "
            "not its own JSON) or its own 404 for tasks it should still have, else 0. No task is "
            "given up on a 404 while it lasts.",
            registry=r,
        )
        self.api_key_rejected = prom.Gauge(
            "seedance_api_key_rejected",
            "1 while the provider rejects the API key and polling is paused, else 0.",
            registry=r,
        )
        self.rate_limit = prom.Gauge(
            "seedance_request_rate_limit",
            "The current cap on provider requests per second (lowered after 429s).",
            registry=r,
        )
        self.polling_load = prom.Gauge(
            "seedance_polling_load_ratio",
            "Polls needed per second (rows due within the next minute, overdue included, over 60 s) "
            "divided by SEEDANCE_MAX_REQUESTS_PER_SECOND; above 1 the limit cannot keep up.",
            registry=r,
        )

        self.storage_refusals = prom.Counter(
            "seedance_storage_optional_refusals",
            "Optional storage calls (listing uploads, tags, checksums, HeadBucket) the store refused; "
            "each kind is remembered and not asked again.",
            ["call"],
            registry=r,
        )
        self.database_writes_refused = prom.Gauge(
            "seedance_database_writes_refused",
            "1 while the database refuses the daemon's write-backs for a missing grant (outcomes "
            "wait in memory; no task can end), else 0.",
            registry=r,
        )
        self.database_statements = prom.Counter(
            "seedance_database_statements",
            "Statements sent to the database, each a round trip (on PostgreSQL, each transaction "
            "adds its BEGIN and COMMIT).",
            registry=r,
        )
        self.database_transactions = prom.Counter(
            "seedance_database_transactions",
            "Transactions the daemon committed.",
            registry=r,
        )
        self.tick_failures = prom.Counter(
            "seedance_tick_failures",
            "Ticks that crashed (an unexpected error); several in a row turn /healthz 503.",
            registry=r,
        )

        self.webhook_deliveries = prom.Counter(
            "seedance_webhook_deliveries",
            "Webhook attempts by outcome: delivered (2xx), retry (will be tried again), failed (the "
            "retry schedule ran out), paused (410 Gone: the endpoint is paused).",
            ["outcome"],
            registry=r,
        )
        self.webhook_backlog = prom.Gauge(
            "seedance_webhook_backlog",
            "Webhook events not yet delivered (refreshed with the other gauges).",
            registry=r,
        )
        self.webhook_oldest_age = prom.Gauge(
            "seedance_webhook_oldest_undelivered_age_seconds",
            "Age of the oldest webhook event not yet delivered; 0 when none is waiting.",
            registry=r,
        )
        self.webhook_given_up = prom.Gauge(
            "seedance_webhook_given_up",
            "Webhook events given up on (failed or disabled) and not redelivered.",
            registry=r,
        )
        self.webhook_endpoints_paused = prom.Gauge(
            "seedance_webhook_endpoints_paused",
            "Webhook URLs paused because their receiver answered 410 Gone: nothing is delivered to "
            "them until `seedance-archiver webhooks resume`.",
            registry=r,
        )

        # The counters' children per label set, looked up once: count_poll runs on every poll.
        self._poll_children: dict[tuple[str, str, str], tuple[prom.Counter, prom.Counter]] = {}

    def count_poll(self, mode: str, outcome: str, code_class: str) -> None:
        """One poll: ``seedance_polls`` by mode and outcome, and the answer's HTTP class."""
        key = (mode, outcome, code_class)
        children = self._poll_children.get(key)
        if children is None:
            # .labels() takes a lock and checks its labels on each call.
            children = (
                self.polls.labels(mode=mode, outcome=outcome),
                self.provider_responses.labels(code_class=code_class),
            )
            self._poll_children[key] = children
        children[0].inc()
        children[1].inc()

    def render(self) -> bytes:
        return bytes(prom.generate_latest(self.registry))


CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
