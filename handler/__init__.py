"""Wan2.2 video generation behind TorchServe.

Layout (request flow, top to bottom):

- ``wan_handler``: the TorchServe class; only adapts TorchServe's calling convention.
- ``service``: one request end to end (validate, generate, encode, package the response).
- ``request``: the one request type and its validation; ``images``: image input checks.
- ``pipeline``: loading a Wan2.2 checkpoint with diffusers and running it.
- ``variants``: the official per-variant defaults and detection from a checkpoint folder.
- ``video``: MP4 encoding; ``config``: the ``handler:`` section of model-config.yaml.
- ``errors``: the one error hierarchy, each error carrying its HTTP status.

Nothing outside ``wan_handler`` imports TorchServe, so everything else is testable in-process.
"""
