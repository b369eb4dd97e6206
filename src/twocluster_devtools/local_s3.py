"""A real S3 server on 127.0.0.1 for tests and local development: Ceph's RADOS Gateway.

No MinIO binary comes from the package registries; Ceph does (Debian: ``ceph-mon ceph-osd
radosgw``). This starts the smallest cluster that serves S3: one monitor, one OSD on the
in-memory ``memstore`` backend (nothing touches a disk), and ``radosgw`` with the beast frontend,
all on loopback with cephx disabled. A fresh S3 user with random keys is created on each start,
so no credential is ever written into the repository.

    with LocalRGW(workdir) as rgw:
        rgw.s3_settings  # endpoint + keys for twocluster.store.storage
        rgw.create_bucket("test-bucket")

Or by hand: ``python -m twocluster_devtools.local_s3 --dir .local/rgw`` writes the environment
variables to export to ``.local/rgw/s3.env`` (mode 600; the output names the file, never a key)
and serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from twocluster.store.storage import S3Settings

REQUIRED_COMMANDS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")


class LocalS3Error(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_commands() -> list[str]:
    return [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]


class LocalRGW:
    """Start and stop a single-node Ceph cluster with an S3 gateway under ``workdir``."""

    def __init__(self, workdir: str | os.PathLike[str], memstore_bytes: int = 4 << 30, *, port: int | None = None,
                 bind: str = "127.0.0.1", access_key: str | None = None, secret_key: str | None = None):
        self.workdir = Path(workdir).resolve()
        self.memstore_bytes = memstore_bytes
        self.mon_port = _free_port()
        self.rgw_port = port or _free_port()
        self.bind = bind
        self.endpoint_url = f"http://127.0.0.1:{self.rgw_port}"
        # Random keys unless given (the compose stack passes its own from the environment).
        self.access_key = access_key or "LOCALRGW" + secrets.token_hex(6).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self._procs: list[subprocess.Popen] = []

    @property
    def conf(self) -> Path:
        return self.workdir / "ceph.conf"

    @property
    def s3_settings(self) -> S3Settings:
        return S3Settings(endpoint_url=self.endpoint_url, region="us-east-1", access_key=self.access_key, secret_key=self.secret_key)

    def __enter__(self) -> LocalRGW:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        missing = missing_commands()
        if missing:
            raise LocalS3Error(
                f"the local S3 server needs {', '.join(missing)}: "
                "sudo apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw"
            )
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (self.workdir / sub).mkdir(parents=True)
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        deadline = time.monotonic() + timeout
        try:
            self._run("monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", "--fsid", fsid, str(self.workdir / "monmap"))
            self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(self.workdir / "monmap"))
            self._spawn("ceph-mon", "-f", "-c", str(self.conf), "-i", "a")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._ceph("osd", "new", osd_uuid, deadline=deadline).strip()
            self._run("ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._spawn("ceph-osd", "-f", "-c", str(self.conf), "-i", osd_id)
            self._wait(lambda: json.loads(self._ceph("osd", "stat", "-f", "json", deadline=deadline))["num_up_osds"] == 1, deadline, "the OSD to come up")
            self.start_gateway(deadline - time.monotonic())
            self.add_user("tests", self.access_key, self.secret_key)
        except BaseException:
            self.stop()
            raise

    def start_gateway(self, timeout: float = 60) -> None:
        """Start radosgw (again, after :meth:`stop_gateway`: the objects live in the OSD)."""
        self._procs = [p for p in self._procs if p.args[0] != "radosgw"]
        self._spawn("radosgw", "-f", "-c", str(self.conf), "-n", "client.admin")
        self._wait(self._rgw_answers, time.monotonic() + timeout, f"radosgw to answer on {self.endpoint_url}")

    def stop_gateway(self) -> None:
        """Stop radosgw only (an S3 outage; the cluster and its objects stay)."""
        for proc in self._procs:
            if proc.args[0] == "radosgw" and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    @property
    def pids(self) -> dict[str, int]:
        """The daemons' process ids by name (each leads its own process group)."""
        return {proc.args[0]: proc.pid for proc in self._procs}

    @property
    def gateway_pid(self) -> int:
        return self.pids["radosgw"]

    def configure_bucket(self, bucket: str, users: dict[str, tuple[str, str]], policy: Path | None = None) -> None:
        """Create ``bucket``, one S3 user per component (name -> (access key, secret key)) and
        the bucket policy that limits each (its ``$bucket`` placeholder filled in): the compose
        stack's ``s3`` service and ``make stack-up`` both set the store up this way."""
        self.create_bucket(bucket)
        for name, (access_key, secret_key) in users.items():
            self.add_user(name, access_key, secret_key)
        if policy is not None:
            self.client().put_bucket_policy(Bucket=bucket, Policy=string.Template(Path(policy).read_text()).substitute(bucket=bucket))

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()

    def add_user(self, uid: str, access_key: str, secret_key: str) -> None:
        """An S3 user (bucket policies name it as ``arn:aws:iam:::user/<uid>``) with the given
        keys. The keys never go on a command line (``/proc/<pid>/cmdline`` is world-readable,
        and process listings and audit logs keep it): the user is created with a key
        ``radosgw-admin`` generates (its answer, on a pipe, is dropped), then its metadata,
        with these keys in place of that one, is put back through stdin."""
        self._run("radosgw-admin", "-c", str(self.conf), "user", "create", f"--uid={uid}", f"--display-name={uid}")
        metadata = json.loads(self._run("radosgw-admin", "-c", str(self.conf), "metadata", "get", f"user:{uid}"))
        metadata["data"]["keys"] = [{"user": uid, "access_key": access_key, "secret_key": secret_key}]
        self._run("radosgw-admin", "-c", str(self.conf), "metadata", "put", f"user:{uid}", stdin=json.dumps(metadata))

    def client(self):
        import boto3

        s = self.s3_settings
        return boto3.client(
            "s3", endpoint_url=s.endpoint_url, region_name=s.region, aws_access_key_id=s.access_key, aws_secret_access_key=s.secret_key
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    # -- helpers -----------------------------------------------------------------------------

    def _write_conf(self, fsid: str) -> None:
        d = self.workdir
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.mon_port}
mon initial members = a
public network = 127.0.0.0/8
# Loopback only, no cephx. Daemons default to "secure" messenger mode, which needs cephx.
auth cluster required = none
auth service required = none
auth client required = none
ms bind ipv6 = false
ms bind msgr1 = false
ms mon client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms client mode = crc
ms cluster mode = crc
ms service mode = crc
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
# One in-memory OSD: size-1 pools with few placement groups.
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 1000
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id

