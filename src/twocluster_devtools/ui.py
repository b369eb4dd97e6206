"""`make ui`: the Airflow API server with the ops page, on the embedded default's store
(``.local/store``) and Airflow home (``.local/airflow``), on 127.0.0.1 until Ctrl-C.

The login is printed once; the password is generated per start and kept in a file only the
owner can read (``.local/airflow/simple_auth_manager_passwords.json``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from twocluster_devtools.airflow_local import REPO_ROOT, ApiServer, airflow_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"file://{REPO_ROOT / '.local' / 'store'}")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--local-dir", default=str(REPO_ROOT / ".local"))
    args = parser.parse_args(argv)
    home = Path(args.local_dir) / "airflow"
    server = ApiServer(airflow_env(home, args.store), home, port=args.port)
    print(f"starting the Airflow API server on {server.url} (log: {home / 'api-server.log'}) ...", flush=True)
    with server:
        print(f"\n  Airflow UI:  {server.url}/   (Browse -> Pipeline health)\n"
              f"  ops page:    {server.url}/twocluster/\n"
              f"  login:       {server.user} / {server.password}\n"
              f"  store:       {args.store}\n\nCtrl-C to stop.", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
