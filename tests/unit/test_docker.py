"""docker/: the compose stack and the two images, checked by parsing (no container engine runs here).

compose.yaml: the four services, loopback-only ports, no literal password (only `${...}` substitution, and none in a
connection URL), coherent depends_on/healthchecks, build files and bind mounts that exist, declared volumes.
Dockerfiles: a line parser (continuations, comments) checks the instructions, the COPY sources, the torch pin against
pyproject.toml, the wheel index, ARG scoping and a non-root USER."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
SERVICES = ("postgres", "prefect-server", "mlflow", "worker")
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# ${VAR}, ${VAR:-default}, ${VAR:?message}, ${VAR:+alt} (compose and shell); $VAR
SUBST = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                   r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
WHOLE_SUBST = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}$")
URL_USERINFO = re.compile(r"[a-z][a-z0-9+.\-]*://(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@", re.I)
# names that hold a secret: POSTGRES_PASSWORD, PGPASSWORD, HF_TOKEN, PREFECT_API_KEY (not TOKENIZERS_PARALLELISM)
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|API_?KEY|(?:^|_)TOKEN(?:$|_)", re.I)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(compose: dict) -> dict:
    return compose.get("services") or {}


def walk_strings(node, path="$"):
    """Every string in a parsed YAML document (keys and values) with where it sits."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", str(key)
            yield from walk_strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def masked(value: str) -> str:
    """The text with every substitution replaced by a marker, so that `${USER:-roads}` reads as one word."""
    return SUBST.sub("SUBSTITUTED", value.replace("$$", ""))


def compose_default(value: str) -> str:
    """The value compose gives a `${VAR:-default}` string when VAR is unset."""
    return SUBST.sub(lambda m: m["arg"] if m["op"] in ("-", ":-") else "", value)


# ---------------------------------------------------------------------------------------------------- compose.yaml


def test_compose_has_the_four_services(compose):
    missing = [name for name in SERVICES if name not in services(compose)]
    assert not missing, f"docker/compose.yaml lacks the service(s) {missing}"


def test_published_ports_are_loopback_only(compose):
    bad = []
    for name, service in services(compose).items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                if port.get("host_ip") != "127.0.0.1":
                    bad.append(f"{name}: {port} (long syntax without host_ip: 127.0.0.1)")
            elif not str(port).startswith("127.0.0.1:"):
                bad.append(f"{name}: {port!r}")
        if service.get("network_mode") == "host":
            bad.append(f"{name}: network_mode host bypasses the port bindings")
    assert not bad, "published ports must be bound to 127.0.0.1 (\"127.0.0.1:HOST:CONTAINER\"): " + "; ".join(bad)


def test_postgres_is_not_published_beyond_loopback(compose):
    ports = services(compose)["postgres"].get("ports") or []
    assert all(str(p).startswith("127.0.0.1:") for p in ports), f"postgres publishes {ports} beyond 127.0.0.1"


def test_no_literal_password(compose):
    bad = []
    for name, service in services(compose).items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key) and value is not None and not WHOLE_SUBST.match(value):
                bad.append(f"{name}.environment.{key} is a literal value, not a ${{...}} substitution")
    for where, text in walk_strings(compose):
        for match in URL_USERINFO.finditer(masked(text)):
            if match["password"] != "SUBSTITUTED":
                bad.append(f"{where}: a connection URL with a literal password")
    assert not bad, "a password in docker/compose.yaml must come from docker/.env: " + "; ".join(bad)


def test_the_database_password_is_required_and_not_in_urls(compose):
    text = COMPOSE_FILE.read_text()
    uses = re.findall(r"\$\{POSTGRES_PASSWORD(?P<rest>[^}]*)\}", text)
    assert uses, "docker/compose.yaml never substitutes ${POSTGRES_PASSWORD}"
    assert all(rest.startswith(":?") for rest in uses), (
        f"every ${{POSTGRES_PASSWORD...}} must carry the required marker (:?message), found {uses}")
    for where, value in walk_strings(compose):
        assert not URL_USERINFO.search(masked(value)), f"{where}: a password inside a URL can end up in a log"


def test_workers_never_get_the_database_password(compose):
    for name, service in services(compose).items():
        if name.startswith("worker"):
            secrets = [k for k, v in environment(service).items() if "POSTGRES_PASSWORD" in (v or "") or
                       SECRET_KEY.search(k)]
            assert not secrets, f"{name} gets {secrets}; only the database's clients need the password"


def test_env_example_holds_no_secret():
    example = DOCKER / ".env.example"
    assert example.is_file(), "docker/.env.example is missing"
    values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    assert "POSTGRES_PASSWORD" in values, "docker/.env.example does not name POSTGRES_PASSWORD"
    assert values["POSTGRES_PASSWORD"].strip() == "", (
        "docker/.env.example must leave POSTGRES_PASSWORD empty (compose then refuses to start until it is set)")
    assert ".env" in (DOCKER / ".gitignore").read_text().split(), "docker/.env must be git-ignored (docker/.gitignore)"


