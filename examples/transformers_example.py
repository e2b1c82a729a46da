"""A tiny BERT classifier trained with transformers' Trainer, logging through tracklane.

The one-line change from MLflowCallback (report_to=[] keeps transformers' own from logging too):

    from tracklane.integrations.transformers import TracklaneCallback

    trainer = Trainer(..., args=TrainingArguments(..., report_to=[]), callbacks=[TracklaneCallback()])

MLflowCallback's environment variables work as before (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME,
MLFLOW_TAGS, MLFLOW_RUN_ID, MLFLOW_NESTED_RUN, HF_MLFLOW_LOG_ARTIFACTS, ...). With MLFLOW_TRACKING_URI
set (an MLflow server, e.g. http://127.0.0.1:5000) it logs there; unset, it logs offline into
./ml_runs (upload later with `tracklane sync . --to URL`). The model is built from a config: nothing
is downloaded.

    pip install 'tracklane[transformers]' accelerate
    python examples/transformers_example.py
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from tracklane import MlflowClient
from tracklane.integrations.transformers import TracklaneCallback


def random_tokens(samples: int, seed: int) -> list[dict[str, Any]]:
    """Random token ids with a learnable label: whether token 0 is in the upper half."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (samples, 16), generator=generator)
    return [{"input_ids": row, "labels": int(row[0] >= 50)} for row in ids]


def main() -> None:
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    callback = TracklaneCallback(experiment_name="transformers-example")
    trainer = Trainer(
        model=BertForSequenceClassification(config),
        args=TrainingArguments(
            output_dir="transformers-example",
            num_train_epochs=2,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=1,  # every step: enqueued, no network I/O in the loop
            eval_strategy="epoch",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=random_tokens(128, seed=0),
        eval_dataset=random_tokens(32, seed=1),
        callbacks=[callback],
    )
    trainer.train()  # on_train_end ended the run: its events are delivered (or kept offline)
    assert callback.run_id is not None
    run = MlflowClient().get_run(callback.run_id)
    print(f"run {run.info.run_name} ({run.info.run_id}): {run.info.status}")
    print(f"  {trainer.state.global_step} steps; final metrics {run.data.metrics}")


if __name__ == "__main__":
    main()
