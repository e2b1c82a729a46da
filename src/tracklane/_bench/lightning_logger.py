"""Figure 10: what a Lightning logger costs per training step, with the stock MLFlowLogger beside it.

A tiny model (one linear layer, CPU, one torch thread) trains for ``steps`` steps with
``log_every_n_steps=1``, logging ``METRICS`` values per step, under four loggers in the same run of
this script: none (``logger=False``, the baseline), Lightning's stock ``MLFlowLogger`` against the
server's plain ``http://`` URI (one synchronous ``log_batch`` request per step), the same
``MLFlowLogger`` with ``tracking_uri="tracklane+http://..."`` (MLflow hands its calls to tracklane's
tracking-store plugin; skipped while the plugin is not registered with MLflow), and tracklane's
``TracklaneLogger``. The figure is the wall time per step (from the first measured step's start to
the last one's, so every step's ``log_metrics`` is inside it), the median over ``runs`` fits per
logger; the overhead is that minus the baseline's. The loggers take turns round by round, in a
rotating order, so drift on a shared machine shifts them alike.

Beside it: the time ``fit`` spends after training ends, which is where the loggers end their runs
(``finalize``: tracklane delivers what is still queued there), and a check that the server holds
every step's metric for each logger. All of it runs in one fresh process (torch and Lightning are
imported once).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from . import harness

COUNTS = {
    "smoke": {"steps": 20, "warmup_steps": 3, "runs": 1},
    "quick": {"steps": 40, "warmup_steps": 5, "runs": 3},
    "full": {"steps": 300, "warmup_steps": 10, "runs": 5},
}
#: Values each step logs (``self.log``): a loss and three more, as a typical training step does.
METRICS = ("loss", "loss_x10", "weight_norm", "bias")
BATCH = 8
FEATURES = 16
#: (key, label) of each logger, in the table's order; "none" is the baseline.
LOGGERS = {
    "none": "no logger (logger=False)",
    "null_logger": "a Logger that does nothing (Lightning's own logging path)",
    "mlflow_logger": "Lightning MLFlowLogger(tracking_uri='http://...')",
    "mlflow_logger_tracklane_store": "Lightning MLFlowLogger(tracking_uri='tracklane+http://...')",
    "tracklane_logger": "tracklane TracklaneLogger(tracking_uri='http://...')",
}


def plugin_missing() -> str | None:
    """None when MLflow resolves ``tracklane+http`` to a tracking store, else why not."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry.get_store_builder("tracklane+http://127.0.0.1:1")
    except Exception as exc:
        return (
            "MLFlowLogger(tracking_uri='tracklane+http://...'): MLflow does not resolve the tracklane+http "
            f"scheme here ({type(exc).__name__}); the plugin (tracklane.integrations.mlflow_store, "
            "registered under the mlflow.tracking_store entry point) is not installed"
        )
    return None


