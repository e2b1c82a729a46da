"""Server limits that tracklane enforces before anything leaves the process.

Every number here is the MLflow tracking server's own, read from ``mlflow/utils/validation.py``
(MLflow 3.17); checking them at the call site turns a rejected batch on the server into an error
the caller sees on the line that caused it.
"""

from __future__ import annotations

import re

#: ``MAX_ENTITY_KEY_LENGTH``: longest metric, param or tag key.
MAX_KEY_LENGTH = 250
#: ``MAX_PARAM_VAL_LENGTH``.
MAX_PARAM_VALUE_LENGTH = 6000
#: ``MAX_TAG_VAL_LENGTH``: run tags.
MAX_TAG_VALUE_LENGTH = 8000
#: ``MAX_EXPERIMENT_TAG_VAL_LENGTH``.
MAX_EXPERIMENT_TAG_VALUE_LENGTH = 20000
#: ``MAX_METRICS_PER_BATCH``.
MAX_METRICS_PER_BATCH = 1000
#: ``MAX_PARAMS_TAGS_PER_BATCH``: params and tags each.
MAX_PARAMS_TAGS_PER_BATCH = 100
#: ``MAX_ENTITIES_PER_BATCH``: metrics + params + tags in one request.
MAX_ENTITIES_PER_BATCH = 1000
#: ``MAX_BATCH_LOG_REQUEST_SIZE``: bytes of JSON in one log-batch request.
MAX_BATCH_REQUEST_BYTES = 1_000_000
#: ``validate_param_and_metric_name`` (non-Windows server).
KEY_PATTERN = re.compile(r"^[/\w.\- :]*$")
#: Steps are stored as 64-bit integers (``metrics.step BIGINT``).
MAX_STEP = 2**63 - 1
MIN_STEP = -(2**63)
