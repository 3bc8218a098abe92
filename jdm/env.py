"""The environment every tool the project starts gets: set before that tool is imported.

Offline switches: nothing may reach a hub or phone home (the embedded default runs with no network).
Bounded retries: botocore's standard retry mode (exponential backoff with jitter) and 3 attempts, for
DVC's S3 remote (s3fs) and MLflow's S3 artifacts (boto3). With botocore's legacy default, an untargeted
`dvc push` to an endpoint that was down retried each object it looked up 5 times and ran past 5
minutes; with these, about 2 minutes on `smoke` (`make push` checks the endpoint once first: 7 s).
A value the user set explicitly always wins.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # otherwise `mlflow server` leaves job consumer processes behind
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
RETRY_ENV = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "3"}
TOOL_ENV = {**OFFLINE_ENV, **RETRY_ENV}


def set_offline_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Fill in the offline switches and retry bounds; a value the user set explicitly wins."""
    for key, value in TOOL_ENV.items():
        environ.setdefault(key, value)


def tool_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: this process's environment) with TOOL_ENV filled in."""
    env = dict(os.environ if base is None else base)
    set_offline_env(env)
    return env
