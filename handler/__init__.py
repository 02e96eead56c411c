"""Wan2.2 video generation behind TorchServe.

Layout (request flow, top to bottom):

- ``wan_handler``: the TorchServe class; only adapts TorchServe's calling convention.
- ``service``: one request end to end (validate, generate, encode, package the response).
- ``request``: the one request type and its validation; ``images``: image input checks.
- ``pipeline``: loading a Wan2.2 checkpoint with diffusers and running it.
- ``variants``: the official per-variant defaults and detection from a checkpoint folder.
- ``video``: MP4 encoding (x264 settings chosen so the same frames give the same bytes).
- ``config``: the one reader of model-config.yaml (the ``handler:`` section and the TorchServe
  keys the handler needs); ``load_request_rules`` gives the limits and defaults without torch,
  for the job service.
- ``metrics``: generation metrics (stage seconds, steps per second, outcomes, peak GPU memory),
  emitted through TorchServe's metrics API as declared in config/metrics.yaml.
- ``version``: which code is serving (package version and git commit), in responses and metrics.
- ``errors``: the one error hierarchy, each error carrying its HTTP status.

This installed package is the one copy of the code in a pod: a model store holds only the entry
file that subclasses ``wan_handler.WanVideoHandler`` (model_store/archive.py), its config and weights.

Nothing outside ``wan_handler`` imports TorchServe, so everything else is testable in-process.
"""
