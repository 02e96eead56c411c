"""The job service: video jobs in front of the data plane, and the page people use.

Layout (a request's path, top to bottom):

- ``app``: the ASGI app (FastAPI): the Jobs API under /v1 (OpenAI Videos API compatible where they
  overlap), Server-Sent Events, /healthz, /readyz, /metrics, and the page (``web/``).
- ``rules``: a job's fields checked at submission with the handler's own rules
  (``handler.request``) and the model's config; ``webhooks``: the allow-list and signed delivery.
- ``store``: job records, users and keys in PostgreSQL; ``events``: LISTEN/NOTIFY fan-out.
- ``worker``: Procrastinate workers (one queue per model), endpoint slots, retries, stalled-job
  recovery; ``dataplane``: calling TorchServe or Triton over HTTP; ``results``: kept videos, posters.
- ``db``: the embedded PostgreSQL and the versioned migrations; ``config``: config/jobs.yaml and
  the environment; ``metrics``; ``errors``: the API's one error hierarchy.
- ``__main__``: the CLI (serve, worker, migrate, keys create, local start|stop|status).

The job service talks to the data plane over HTTP only; it never imports the pipeline.
"""
