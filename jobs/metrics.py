"""Prometheus metrics of the job service. Counters and histograms are kept where the events
happen (the worker); job counts by state and the queue depth are read from the database at
scrape time, so every API replica reports the same truth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Minutes-long generations: buckets from a second to half an hour.
_SECONDS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, float("inf"))


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("wan_jobs", "Jobs by state and model (from the database)", ["model", "status"], registry=r)
        self.queue_depth = Gauge("wan_jobs_queue_depth", "Jobs waiting for a worker, per model", ["model"],
                                 registry=r)
        self.submitted = Counter("wan_jobs_submitted_total", "Jobs accepted", ["model"], registry=r)
        self.finished = Counter("wan_jobs_finished_total", "Jobs finished, by outcome", ["model", "status"],
                                registry=r)
        self.wait_seconds = Histogram("wan_jobs_wait_seconds", "From submission to the start on a data plane",
                                      ["model"], buckets=_SECONDS, registry=r)
        self.run_seconds = Histogram("wan_jobs_run_seconds", "From the start on a data plane to the result",
                                     ["model", "endpoint"], buckets=_SECONDS, registry=r)
        self.retries = Counter("wan_jobs_retries_total", "Attempts that will be retried (503, connection loss)",
                               ["model", "endpoint"], registry=r)
        self.webhook_failures = Counter("wan_jobs_webhook_failures_total", "Webhook deliveries that failed",
                                        ["reason"], registry=r)
        self.webhooks_delivered = Counter("wan_jobs_webhooks_delivered_total", "Webhooks delivered", registry=r)

    def set_counts(self, rows: list[dict], models: list[str]) -> None:
        seen = {(row["model"], row["status"]): row["n"] for row in rows}
        for model in models:
            for status in ("queued", "in_progress", "completed", "failed", "cancelled"):
                self.jobs.labels(model, status).set(seen.get((model, status), 0))
            self.queue_depth.labels(model).set(seen.get((model, "queued"), 0))