[client]
rgw frontends = beast endpoint={self.bind}:{self.rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
"""
        )

    def _run(self, *cmd: str, timeout: float = 60, stdin: str | None = None) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)
        if result.returncode != 0:
            raise LocalS3Error(f"{' '.join(cmd[:3])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result.stdout

    def _ceph(self, *args: str, deadline: float) -> str:
        remaining = max(5, int(deadline - time.monotonic()))
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", str(remaining), *args, timeout=remaining + 5)

    def _spawn(self, *cmd: str) -> None:
        log = open(self.workdir / "log" / f"{cmd[0]}.out", "wb")  # noqa: SIM115 - lives as long as the daemon
        # A session of its own: stop() signals the daemon and anything it forked.
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait(self, ready, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise LocalS3Error(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}; see {self.workdir}/log")
            try:
                if ready():
                    return
            except (LocalS3Error, ValueError, KeyError):
                pass
            time.sleep(0.25)
        raise LocalS3Error(f"timed out waiting for {what}; see {self.workdir}/log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Ceph RGW S3 server on 127.0.0.1 until interrupted.")
    parser.add_argument("--dir", default=".local/rgw", help="working folder (wiped on start)")
    parser.add_argument("--bucket", default="twocluster", help="bucket to create")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    parser.add_argument("--bind", default="127.0.0.1", help="S3 address (0.0.0.0 in a container)")
    parser.add_argument("--user", action="append", default=[], metavar="NAME",
                        help="also create user NAME with keys from $S3_<NAME>_ACCESS_KEY / $S3_<NAME>_SECRET_KEY (repeatable)")
    parser.add_argument("--bucket-policy", default=None, help="JSON bucket policy to apply (limits what each user may do)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    admin = (os.environ.get("S3_ADMIN_ACCESS_KEY"), os.environ.get("S3_ADMIN_SECRET_KEY"))
    with LocalRGW(args.dir, port=args.port, bind=args.bind, access_key=admin[0], secret_key=admin[1]) as rgw:
        users = {}
        for name in args.user:
            keys = [os.environ.get(f"S3_{name.upper()}_{k}_KEY") for k in ("ACCESS", "SECRET")]
            if not all(keys):
                raise SystemExit(f"--user {name}: set S3_{name.upper()}_ACCESS_KEY and S3_{name.upper()}_SECRET_KEY")
            users[name] = (keys[0], keys[1])
        # The policy names the bucket as $bucket, so one file serves any bucket name.
        rgw.configure_bucket(args.bucket, users, Path(args.bucket_policy) if args.bucket_policy else None)
        # The keys go to a file only its owner reads; the output (a container's log, a
        # terminal's scrollback) says where it is, never what is in it.
        keys_file = Path(args.dir) / "s3.env"
        keys_file.unlink(missing_ok=True)
        descriptor = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.writelines(f"export {key}={value}\n" for key, value in rgw.s3_settings.as_env().items())
            f.write(f"export TWOCLUSTER_STORE_URI=s3://{args.bucket}\n")
        print(f"# local RGW up in {time.perf_counter() - started:.1f}s at {rgw.endpoint_url}, bucket {args.bucket}, "
              f"users {', '.join(['admin', *users]) }")
        print(f"# the admin's keys and the store URI (mode 600): . {keys_file.resolve()}")
        sys.stdout.flush()
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
