"""transformers' Trainer with TracklaneCallback: real (tiny, CPU) training, checked on the real server."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tracklane import MlflowClient
from tracklane.integrations.transformers import TracklaneCallback

from servers import Reader

pytestmark = pytest.mark.frameworks

#: MLflowCallback's own variables; the callback reads them through tracklane's settings.
CALLBACK_ENV = (
    "MLFLOW_TAGS",
    "MLFLOW_NESTED_RUN",
    "MLFLOW_FLATTEN_PARAMS",
    "HF_MLFLOW_LOG_ARTIFACTS",
    "MLFLOW_MAX_LOG_PARAMS",
)
STEPS = list(range(1, 11))  # 20 samples, batches of 4, 2 epochs


@pytest.fixture(autouse=True)
def _callback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CALLBACK_ENV:
        monkeypatch.delenv(name, raising=False)


def tiny_trainer(output_dir: Path, callbacks: list[Any], **overrides: Any) -> Trainer:
    """A one-layer GPT-2 from a config (no download) on random token ids: 10 steps in 2 epochs."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (20, 8))]
    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        **overrides,
    }
    return Trainer(
        model=GPT2LMHeadModel(config),
        args=TrainingArguments(**args),
        train_dataset=data,
        callbacks=callbacks,
    )


def only_run(reader: Reader, experiment_name: str) -> dict[str, Any]:
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = reader.runs(experiment["experiment_id"])
    assert len(runs) == 1, [r["info"]["run_name"] for r in runs]
    return runs[0]


def steps(reader: Reader, run_id: str, key: str) -> list[int]:
    return [step for _, step, _ in reader.history(run_id, key)]


