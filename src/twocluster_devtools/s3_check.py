"""The compose stack's one-shot S3 set-up check: wait for the bucket, then check that each
component's credentials work and that the bucket policy keeps each one to its own prefixes
(a write outside them must be refused). Exits non-zero, naming the user and the problem, so the
services that depend on it never start against a misconfigured store.

    python -m twocluster_devtools.s3_check --endpoint http://s3:7480 --bucket twocluster

Keys come from ``S3_<USER>_ACCESS_KEY`` / ``S3_<USER>_SECRET_KEY``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# user -> (a prefix it must not write to)
FORBIDDEN_WRITES = {"airflow": "datasets/", "spark": "models/", "trainer": "datasets/", "ingest": "datasets/", "operator": "raw/"}


def _client(endpoint: str, user: str):
    import boto3

    keys = [os.environ.get(f"S3_{user.upper()}_{kind}_KEY") for kind in ("ACCESS", "SECRET")]
    if not all(keys):
        raise SystemExit(f"s3_check: S3_{user.upper()}_ACCESS_KEY / S3_{user.upper()}_SECRET_KEY are not set")
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=keys[0], aws_secret_access_key=keys[1])


def main(argv: list[str] | None = None) -> int:
    from botocore.exceptions import ClientError, EndpointConnectionError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    for user, forbidden in FORBIDDEN_WRITES.items():
        client = _client(args.endpoint, user)
        while True:
            try:
                client.list_objects_v2(Bucket=args.bucket, MaxKeys=1)
                break
            except (ClientError, EndpointConnectionError) as e:
                if time.monotonic() > deadline:
                    print(f"s3_check: user {user!r} cannot list s3://{args.bucket}: {e}", file=sys.stderr)
                    return 1
                time.sleep(2)
        while True:
            try:
                client.put_object(Bucket=args.bucket, Key=f"{forbidden}_s3_check_probe", Body=b"")
            except ClientError as e:
                code = e.response["Error"]["Code"]
                if code == "AccessDenied":
                    break
                if code != "InvalidAccessKeyId" or time.monotonic() > deadline:  # not created yet: wait for it
                    raise
                time.sleep(2)
            else:
                print(f"s3_check: user {user!r} may write to {forbidden}; the bucket policy is not applied", file=sys.stderr)
                return 1
        print(f"s3_check: {user}: lists s3://{args.bucket}, may not write {forbidden}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
