"""Throwaway test services on loopback: PostgreSQL, an MLflow tracking server backed by it, a Prefect server backed by it.

    python scripts/services.py start  [--dir DIR] [--host 127.0.0.1] [--timeout 120]
    python scripts/services.py status [--dir DIR]
    python scripts/services.py stop   [--dir DIR]

Standard library only; run it with the project's virtual environment (mlflow and prefect are taken from the bin folder
of the Python that runs it). `make test` starts the services into .roads-services, runs pytest with
.roads-services/services.env sourced, and stops them; `make services` / `make services-stop` do the halves.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".roads-services"
BIN = Path(sys.executable).parent
PG_USER = "postgres"  # the system user that owns the cluster when we run as root (initdb refuses root)
ROLE = "roads"
SERVERS = {"mlflow": "/health", "prefect": "/api/health"}  # name -> health path
LOOPBACK = "127.0.0.1"

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = f"""\
start     creates DIR (default {DEFAULT_DIR.name}/ in the project) and in it: a PostgreSQL cluster (DIR/pg, owned by the
          '{PG_USER}' user when run as root; in a temporary folder if that user cannot reach DIR) with a role '{ROLE}'
          (random password) and the databases mlflow and prefect, listening on {LOOPBACK} only on a free port; an
          MLflow server (backend store: PostgreSQL, artifacts served by the server from DIR/mlartifacts) and a Prefect
          server (database: PostgreSQL, PREFECT_HOME=DIR/prefect-home, no UI), each on a free port of --host. It waits
          until both answer their health check, then writes DIR/services.env (mode 0600) with:
            ROADS_TEST_MLFLOW_URI       http://HOST:PORT of the MLflow server
            ROADS_TEST_PREFECT_API_URL  http://HOST:PORT/api of the Prefect server
            ROADS_TEST_POSTGRES_URI     postgresql+psycopg2://{ROLE}:PASSWORD@{LOOPBACK}:PORT/mlflow: the MLflow
                                        database as a SQLAlchemy URI (a tracking URI for MlflowClient; drop
                                        "+psycopg2" for psycopg2.connect)
            ROADS_TEST_SERVICES_DIR     DIR
          Logs: DIR/postgres.log, DIR/mlflow.log, DIR/prefect.log. If services are already recorded in DIR they are
          stopped first: every start is a fresh, empty set.
stop      stops the two servers (their whole process groups) and PostgreSQL, and removes DIR (and a temporary cluster
          folder). Nothing running is not an error.
status    says what runs; exit status 0 when both servers answer, 3 otherwise.

PostgreSQL always listens on {LOOPBACK} only (the servers are its only clients); --host changes where MLflow and
Prefect listen (default {LOOPBACK}). Missing PostgreSQL binaries are installed with apt-get when run as root.

use:  python scripts/services.py start && set -a && . {DEFAULT_DIR.name}/services.env && set +a
"""


# --- small helpers ------------------------------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"services: {message}", flush=True)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"services: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    return LOOPBACK if host in ("0.0.0.0", "", "::", "*") else host


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def as_pg(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the cluster's owner: the 'postgres' system user when we are root, else ourselves."""
    if not is_root():
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_USER, "--", *cmd]
    return ["su", PG_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, text=True, **kwargs)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

PG_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_pg_bin() -> Path | None:
    candidates = []
    which = shutil.which("initdb")
    if which:
        candidates.append(Path(which).parent)
    candidates.append(Path("/usr/local/bin"))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()], reverse=True)
    candidates += [Path(p) for p in versions]
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS):
            return folder
    return None


def ensure_pg_bin() -> Path:
    folder = find_pg_bin()
    if folder:
        return folder
    if is_root() and shutil.which("apt-get"):
        say("PostgreSQL not found: apt-get install -y postgresql")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
        if run(install, env=env).returncode != 0:
            run(["apt-get", "update"], env=env)
            run(install, env=env)
        folder = find_pg_bin()
        if folder:
            return folder
    fail("PostgreSQL (initdb, pg_ctl, postgres) not found: install it, e.g. `sudo apt-get install -y postgresql` "
         "(Debian/Ubuntu) or `brew install postgresql` (macOS), then rerun.")