def steps_child(url: str, counts: dict[str, int]) -> dict[str, Any]:
    """In a fresh process: every logger's fits, round by round; wall time per step of each fit."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mlflow", "tracklane"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    import mlflow
    import torch
    from lightning.pytorch.loggers import Logger, MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from tracklane.integrations.lightning import TracklaneLogger

    torch.set_num_threads(1)  # one core for training; the other for the server and the worker
    steps, warmup = int(counts["steps"]), int(counts["warmup_steps"])
    total = steps + warmup

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(FEATURES, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            self.log("loss_x10", loss * 10)
            self.log("weight_norm", self.layer.weight.detach().norm())
            self.log("bias", self.layer.bias.detach()[0])
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class NullLogger(Logger):
        """Lightning's own per-step logging work (metrics to scalars, the logger hooks), no I/O."""

        name, version = "null", "0"

        @property
        def experiment(self) -> None:
            return None

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            pass

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.train_end = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, *args: Any) -> None:
            self.train_end = time.perf_counter()

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(total * BATCH, FEATURES, generator=generator)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=BATCH)
    experiment = f"bench-lightning-{uuid.uuid4().hex[:8]}"
    makers: dict[str, Callable[[], Any]] = {
        "none": lambda: False,
        "null_logger": NullLogger,
        "mlflow_logger": lambda: MLFlowLogger(experiment_name=experiment, tracking_uri=url),
        "mlflow_logger_tracklane_store": lambda: MLFlowLogger(
            experiment_name=experiment, tracking_uri=f"tracklane+{url}"
        ),
        "tracklane_logger": lambda: TracklaneLogger(experiment_name=experiment, tracking_uri=url),
    }
    skipped: dict[str, str] = {}
    missing = plugin_missing()
    if missing:
        skipped["mlflow_logger_tracklane_store"] = missing
        del makers["mlflow_logger_tracklane_store"]

    def fit(logger: Any) -> tuple[list[float], float, str | None]:
        clock = Clock()
        trainer = pl.Trainer(
            max_steps=total,
            max_epochs=1,
            log_every_n_steps=1,
            logger=logger,
            callbacks=[clock],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Tiny(), data)
        returned = time.perf_counter()
        timed = clock.starts[warmup:]
        intervals = [b - a for a, b in itertools.pairwise(timed)]
        run_id = logger.run_id if isinstance(logger, (MLFlowLogger, TracklaneLogger)) else None
        return intervals, returned - clock.train_end, run_id

    fit(False)  # warm-up: imports, first-call paths; not measured
    results: dict[str, dict[str, list[Any]]] = {
        name: {"step_s": [], "intervals_s": [], "end_s": [], "stored": []} for name in makers
    }
    reader = mlflow.MlflowClient(tracking_uri=url)
    names = list(makers)
    for round_ in range(int(counts["runs"])):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            try:
                intervals, end, run_id = fit(makers[name]())
            except Exception as exc:  # one logger's failure is reported; it does not cost the others
                skipped[name] = f"{LOGGERS[name]} failed: {type(exc).__name__}: {exc}"
                del makers[name]
                continue
            results[name]["step_s"].append(sum(intervals) / len(intervals))
            results[name]["intervals_s"] += intervals
            results[name]["end_s"].append(end)
            if run_id is not None:
                results[name]["stored"].append(len(reader.get_metric_history(run_id, "loss")))
        names = [n for n in names if n in makers]
    return {"results": {k: v for k, v in results.items() if v["step_s"]}, "skipped": skipped}


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("10_lightning_logger", "Figure 10: Lightning logger cost per training step")
    harness.banner(figure, args)
    # Not in the bench extra (torch is large): a wheel installed alone skips this figure, saying why.
    missing = [name for name in ("torch", "lightning", "mlflow") if importlib.util.find_spec(name) is None]
    if missing:
        figure.skip(f"{', '.join(missing)} not installed; `pip install 'tracklane[lightning,bench]'` adds it")
        return figure
    counts = COUNTS[args.scale]
    figure.params = {
        **counts,
        "metrics_per_step": len(METRICS),
        "batch": BATCH,
        "features": FEATURES,
        "torch_threads": 1,
    }
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with harness.mlflow_server(args) as url:
        got = harness.child(__file__, "steps", {"url": url, "counts": counts}, env=env, timeout=300)
    results: dict[str, dict[str, list[Any]]] = got["results"]
    for line in got["skipped"].values():
        figure.skip(line)
    if "none" not in results:
        figure.note("the baseline (no logger) did not run; no overheads")
    mean = {name: harness.median(r["step_s"]) for name, r in results.items()}
    typical = {name: harness.median(r["intervals_s"]) for name, r in results.items()}
    expected = counts["steps"] + counts["warmup_steps"]
    for name, label in LOGGERS.items():
        if name not in results:
            continue
        runs = len(results[name]["step_s"])
        figure.add(
            f"{name}_step_ms",
            f"{label}: wall time per step ({counts['steps']} steps, median of {runs} fits)",
            mean[name] * 1e3,
            "ms/step",
        )
        figure.add(
            f"{name}_step_p50_ms",
            f"{label}: median step (all {runs * counts['steps']} steps: other processes' spikes left out)",
            typical[name] * 1e3,
            "ms/step",
        )
        if name == "none":
            continue
        if "none" in results:
            figure.add(
                f"{name}_overhead_us",
                f"{label}: overhead per step vs no logger (median steps)",
                (typical[name] - typical["none"]) * 1e6,
                "us/step",
            )
            figure.add(
                f"{name}_overhead_pct",
                f"{label}: overhead vs no logger (wall time per step)",
                (mean[name] / mean["none"] - 1) * 100,
                "%",
            )
        if name == "null_logger":
            continue
        figure.add(
            f"{name}_end_ms",
            f"{label}: fit's time after training ends (the logger ends its run there)",
            harness.median(results[name]["end_s"]) * 1e3,
            "ms",
        )
        short = [n for n in results[name]["stored"] if n != expected]
        if short:
            figure.note(f"{label}: the server held {short} of {expected} steps' 'loss' after fit returned")
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child == "steps":
        spec = json.loads(args.child_arg)
        harness.child_result(args, steps_child(spec["url"], spec["counts"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
