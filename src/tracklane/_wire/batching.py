"""Events and how they are packed into ``runs/log-batch`` requests.

An event is a plain tuple ``(kind, run_id, key, value, timestamp_ms, step)``: the cheapest thing
the hot path can build. The worker groups a window of events by run, keeps the last value of a
tag set twice, and cuts requests that stay inside every server limit (see ``_limits``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from .._limits import (
    MAX_BATCH_REQUEST_BYTES,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

METRIC, PARAM, TAG, ARTIFACT = 0, 1, 2, 3
#: ARTIFACT events never go in a log-batch: they name an artifact the server refused, as
#: (ARTIFACT, run_id, artifact path, size in bytes, 0, 0).
KIND_NAMES = ("metric", "param", "tag", "artifact")

#: (kind, run_id, key, value, timestamp_ms, step); value is a float for metrics, str otherwise.
Event = tuple[int, str, str, Any, int, int]

# Room left in a request for the envelope ({"run_id": ..., "metrics": [...]}) and per-entity
# JSON syntax; keeps every request under the server's byte limit without encoding twice.
_REQUEST_BUDGET = MAX_BATCH_REQUEST_BYTES - 10_000
_METRIC_OVERHEAD = 64
_METRICS_PER_REQUEST = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH)
_TEXT_OVERHEAD = 32


_KIND, _RUN, _VALUE = itemgetter(0), itemgetter(1), itemgetter(3)


def _json_value(value: float) -> float | str:
    # orjson writes NaN and the infinities as null, and a null metric value makes the server
    # refuse the whole batch; the server accepts these strings instead.
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


@dataclass(slots=True)
class Batch:
    """One log-batch request's worth of a single run's events."""

    run_id: str
    metrics: list[Event] = field(default_factory=list)
    params: list[Event] = field(default_factory=list)
    tags: list[Event] = field(default_factory=list)
    #: When the worker took these events (ns): a tag value kept in the journal never replaces one
    #: taken later, whatever order the writes reach the journal in (a retried batch arrives late).
    seq: int = 0
    #: Called once the batch reached its final outcome (delivered, refused and reported, or in
    #: the journal): the event log frees what it no longer needs to keep (``settle``).
    settled: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    @property
    def has_text(self) -> bool:
        """Params or tags: their order against other requests matters (last tag value wins)."""
        return bool(self.params or self.tags)

    def events(self) -> list[Event]:
        return [*self.metrics, *self.params, *self.tags]

    def encode(self) -> bytes:
        try:
            metrics = [{"key": k, "value": v, "timestamp": t, "step": s} for _, _, k, v, t, s in self.metrics]
        except ValueError:  # a metric of an MLflow 3 model carries a 7th field (see ``metric_entry``)
            metrics = [metric_entry(e) for e in self.metrics]
        # One C-level sum finds a NaN or an infinity in the batch (or an overflow, which the
        # per-value pass below then leaves alone); only then is each value looked at.
        total = sum(map(_VALUE, self.metrics))
        if total - total != 0:
            for m in metrics:
                v = m["value"]
                if v - v != 0:
                    m["value"] = _json_value(v)
        return orjson.dumps(
            {
                "run_id": self.run_id,
                "metrics": metrics,
                "params": [{"key": e[2], "value": e[3]} for e in self.params],
                "tags": [{"key": e[2], "value": e[3]} for e in self.tags],
            }
        )

    def halves(self) -> tuple[Batch, Batch]:
        """Split in two, for finding the events a server refused by bisection."""
        events = self.events()
        mid = len(events) // 2
        return batch_of(self.run_id, events[:mid], self.seq), batch_of(self.run_id, events[mid:], self.seq)


def settle(batches: Iterable[Batch]) -> None:
    """These batches reached their final outcome: tell whoever asked (once per batch)."""
    for batch in batches:
        done, batch.settled = batch.settled, None
        if done is not None:
            done()


def metric_entry(event: tuple[Any, ...]) -> dict[str, Any]:
    """A metric's log-batch entry. ``Buffer.log_model_metric`` events carry a 7th field, MLflow 3's
    ``(model_id, dataset_name, dataset_digest)``, sent as those fields (the journal keeps the point
    without them)."""
    entry: dict[str, Any] = {"key": event[2], "value": event[3], "timestamp": event[4], "step": event[5]}
    if len(event) > 6:
        for name, value in zip(("model_id", "dataset_name", "dataset_digest"), event[6], strict=True):
            if value is not None:
                entry[name] = value
    return entry


def batch_of(run_id: str, events: Iterable[Event], seq: int = 0) -> Batch:
    batch = Batch(run_id, seq=seq)
    lists = (batch.metrics, batch.params, batch.tags)
    for e in events:
        lists[e[0]].append(e)
    return batch


def pack(events: Iterable[Event], seq: int = 0) -> Iterator[Batch]:
    """Cut ``events`` (in logging order) into requests within the server's limits.

    Requests of one run come out in order; a param or tag key appears once per window, with the
    value of its last call, so the order of requests within a window cannot reorder them.
    """
    if not isinstance(events, list):
        events = list(events)
    runs = set(map(_RUN, events))
    if len(runs) == 1 and set(map(_KIND, events)) == {METRIC}:
        # The common take: one run's metrics. Two passes in C find it; no per-event Python work.
        for batch in _cut(runs.pop(), events, [], []):
            batch.seq = seq
            yield batch
        return
    per_run: dict[str, tuple[list[Event], dict[str, Event], dict[str, Event]]] = {}
    for e in events:
        slot = per_run.get(e[1])
        if slot is None:
            slot = per_run[e[1]] = ([], {}, {})
        if e[0] == METRIC:
            slot[0].append(e)
        else:
            text = slot[1] if e[0] == PARAM else slot[2]
            text.pop(e[2], None)  # re-insert so the last call also decides the position
            text[e[2]] = e
    for run_id, (metrics, params, tags) in per_run.items():
        for batch in _cut(run_id, metrics, list(params.values()), list(tags.values())):
            batch.seq = seq
            yield batch


def _cut(run_id: str, metrics: list[Event], params: list[Event], tags: list[Event]) -> Iterator[Batch]:
    if not params and not tags:
        # The common window: metrics only. 1,000 metrics with 250-char keys are ~320 kB, far
        # under the byte limit, so slicing needs no per-event accounting.
        for start in range(0, len(metrics), _METRICS_PER_REQUEST):
            yield Batch(run_id, metrics[start : start + _METRICS_PER_REQUEST])
        return
    batch = Batch(run_id)
    size = 0
    for kind_list, events, cap in (
        ("params", params, MAX_PARAMS_TAGS_PER_BATCH),
        ("tags", tags, MAX_PARAMS_TAGS_PER_BATCH),
    ):
        for e in events:
            cost = len(e[2]) + len(e[3]) * 2 + _TEXT_OVERHEAD  # *2: worst-case JSON escaping
            target: list[Event] = getattr(batch, kind_list)
            if len(target) >= cap or len(batch) >= MAX_ENTITIES_PER_BATCH or size + cost > _REQUEST_BUDGET:
                yield batch
                batch, size = Batch(run_id), 0
                target = getattr(batch, kind_list)
            target.append(e)
            size += cost
    for e in metrics:
        cost = len(e[2]) + _METRIC_OVERHEAD
        if (
            len(batch.metrics) >= MAX_METRICS_PER_BATCH
            or len(batch) >= MAX_ENTITIES_PER_BATCH
            or size + cost > _REQUEST_BUDGET
        ):
            yield batch
            batch, size = Batch(run_id), 0
        batch.metrics.append(e)
        size += cost
    if len(batch):
        yield batch