def test_every_step_the_params_and_finished_status_reach_the_server(
    server_url: str, reader: Reader, experiment_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
    monkeypatch.setenv("MLFLOW_TAGS", json.dumps({"team": "nlp", "release": "rc1"}))
    trainer = tiny_trainer(tmp_path, [TracklaneCallback()])
    trainer.model.config.notes = "x" * 7000  # over the server's 6000-character param limit

    trainer.train()

    run = only_run(reader, experiment_name)
    run_id = run["info"]["run_id"]
    assert trainer.state.global_step == 10
    assert steps(reader, run_id, "loss") == STEPS
    assert steps(reader, run_id, "learning_rate") == STEPS
    assert steps(reader, run_id, "train_runtime") == [10]
    params = reader.params(run_id)
    assert params["learning_rate"] == str(trainer.args.learning_rate)  # from args.to_dict()
    assert params["per_device_train_batch_size"] == "4"
    assert params["n_embd"] == "32"  # from the model's config
    assert params["notes"] == "x" * 6000  # truncated, not dropped
    assert len(params) > 100  # more than one request holds
    tags = reader.tags(run_id)
    assert tags["team"] == "nlp" and tags["release"] == "rc1"
    assert "mlflow.user" in tags and "mlflow.source.name" in tags
    assert run["info"]["status"] == "FINISHED"


class ExtraLogs(TrainerCallback):
    """Adds to every training log what a user's callback might: text, an odd key, a tensor."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs.update({"note": "not a number", "acc (top-1)": 0.5, "scale": torch.tensor(2.0)})


def test_a_non_numeric_log_value_is_skipped_and_training_goes_on(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = tiny_trainer(tmp_path, [ExtraLogs(), TracklaneCallback(server_url, experiment_name)])

    with caplog.at_level(logging.WARNING, logger="tracklane"):
        trainer.train()

    run_id = only_run(reader, experiment_name)["info"]["run_id"]
    assert trainer.state.global_step == 10
    assert steps(reader, run_id, "loss") == STEPS
    assert steps(reader, run_id, "acc _top-1_") == STEPS  # renamed: the server refuses parentheses
    assert [value for value, _, _ in reader.history(run_id, "scale")] == [2.0] * 10
    assert reader.history(run_id, "note") == []
    assert sum("'note'" in r.getMessage() for r in caplog.records) == 1  # said once
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_mlflow_run_id_resumes_the_launchers_run(
    server_url: str, reader: Reader, experiment_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client = MlflowClient(server_url)
    experiment_id = client.create_experiment(experiment_name)
    launched = client.create_run(experiment_id, run_name="launcher").info.run_id
    client.log_param(launched, "per_device_train_batch_size", 4)  # logged by an earlier attempt
    client.set_terminated(launched, "FAILED")
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)

    tiny_trainer(tmp_path, [TracklaneCallback(server_url, experiment_name)]).train()

    run = only_run(reader, experiment_name)
    assert run["info"]["run_id"] == launched
    assert steps(reader, launched, "loss") == STEPS
    assert reader.params(launched)["num_train_epochs"] == "2"
    assert run["info"]["status"] == "FINISHED"


def test_nested_runs_give_each_training_a_child_of_one_parent(
    server_url: str, reader: Reader, experiment_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "true")
    callback = TracklaneCallback(server_url, experiment_name)
    trainer = tiny_trainer(tmp_path, [callback])

    trainer.train()  # a hyperparameter search's trials: one train() each
    trainer.train()
    callback.end_runs()

    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = {r["info"]["run_id"]: r for r in reader.runs(experiment["experiment_id"])}
    parent = callback.parent_run_id
    assert parent in runs and len(runs) == 3
    children = [run_id for run_id in runs if reader.tags(run_id).get("mlflow.parentRunId") == parent]
    assert len(children) == 2
    for child in children:
        assert steps(reader, child, "loss") == STEPS
        assert runs[child]["info"]["status"] == "FINISHED"
    assert reader.run(parent)["info"]["status"] == "FINISHED"


def test_output_dir_is_uploaded_as_artifacts_when_asked(
    server_url: str, reader: Reader, experiment_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "1")
    trainer = tiny_trainer(
        tmp_path / "out",
        [TracklaneCallback(server_url, experiment_name)],
        save_strategy="steps",
        save_steps=10,
        save_only_model=True,
    )

    trainer.train()

    run_id = only_run(reader, experiment_name)["info"]["run_id"]
    files = mlflow.MlflowClient(tracking_uri=server_url).list_artifacts(run_id, "checkpoint-10")
    assert "checkpoint-10/model.safetensors" in {f.path for f in files}
    assert reader.run(run_id)["info"]["status"] == "FINISHED"


def test_only_world_process_zero_logs(server_url: str, reader: Reader, experiment_name: str) -> None:
    callback = TracklaneCallback(server_url, experiment_name)
    args = TrainingArguments(output_dir="out", report_to=[], use_cpu=True)
    state, control = TrainerState(is_world_process_zero=False), TrainerControl()

    callback.on_train_begin(args, state, control, model=None)
    callback.on_log(args, state, control, logs={"loss": 1.0})
    callback.on_train_end(args, state, control)

    assert callback.run_id is None
    assert reader.experiment(experiment_name) is None


CRASHING_SCRIPT = """
import sys
import torch
from transformers import TrainerCallback
from tracklane.integrations.transformers import TracklaneCallback
sys.path.insert(0, {tests!r})
from test_integration_transformers import tiny_trainer

class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("out of memory, say")

tiny_trainer("out", [TracklaneCallback({url!r}, {experiment!r}), Boom()]).train()
"""


def test_a_trainer_that_raises_leaves_its_run_failed_at_exit(
    server_url: str, reader: Reader, experiment_name: str, tmp_path: Path
) -> None:
    script = tmp_path / "crash.py"
    tests = str(Path(__file__).parent)
    script.write_text(
        textwrap.dedent(CRASHING_SCRIPT.format(tests=tests, url=server_url, experiment=experiment_name))
    )
    env = {k: v for k, v in os.environ.items() if k not in CALLBACK_ENV and not k.startswith("MLFLOW_")}

    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )

    assert proc.returncode == 1 and "out of memory, say" in proc.stderr, proc.stderr[-2000:]
    run = only_run(reader, experiment_name)
    assert steps(reader, run["info"]["run_id"], "loss") == [1, 2]  # step 3 raised before its log
    assert run["info"]["status"] == "FAILED"
