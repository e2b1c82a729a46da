"""A run's end the server has not been told yet: what the run models hand the engine, the journal
keeps, and the stores apply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunEnd:
    """A run's end the server has not been told yet: applied after the run's events."""

    run_id: str
    status: str
    end_time: int
    run_name: str = ""