def ensure_drivers() -> None:
    """MLflow needs psycopg2 and Prefect asyncpg in this environment; install psycopg2-binary if it is missing."""
    check = [sys.executable, "-c", "import psycopg2, asyncpg"]
    if run(check, capture_output=True).returncode == 0:
        return
    say("installing the PostgreSQL drivers (psycopg2-binary, asyncpg) into this environment")
    run([sys.executable, "-m", "pip", "install", "--quiet", "psycopg2-binary", "asyncpg"])
    if run(check, capture_output=True).returncode != 0:
        fail(f"the PostgreSQL drivers are missing: `{sys.executable} -m pip install psycopg2-binary asyncpg`")


def pg_reachable(folder: Path) -> bool:
    """Whether the cluster owner can create files in ``folder`` (every parent traversable)."""
    if not is_root():
        return True
    probe = folder / "pg-probe"
    probe.mkdir(exist_ok=True)
    try:
        shutil.chown(probe, PG_USER)
        return run(as_pg(["test", "-w", str(probe), "-a", "-x", str(probe)]), capture_output=True).returncode == 0
    finally:
        probe.rmdir()


def pg_cluster_root(folder: Path, state: dict) -> Path:
    if pg_reachable(folder):
        root = folder / "pg"
        root.mkdir()
    else:
        root = Path(tempfile.mkdtemp(prefix="roads-pg-"))
        state["pg_temp"] = True
    os.chmod(root, 0o755)
    if is_root():
        shutil.chown(root, PG_USER)
    state["pg_root"] = str(root)
    return root


def start_postgres(folder: Path, pg_bin: Path, state: dict, password: str) -> None:
    root = pg_cluster_root(folder, state)
    write_state(folder, state)  # from here on `stop` can clean up
    data, port = root / "data", free_port()
    state["pg_port"] = port
    log = folder / "postgres.log"
    with open(log, "a") as out:
        proc = run(as_pg([str(pg_bin / "initdb"), "-D", str(data), "--auth-local=peer", "--auth-host=scram-sha-256",
                          "--no-locale", "-E", "UTF8", "--no-sync", "--no-instructions"]),
                   stdout=out, stderr=subprocess.STDOUT, cwd=root)
    if proc.returncode != 0:
        fail(f"initdb failed:\n{tail(log)}")
    settings = {  # a throwaway test cluster: loopback only, socket in the cluster folder, durability traded for speed
        "listen_addresses": f"'{LOOPBACK}'",
        "port": str(port),
        "unix_socket_directories": f"'{root}'",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\n# scripts/services.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    (data / "pg_hba.conf").write_text(
        "# scripts/services.py: the owner over the cluster's own socket, everyone else by password on loopback\n"
        "local all all peer\n"
        f"host all all {LOOPBACK}/32 scram-sha-256\n")
    write_state(folder, state)
    with open(log, "a") as out:
        proc = run(as_pg([str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "start"]),
                   stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    if proc.returncode != 0:
        fail(f"PostgreSQL did not start:\n{tail(log)}")
    psql = pg_bin / "psql" if (pg_bin / "psql").exists() else shutil.which("psql")
    if not psql:
        fail("psql not found next to the PostgreSQL server: install the PostgreSQL client (apt-get install postgresql-client)")
    sql = (f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}';\n"
           f"CREATE DATABASE mlflow OWNER {ROLE};\n"
           f"CREATE DATABASE prefect OWNER {ROLE};\n"
           "\\connect prefect\n"
           "CREATE EXTENSION IF NOT EXISTS pg_trgm;\n")  # Prefect's migrations want it
    proc = run(as_pg([str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(root), "-p", str(port), "-d", "postgres"]),
               input=sql, capture_output=True, cwd=root)
    if proc.returncode != 0:
        fail(f"creating the role and databases failed: {proc.stderr.strip()}")


