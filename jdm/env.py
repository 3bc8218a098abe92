"""Offline switches: set wherever the project starts a tool, before that tool is imported.

Nothing here may reach a hub or phone home: the embedded default runs with no network.
"""

import os

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


def set_offline_env(environ=os.environ) -> None:
    """Fill in the offline switches; a value the user set explicitly wins."""
    for key, value in OFFLINE_ENV.items():
        environ.setdefault(key, value)
