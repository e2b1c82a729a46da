"""The differential suite: MLflow's own examples run under ``import mlflow`` and under tracklane's
imports against one server, compared (tests/test_differential.py; README table: ``readme.py``)."""