def test_depends_on_and_healthchecks_are_coherent(compose):
    svcs = services(compose)
    problems = []
    for name, service in svcs.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            if dep not in svcs:
                problems.append(f"{name} depends on {dep!r}, which is not a service")
                continue
            if (spec or {}).get("condition") == "service_healthy" and not svcs[dep].get("healthcheck"):
                problems.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if "gpu" in (svcs[dep].get("profiles") or []) and "gpu" not in (service.get("profiles") or []):
                problems.append(f"{name} depends on {dep}, which only starts with --profile gpu")
        check = service.get("healthcheck")
        if check and not check.get("disable"):
            test = check.get("test")
            if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL")) and not isinstance(test, str):
                problems.append(f"{name}: healthcheck test must be [\"CMD\", ...], [\"CMD-SHELL\", ...] or a string")
    for name in ("prefect-server", "mlflow", "worker"):
        depends = svcs[name].get("depends_on") or {}
        if not isinstance(depends, dict) or not all((s or {}).get("condition") == "service_healthy"
                                                      for s in depends.values()):
            problems.append(f"{name} must wait for its dependencies with condition: service_healthy")
    for name in SERVICES:
        if not svcs[name].get("healthcheck"):
            problems.append(f"{name} has no healthcheck")
    assert not problems, "; ".join(problems)


def test_build_files_and_bind_mounts_exist(compose):
    problems = []
    for name, service in services(compose).items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = (DOCKER / compose_default(build.get("context", "."))).resolve()
            dockerfile = context / compose_default(build.get("dockerfile", "Dockerfile"))
            if context != ROOT:
                problems.append(f"{name}: build context {context} is not the repository root")
            if not dockerfile.is_file():
                problems.append(f"{name}: build.dockerfile {dockerfile} does not exist")
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else str(volume).split(":", 1)[0]
            if source.startswith((".", "/", "~")) and not (DOCKER / source).exists():
                problems.append(f"{name}: bind-mount source {source} does not exist (relative to docker/)")
    assert not problems, "; ".join(problems)


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services(compose).items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type", "volume") == "volume" and volume.get("source"):
                    used.add((name, volume["source"]))
            else:
                source = str(volume).split(":", 1)[0]
                if ":" in str(volume) and not source.startswith((".", "/", "~", "$")):
                    used.add((name, source))
    undeclared = sorted(f"{service}: {vol}" for service, vol in used if vol not in declared)
    assert not undeclared, f"named volumes used but not declared under top-level volumes: {undeclared}"
    unused = declared - {vol for _, vol in used}
    assert not unused, f"volumes declared but never mounted: {sorted(unused)}"


def test_workers_share_the_roads_store_and_reach_the_servers(compose):
    svcs = services(compose)
    workers = {name: s for name, s in svcs.items() if name.startswith("worker")}
    assert "worker-gpu" in workers, "the GPU worker (profile gpu) is missing"
    for name, service in workers.items():
        env = environment(service)
        assert env.get("PREFECT_API_URL") == "http://prefect-server:4200/api", f"{name}: PREFECT_API_URL"
        assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000", f"{name}: MLFLOW_TRACKING_URI"
        home = env.get("ROADS_HOME")
        mounts = {str(v).split(":")[1] for v in service.get("volumes") or [] if str(v).startswith("roads-data:")}
        assert home and home in mounts, f"{name}: ROADS_HOME ({home}) is not on the shared roads-data volume"
    gpu = workers["worker-gpu"]
    assert gpu.get("profiles") == ["gpu"], "worker-gpu must only start with --profile gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), (
        "worker-gpu must reserve nvidia GPUs")
    assert "Dockerfile.cuda" in gpu["build"]["dockerfile"], "worker-gpu must build docker/Dockerfile.cuda"


def test_mlflow_server_accepts_the_workers_host_header(compose):
    command = services(compose)["mlflow"]["command"]
    command = command if isinstance(command, list) else command.split()
    hosts = [compose_default(arg.split("=", 1)[1]) for arg in command if arg.startswith("--allowed-hosts=")]
    assert hosts, "mlflow server needs --allowed-hosts: MLflow 3 rejects the Host header mlflow:5000 by default"
    allowed = hosts[0].split(",")
    for host in ("mlflow:5000", "127.0.0.1:5000", "localhost:5000"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), f"--allowed-hosts does not admit {host}"