def stop_postgres(state: dict, folder: Path) -> None:
    root = Path(state["pg_root"]) if state.get("pg_root") else folder / "pg"
    data = root / "data"
    if (data / "postmaster.pid").exists():
        pg_bin = Path(state["pg_bin"]) if state.get("pg_bin") else find_pg_bin()
        if pg_bin is None:
            say("PostgreSQL binaries not found: cannot stop the cluster in " + str(data))
        else:
            proc = run(as_pg([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]),
                       capture_output=True, cwd="/")
            if proc.returncode != 0:
                say(f"pg_ctl stop: {(proc.stderr or proc.stdout).strip()}")
    if state.get("pg_temp") and root.exists():
        shutil.rmtree(root, ignore_errors=True)


# --- the two servers ----------------------------------------------------------------------------------------------

def server_env(name: str, folder: Path, pg_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROADS_TEST_",))}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    if name == "mlflow":
        env.update({
            "MLFLOW_BACKEND_STORE_URI": sqlalchemy_uri(pg_url, "mlflow"),  # environment, not argv: no password in ps
            "MLFLOW_ARTIFACTS_DESTINATION": str(folder / "mlartifacts"),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
    else:
        env.pop("PREFECT_API_URL", None)
        env.update({
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": pg_url.replace("postgresql://", "postgresql+asyncpg://") + "/prefect",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
        })
    return env


def sqlalchemy_uri(pg_url: str, database: str) -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed; name the psycopg2 driver."""
    return pg_url.replace("postgresql://", "postgresql+psycopg2://") + "/" + database


def server_cmd(name: str, host: str, port: int) -> list[str]:
    if name == "mlflow":
        return [str(BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1", "--serve-artifacts"]
    return [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port), "--no-ui"]


def start_server(name: str, folder: Path, host: str, pg_url: str, state: dict) -> subprocess.Popen:
    port = free_port(client_host(host))
    state[f"{name}_port"] = port
    with open(folder / f"{name}.log", "a") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(server_cmd(name, host, port), env=server_env(name, folder, pg_url), cwd=folder,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def server_url(name: str, state: dict) -> str:
    return f"http://{url_host(client_host(state['host']))}:{state[f'{name}_port']}"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(procs: dict[str, subprocess.Popen], folder: Path, state: dict, timeout: float) -> None:
    deadline, pending = time.time() + timeout, set(procs)
    while pending:
        for name in sorted(pending):
            if healthy(server_url(name, state) + SERVERS[name]):
                pending.discard(name)
                say(f"{name} up after {time.time() - state['started']:.1f} s")
            elif procs[name].poll() is not None:
                fail(f"the {name} server exited with status {procs[name].returncode}; {folder / (name + '.log')}:\n"
                     f"{tail(folder / (name + '.log'))}")
        if pending and time.time() > deadline:
            name = sorted(pending)[0]
            fail(f"the {name} server did not answer {SERVERS[name]} within {timeout:.0f} s; "
                 f"{folder / (name + '.log')}:\n{tail(folder / (name + '.log'))}")
        if pending:
            time.sleep(0.5)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc; without /proc, whether the group exists."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def ours(pid: int, name: str) -> bool:
    """Whether ``pid`` still is the server we started (guards against a reused pid)."""
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return not Path("/proc").is_dir()


def stop_server(name: str, folder: Path) -> None:
    pid_file = folder / f"{name}.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if not group_members(pid):
        return
    if not ours(pid, name):
        say(f"pid {pid} in {pid_file} is no {name} process: left alone")
        return
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if not group_members(pid):
                return
            time.sleep(0.2)
    say(f"the {name} server (process group {pid}) did not exit")


# --- commands -----------------------------------------------------------------------------------------------------

def write_state(folder: Path, state: dict) -> None:
    write_private(folder / "state.json", json.dumps(state, indent=1))


def recorded(folder: Path) -> bool:
    return (folder / "state.json").exists() or any((folder / f"{n}.pid").exists() for n in SERVERS)


def cmd_start(args) -> int:
    folder = Path(args.dir).resolve()
    if folder.exists() and recorded(folder):
        say(f"services recorded in {folder}: stopping them first")
        cmd_stop(args)
    elif folder.exists() and any(folder.iterdir()):
        fail(f"{folder} exists and is not a services folder: choose another --dir or remove it")
    ensure_drivers()
    pg_bin = ensure_pg_bin()
    started = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    state = {"host": args.host, "pg_bin": str(pg_bin), "started": started}
    try:
        password = secrets.token_urlsafe(24)
        start_postgres(folder, pg_bin, state, password)
        say(f"PostgreSQL up on {LOOPBACK}:{state['pg_port']} after {time.time() - started:.1f} s")
        pg_url = f"postgresql://{ROLE}:{password}@{LOOPBACK}:{state['pg_port']}"
        (folder / "mlartifacts").mkdir(exist_ok=True)
        procs = {name: start_server(name, folder, args.host, pg_url, state) for name in SERVERS}
        write_state(folder, state)
        wait_healthy(procs, folder, state, args.timeout)
    except BaseException:
        say("start failed: stopping what was started (logs kept in " + str(folder) + ")")
        stop_all(folder, remove=False)
        raise
    env = {
        "ROADS_TEST_MLFLOW_URI": server_url("mlflow", state),
        "ROADS_TEST_PREFECT_API_URL": server_url("prefect", state) + "/api",
        "ROADS_TEST_POSTGRES_URI": sqlalchemy_uri(pg_url, "mlflow"),
        "ROADS_TEST_SERVICES_DIR": str(folder),
    }
    write_private(folder / "services.env", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    say(f"ready in {time.time() - started:.1f} s: MLflow {env['ROADS_TEST_MLFLOW_URI']}, "
        f"Prefect {env['ROADS_TEST_PREFECT_API_URL']}, PostgreSQL {ROLE}@{LOOPBACK}:{state['pg_port']} "
        f"(databases mlflow, prefect); environment in {folder / 'services.env'}")
    return 0


def stop_all(folder: Path, remove: bool) -> None:
    state = read_json(folder / "state.json")
    for name in SERVERS:
        stop_server(name, folder)
    stop_postgres(state, folder)
    if remove:
        shutil.rmtree(folder, ignore_errors=True)


def cmd_stop(args) -> int:
    folder = Path(args.dir).resolve()
    if not folder.exists():
        say(f"nothing to stop in {folder}")
        return 0
    if not any(folder.iterdir()):
        folder.rmdir()
        return 0
    if not recorded(folder) and not (folder / "pg").exists():
        fail(f"{folder} is not a services folder: left alone")
    started = time.time()
    stop_all(folder, remove=True)
    say(f"stopped and removed {folder} in {time.time() - started:.1f} s")
    return 0


def cmd_status(args) -> int:
    folder = Path(args.dir).resolve()
    state = read_json(folder / "state.json")
    if not state:
        say(f"nothing recorded in {folder}")
        return 3
    up = 0
    for name, path in SERVERS.items():
        if f"{name}_port" not in state:
            continue
        ok = healthy(server_url(name, state) + path)
        up += ok
        say(f"{name}: {server_url(name, state)} {'up' if ok else 'DOWN'}")
    pg_up = Path(state.get("pg_root", folder / "pg"), "data", "postmaster.pid").exists()
    say(f"postgres: {LOOPBACK}:{state.get('pg_port', '?')} {'running' if pg_up else 'DOWN'}")
    return 0 if up == len(SERVERS) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="services.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, helptext in (("start", "start PostgreSQL, MLflow and Prefect; write DIR/services.env"),
                           ("stop", "stop them and remove DIR"), ("status", "say what runs")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--dir", default=str(DEFAULT_DIR), help=f"state folder (default: {DEFAULT_DIR})")
        if name == "start":
            p.add_argument("--host", default=LOOPBACK, help=f"address MLflow and Prefect bind (default: {LOOPBACK})")
            p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each server (default: 120)")
    args = parser.parse_args(argv)
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
