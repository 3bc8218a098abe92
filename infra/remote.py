"""`make push` / `make pull`: `dvc push` / `dvc pull` after checking that the default DVC remote answers.

Why: DVC looks up every output it lacks a record of (`paper/dvc.yaml`'s, before `make paper` has run)
on the remote, one object at a time, and a connection error costs each lookup its retries: against an
S3 endpoint that is down, an untargeted `dvc push` took about 2 minutes on `smoke` (over 5 with
botocore's legacy retries) before it failed. Here the endpoint is asked once (boto3 `head_bucket`,
botocore's standard retries: exponential backoff with jitter, `AWS_MAX_ATTEMPTS` attempts) and an
unreachable one stops everything in seconds, named; nothing local is touched. Other arguments go to DVC.
"""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jdm.env import tool_env  # noqa: E402


def _dvc(*args: str) -> str:
    out = subprocess.run(["dvc", *args], capture_output=True, text=True, env=tool_env())
    return out.stdout.strip() if out.returncode == 0 else ""


def check_remote() -> str:
    """The default remote's URL, after checking it answers; SystemExit naming it when it does not."""
    name = _dvc("remote", "default")
    if not name:
        raise SystemExit("no default DVC remote: `make remote S3_URL=s3://bucket/prefix [S3_ENDPOINT=...]` first")
    url = _dvc("config", f"remote.{name}.url")
    if urlparse(url).scheme != "s3":
        return url  # a local or other remote: DVC's own errors are prompt enough
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = _dvc("config", f"remote.{name}.endpointurl") or None
    attempts = int(tool_env().get("AWS_MAX_ATTEMPTS", "3"))
    client = boto3.client("s3", endpoint_url=endpoint,
                          config=Config(retries={"mode": "standard", "max_attempts": attempts},
                                        connect_timeout=5, read_timeout=20))
    bucket = urlparse(url).netloc
    where = endpoint or "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "?")
        raise SystemExit(f"DVC remote {name!r} ({url} at {where}): bucket {bucket!r} answered {code}; "
                         f"check that it exists and that your AWS credentials may use it") from None
    except BotoCoreError as err:  # EndpointConnectionError, NoCredentialsError, timeouts
        raise SystemExit(f"DVC remote {name!r} ({url}) is unreachable at {where} after {attempts} attempts "
                         f"({err}); nothing was transferred") from None
    return url


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("push", "pull"):
        print("usage: remote.py push|pull [dvc arguments]", file=sys.stderr)
        return 2
    check_remote()
    return subprocess.run(["dvc", *argv], env=tool_env()).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