def test_compose_build_args_match_the_dockerfile_defaults(compose):
    """A build arg that compose passes with a default must default to what the Dockerfile says (no drift)."""
    for name, service in services(compose).items():
        build = service.get("build")
        if not isinstance(build, dict) or not build.get("args"):
            continue
        dockerfile = ROOT / build["dockerfile"]
        args = build["args"]
        args = dict(a.split("=", 1) for a in args) if isinstance(args, list) else args
        defaults = arg_defaults(parse_dockerfile(dockerfile))
        for key, value in args.items():
            assert key in defaults, f"{name}: build arg {key} is not an ARG of {dockerfile.name}"
            assert compose_default(str(value)) == defaults[key], (
                f"{name}: build arg {key} defaults to {compose_default(str(value))!r} in compose.yaml but "
                f"{defaults[key]!r} in {dockerfile.name}")


# ------------------------------------------------------------------------------------------------------ Dockerfiles


def parse_dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments): comments and blank lines dropped, `\\` continuations joined (comment
    lines inside a continuation are skipped, as Docker does)."""
    out, buffer, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, rest = buffer.partition(" ")
        out.append((start, keyword, rest.strip()))
        buffer = ""
    assert not buffer, f"{path.name}: the file ends inside a `\\` continuation"
    return out


def arg_defaults(instructions) -> dict[str, str]:
    """ARG NAME=default values, with earlier ARGs substituted (ARG B=${A}/x)."""
    values: dict[str, str] = {}
    for _, keyword, rest in instructions:
        if keyword.upper() == "ARG":
            name, _, default = rest.partition("=")
            values[name.strip()] = substitute(default.strip().strip('"'), values)
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    def one(m):
        name = m["name"] or m["bare"]
        value = values.get(name, "")
        if m["op"] in ("-", ":-"):
            return value or m["arg"]
        if m["op"] in ("+", ":+"):
            return m["arg"] if value else ""
        return value
    for _ in range(5):
        text = SUBST.sub(one, text)
    return text


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1].strip() for d in deps if re.match(r"^torch\s*==", d)]
    assert pins, "pyproject.toml does not pin torch with =="
    return pins[0]


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request):
    path = DOCKERFILES[request.param]
    assert path.is_file(), f"{path} is missing"
    return request.param, path, parse_dockerfile(path)


def test_first_instruction_is_from(dockerfile):
    _, path, instructions = dockerfile
    keywords = [k.upper() for _, k, _ in instructions]
    assert "FROM" in keywords, f"{path.name} has no FROM"
    before = keywords[:keywords.index("FROM")]
    assert set(before) <= {"ARG"}, f"{path.name}: only ARG may come before the first FROM, found {before}"


def test_instructions_are_valid(dockerfile):
    _, path, instructions = dockerfile
    bad = [f"line {n}: {k}" for n, k, _ in instructions if k.upper() not in INSTRUCTIONS]
    assert not bad, f"{path.name}: not Dockerfile instructions: {bad}"
    for n, keyword, rest in instructions:
        if keyword.upper() in ("CMD", "ENTRYPOINT") and rest.startswith("["):
            try:
                assert all(isinstance(x, str) for x in json.loads(rest))
            except (ValueError, AssertionError):
                pytest.fail(f"{path.name} line {n}: {keyword} exec form is not a JSON list of strings: {rest}")


def test_copy_sources_exist_in_the_build_context(dockerfile):
    _, path, instructions = dockerfile
    ignore = path.with_name(path.name + ".dockerignore")
    ignored = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")] \
        if ignore.is_file() else []
    missing = []
    for n, keyword, rest in instructions:
        if keyword.upper() not in ("COPY", "ADD"):
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        if any(w.startswith("--from") for w in rest.split()):
            continue  # from another stage or image
        for source in words[:-1]:
            if any(c in source for c in "*?["):
                continue
            if not (ROOT / source).exists():
                missing.append(f"line {n}: {source}")
            elif ignored and not kept_by_dockerignore(source.rstrip("/"), ignored):
                missing.append(f"line {n}: {source} (excluded by {ignore.name})")
    assert not missing, f"{path.name}: COPY sources missing from the build context (the repository root): {missing}"


def kept_by_dockerignore(source: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path (or a parent of it) decides."""
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern == "**" or fnmatch.fnmatch(source, pattern):
            keep = negate
    return keep


