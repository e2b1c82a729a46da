"""The ``tracklane`` command reads like a command (issue 10, item 9): plain help, ``--version``,
numbers checked before anything runs, and a progress line with a rate and ETA on long syncs."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import pytest

import tracklane
from tracklane import TrackingClient
from tracklane._cli.args import non_negative_float, positive_float, positive_int
from tracklane._cli.progress import Progress, format_duration
from tracklane._runs.metadata import run_context_tags

from servers import Reader, tracklane_cli

#: What reST or Markdown markup looks like when it leaks into a terminal.
MARKUP = re.compile(r"``|:class:|:func:|:meth:|\*\*|`[^`\s]+`_")
PROGRESS_LINE = re.compile(r"^[\d,]+/[\d,]+ events \(\d+%\), [\d,]+ events/s, ETA \d+[smh]", re.M)


@pytest.mark.unit
@pytest.mark.parametrize("argv", [(), ("--help",), ("-h",)], ids=["alone", "--help", "-h"])
def test_tracklane_alone_or_with_help_prints_plain_help_and_exits_0(argv: tuple[str, ...]) -> None:
    result = tracklane_cli(*argv, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert not MARKUP.search(result.stdout), result.stdout
    # Every subcommand is listed with a one-line description.
    assert re.search(r"^\s+sync\s+upload offline runs", result.stdout, re.M), result.stdout
    assert re.search(r"^\s+bench\s+\w+", result.stdout, re.M), result.stdout
    assert "tracklane COMMAND --help" in result.stdout


@pytest.mark.unit
def test_sync_help_is_plain_text_with_the_exit_statuses() -> None:
    result = tracklane_cli("sync", "--help", timeout=60)

    assert result.returncode == 0, result.stderr
    assert not MARKUP.search(result.stdout), result.stdout
    assert "--to URL" in result.stdout and "exit status" in result.stdout


@pytest.mark.unit
def test_version_prints_the_name_and_the_package_version() -> None:
    result = tracklane_cli("--version", timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tracklane {tracklane.__version__}"


@pytest.mark.unit
@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "soon"])
def test_sync_refuses_a_retry_window_that_is_not_a_positive_number(value: str, tmp_path: Path) -> None:
    result = tracklane_cli("sync", str(tmp_path), "--to", "http://127.0.0.1:9", "--retry-window", value)

    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "--retry-window" in error and repr(value) in error and "greater than 0" in error
    assert "Traceback" not in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("parse", "text", "rule"),
    [
        (positive_float, "nan", "not a finite number"),
        (positive_float, "-inf", "not a finite number"),
        (positive_float, "0", "greater than 0"),
        (positive_float, "ten", "not a number"),
        (non_negative_float, "-0.5", "0 or more"),
        (non_negative_float, "inf", "not a finite number"),
        (positive_int, "0", "greater than 0"),
        (positive_int, "-3", "greater than 0"),
        (positive_int, "2.5", "whole number"),
        (positive_int, "nan", "whole number"),
    ],
)
def test_argument_types_name_the_value_and_the_rule(parse: object, text: str, rule: str) -> None:
    assert callable(parse)
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)

    assert repr(text) in str(refused.value) and rule in str(refused.value)


@pytest.mark.unit
def test_argument_types_accept_sensible_numbers() -> None:
    assert positive_float("2.5") == 2.5
    assert non_negative_float("0") == 0.0
    assert positive_int("1000") == 1000


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_long_sync_off_a_terminal_prints_a_few_progress_lines_with_rate_and_eta(
    tmp_path: Path, server_url: str, experiment_name: str, reader: Reader
) -> None:
    steps = 20_000  # 40,000 points: several seconds at any server's pace
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment(experiment_name)
        with tc.start_run(run_name="long", log_system_metrics=False):
            for step in range(steps):
                tc.log_metrics({"loss": 1.0 / (step + 1), "acc": step / steps}, step=step)

    result = tracklane_cli("sync", str(tmp_path), "--to", server_url)  # stdout is a pipe, not a TTY

    assert result.returncode == 0, result.stderr
    lines = PROGRESS_LINE.findall(result.stdout)
    assert lines, result.stdout
    assert "\r" not in result.stdout and "\033[" not in result.stdout  # no bar drawing in a log
    events = 2 * steps + len(run_context_tags())  # the points, and the run's mlflow.user/source tags
    assert re.search(rf"^run long -> \w+: {events} event\(s\)$", result.stdout, re.M), result.stdout
    assert f"synced 1 run(s), {events} event(s)" in result.stdout
    found = reader.experiment(experiment_name)
    assert found is not None
    [run] = reader.runs(found["experiment_id"])
    assert len(reader.history(run["info"]["run_id"], "loss")) == steps


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_progress_off_a_terminal_prints_at_most_one_line_every_few_seconds() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = Progress(100_000, out, tty=False, clock=clock)

    for _ in range(1000):  # 100 events every 10 ms: 10 s in all
        clock.now += 0.01
        progress.add(100)

    lines = out.getvalue().splitlines()
    # The first after a second (rate and ETA are known by then), the next five seconds later.
    assert len(lines) == 2, lines
    assert re.fullmatch(r"10,[01]00/100,000 events \(10%\), 10,000 events/s, ETA 9s", lines[0]), lines


@pytest.mark.unit
def test_progress_on_a_terminal_redraws_one_bar_in_place() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, clock = Terminal(), _Clock()
    progress = Progress(1000, out, tty=True, clock=clock)
    for _ in range(10):
        clock.now += 0.5
        progress.add(50)
    progress.line("run a -> 123: 500 event(s)")
    for _ in range(10):
        clock.now += 0.5
        progress.add(50)
    progress.done()

    text = out.getvalue()
    assert "\r[###############---------------] 500/1,000 events (50%), 100 events/s, ETA 5s" in text
    assert "run a -> 123: 500 event(s)\n" in text
    assert text.endswith("1,000/1,000 events (100%), 100 events/s\033[K\n")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0s"), (8, "8s"), (207, "3m27s"), (3720, "1h02m"), (-1, "0s")]
)
def test_durations_read_as_a_person_would_say_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
