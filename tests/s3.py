"""A private S3-compatible server for the tests and benchmarks: moto's server mode.

``PrivateS3`` starts ``python -m moto.server`` (moto[server], from PyPI) on 127.0.0.1 and
a free port, as a separate process that zoo reaches over HTTP with boto3, exactly as it
would reach S3 or MinIO; ``stop`` ends it. moto keeps the buckets in memory.

With ``auth=True`` the server checks credentials (moto's IAM mode): one user with an
access key and an allow-all policy is made first, and any other key is refused. moto
cannot serve presigned URLs in that mode, so the tests use two servers: one open (for
everything else) and one that checks credentials (for the wrong-credentials line).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REGION = "us-east-1"


def available() -> tuple[bool, str]:
    """Whether moto's server and boto3 can be imported (``pip install 'zoo[s3]' 'moto[server]'``)."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as e:
        return False, f"no S3 test server: {e} (pip install -c constraints.txt -e '.[s3,test]')"
    return True, ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateS3:
    """One moto server on loopback, for one test session."""

    def __init__(self, auth: bool = False):
        self.port = _free_port()
        self.auth = auth
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key, self.secret_key = "zoo-test", "zoo-test-secret"
        self.log = Path(tempfile.mkstemp(prefix="zoo-s3-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "PrivateS3":
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the user, its key and its policy; then every call is checked
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                           str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)
        if self.auth:
            self._make_user()
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="zoo")
        key = iam.create_access_key(UserName="zoo")["AccessKey"]
        iam.put_user_policy(UserName="zoo", PolicyName="all", PolicyDocument=(
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, **changes: str) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and so zoo) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true", **changes}

    def client(self):  # noqa: ANN201 (a boto3 client)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None
        self.log.unlink(missing_ok=True)
