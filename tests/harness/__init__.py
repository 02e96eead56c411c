"""The test harness: real servers (TorchServe, moto) and what is sent to them, shared by the
tests (tests/conftest.py) and the reliability campaign (``python -m tests.harness.campaign``,
``make campaign``). Never installed: it lives with the tests."""