def test_torch_is_pinned_like_pyproject(dockerfile):
    kind, path, instructions = dockerfile
    pin = torch_pin()
    args = arg_defaults(instructions)
    installs = [substitute(rest, args) for _, k, rest in instructions if k.upper() == "RUN" and "torch==" in rest]
    assert installs, f"{path.name} never installs torch==..."
    for text in installs:
        versions = set(re.findall(r"torch==([0-9][^\s\"'+]*)", text))
        assert versions == {pin}, f"{path.name} installs torch {versions}, pyproject.toml pins torch=={pin}"
        if kind == "cpu":
            assert "https://download.pytorch.org/whl/cpu" in text, (
                f"{path.name} must install torch from the CPU wheel index (https://download.pytorch.org/whl/cpu)")
        else:
            assert re.search(r"https://download\.pytorch\.org/whl/cu\d+", text), (
                f"{path.name} must install torch from a CUDA wheel index (https://download.pytorch.org/whl/cuXYZ)")
    extras = [rest for _, k, rest in instructions if k.upper() == "RUN" and re.search(r"pip install .*\"?\.\[", rest)]
    assert extras and all("servers" in substitute(e, args) and "ray" in substitute(e, args) for e in extras), (
        f"{path.name} must install the project with the servers and ray extras")


def test_project_is_installed_editable_in_app(dockerfile):
    """`roads deploy` records the folder of the installed flows/deploy.py as the deployment's working directory: it
    must be /app (where pipelines.yaml is), not site-packages."""
    _, path, instructions = dockerfile
    workdirs = [rest for _, k, rest in instructions if k.upper() == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app", f"{path.name}: the final WORKDIR must be /app, found {workdirs}"
    editable = [rest for _, k, rest in instructions if k.upper() == "RUN"
                and re.search(r"pip install\b[^&;]*(?:--editable|-e)\s+\.(?:\s|$)", rest)]
    assert editable, f"{path.name} must install the project with `pip install --no-deps --editable .` in /app"


def test_installed_extras_exist_in_pyproject(dockerfile):
    """pip only warns about an unknown extra: without `servers` (psycopg2) the MLflow server cannot reach PostgreSQL."""
    _, path, instructions = dockerfile
    wanted = {e.strip() for e in arg_defaults(instructions).get("EXTRAS", "").split(",") if e.strip()}
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))
    assert wanted, f"{path.name} has no ARG EXTRAS"
    assert wanted <= defined, (f"{path.name} installs the extras {sorted(wanted - defined)}, which pyproject.toml's "
                               f"[project.optional-dependencies] does not define (it has {sorted(defined)})")


def test_cuda_wheels_match_the_base_image():
    instructions = parse_dockerfile(DOCKERFILES["cuda"])
    args = arg_defaults(instructions)
    base = substitute(next(rest for _, k, rest in instructions if k.upper() == "FROM"), args)
    match = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert match, f"Dockerfile.cuda must build FROM an nvidia/cuda image, found {base!r}"
    assert args.get("TORCH_CUDA") == f"cu{match[1]}{match[2]}", (
        f"TORCH_CUDA={args.get('TORCH_CUDA')} does not match the base image's CUDA {match[1]}.{match[2]}")


def test_runs_as_a_non_root_user(dockerfile):
    _, path, instructions = dockerfile
    users = [rest.split(":")[0] for _, k, rest in instructions if k.upper() == "USER"]
    assert users, f"{path.name} has no USER instruction (it would run as root)"
    assert users[-1] not in ("root", "0"), f"{path.name}: the final USER is {users[-1]}"
    assert any(k.upper() == "ENV" and "ROADS_HOME=/data/roads" in rest for _, k, rest in instructions), (
        f"{path.name} must set ROADS_HOME=/data/roads")


def test_both_images_use_the_same_uid():
    uids = {kind: arg_defaults(parse_dockerfile(path)).get("APP_UID") for kind, path in DOCKERFILES.items()}
    assert len(set(uids.values())) == 1 and None not in uids.values(), (
        f"the CPU and CUDA images must create their user with the same uid (shared roads-data volume): {uids}")


def test_args_are_declared_in_the_stage_that_uses_them(dockerfile):
    """An ARG declared before FROM is only visible to FROM; a stage must declare (ARG) or set (ENV) what it uses."""
    _, path, instructions = dockerfile
    known = {"PATH", "HOME", "HOSTNAME"}
    global_args, stage, problems = set(), None, []
    for n, keyword, rest in instructions:
        keyword = keyword.upper()
        used = {m["name"] or m["bare"] for m in SUBST.finditer(rest)}
        if keyword == "FROM":
            problems += [f"line {n}: FROM uses {v}, not an ARG before it" for v in used - global_args]
            stage = set(known)
            continue
        if stage is None:
            if keyword == "ARG":
                global_args.add(rest.partition("=")[0].strip())
            continue
        if keyword == "RUN":
            used = {v for v in used if v.isupper()}  # lower-case names are the shell's own variables
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            problems += [f"line {n}: ARG {name} uses {v}" for v in used - stage]
            stage.add(name.strip())
            continue
        problems += [f"line {n}: {keyword} uses ${v}, not declared in this stage" for v in sorted(used - stage)]
        if keyword == "ENV":
            stage |= set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest))
    assert not problems, f"{path.name}: {problems}"
