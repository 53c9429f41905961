"""Static checks of the deployment files.

Dockerfile, .dockerignore, docker-compose.yml, deploy/nginx, deploy/k8s and the Grafana
dashboard are read and checked for shape and for agreement with each other and with the
project (pyproject.toml). Nothing is built or started; no Docker daemon or cluster is needed.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
K8S = REPO / "deploy" / "k8s"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
DASHBOARD = REPO / "deploy" / "grafana" / "taskmanager-dashboard.json"

WEB_SERVICES = ("web1", "web2")
WORKER_SERVICES = ("worker", "worker-webhooks")
APP_SERVICES = (*WEB_SERVICES, *WORKER_SERVICES, "scheduler", "archiver")
WEB_PORT = 8000
# What every app process needs to find its peers and run in production.
REQUIRED_ENV = (
    "APP_ENV",
    "MONGODB_URL",
    "MONGODB_DB",
    "REDIS_URL",
    "BROKER_URL",
    "JWT_SECRET",
    "SMTP_URL",
    "MAIL_FROM",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "RATE_LIMIT",
    "BACKUP_DIR",
)
KNOWN_METRICS = {
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "taskmanager_queue_messages",
    "cache_requests_total",
    "taskmanager_worker_messages_processed_total",
    "taskmanager_worker_messages_failed_total",
    "taskmanager_worker_messages_retried_total",
    "taskmanager_worker_messages_dead_lettered_total",
    "taskmanager_worker_message_duration_seconds_bucket",
}
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yaml"
# Dramatiq's Redis broker keeps a queue's ready message ids in the list "<namespace>:<queue>";
# the app's broker namespace is "tm:dramatiq".
WORKER_QUEUE_KEY = "tm:dramatiq:{}"


# --------------------------------------------------------------------------------------------
# helpers


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_packages() -> list[str]:
    """Top-level packages the wheel ships, from [tool.setuptools] packages.find.include."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@cache
def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue  # comments (and parser directives) may sit inside a continuation too
        if not line and not pending:
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def stages() -> list[list[Instruction]]:
    """Instructions grouped per build stage (each list starts with its FROM)."""
    result: list[list[Instruction]] = []
    for ins in dockerfile():
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def final_stage() -> list[Instruction]:
    return stages()[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def strip_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """Split `--flag=value` options from the operands of COPY/ADD/HEALTHCHECK."""
    tokens = exec_form(args) if args.startswith("[") else shlex.split(args)
    flags: dict[str, str] = {}
    while tokens and tokens[0].startswith("--"):
        name, _, value = tokens.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, tokens


def dockerfile_user_uid() -> str:
    users = [ins.args for ins in final_stage() if ins.keyword == "USER"]
    assert users, "the final stage never sets USER, so the app runs as root"
    return users[-1].split(":")[0]


def context_copies() -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not another stage)."""
    sources: list[str] = []
    for ins in dockerfile():
        if ins.keyword in ("COPY", "ADD"):
            flags, operands = strip_flags(ins.args)
            if "from" not in flags:
                assert len(operands) >= 2, f"{ins.keyword} {ins.args}: no destination"
                sources.extend(operands[:-1])
    return sources


# .dockerignore, following Docker's rules (moby/patternmatcher): patterns are relative to the
# context root; `*` and `?` do not cross "/", `**` spans directories; a path is excluded when
# it or one of its parent directories matches; `!` re-includes; the last matching line wins.


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith(("!", "^")):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def parse_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((negated, _glob_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


@cache
def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return parse_dockerignore((REPO / ".dockerignore").read_text())


@cache
def build_context() -> frozenset[str]:
    """Files `docker build .` would send, as paths relative to the repository root."""
    rules = dockerignore_rules()
    can_reinclude = any(negated for negated, _ in rules)
    sent: set[str] = set()
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        prefix = "" if rel_root == "." else f"{rel_root}/"
        if not can_reinclude:  # an ignored directory cannot hold a sent file: skip it
            dirs[:] = [d for d in dirs if not is_ignored(prefix + d, rules)]
        sent.update(prefix + f for f in files if not is_ignored(prefix + f, rules))
    return frozenset(sent)


@cache
def compose() -> dict[str, Any]:
    # safe_load resolves the `<<: *app` merge keys, as Compose does.
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def env_default(value: str) -> str:
    """The value Compose uses when the variable is unset: `${X:-default}` -> default."""
    match = re.fullmatch(r"\$\{\w+:?-(.*)\}", value)
    return match.group(1) if match else value


@cache
def nginx_conf() -> str:
    text = NGINX_CONF.read_text()
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def nginx_directive_args(block: str, name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^\s*{name}\s+([^;]*);", block)]


@cache
def k8s_files() -> dict[str, list[dict[str, Any]]]:
    result = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        result[path.name] = docs
    return result


def manifests() -> list[dict[str, Any]]:
    return [
        doc for name, docs in k8s_files().items() if name != "kustomization.yaml" for doc in docs
    ]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def all_containers() -> list[dict[str, Any]]:
    return [c for d in of_kind("Deployment").values() for c in pod_spec(d)["containers"]]


def container_ports(deployment: dict[str, Any]) -> dict[str, int]:
    """Container ports by name and by number (as str) -> number."""
    ports: dict[str, int] = {}
    for container in pod_spec(deployment)["containers"]:
        for port in container.get("ports", []):
            ports[str(port["containerPort"])] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def queues_of(argv: list[str]) -> set[str]:
    """The queues a `taskmanager worker` command line names (`--queues Q` / `-Q Q`)."""
    return {argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--queues", "-Q")}


@cache
def app_queues() -> tuple[frozenset[str], frozenset[str]]:
    """The broker's declared queues (delay and dead-letter queues aside), split as the
    processes split them: (general queues, webhook queues)."""
    from config.connections import Connections
    from config.settings import Settings
    from workers.broker import WEBHOOK_QUEUES, build_broker, general_queues

    settings = Settings(app_env="development", redis_prefix="tm:", jwt_secret="k" * 40)
    platform = build_broker(Connections(settings))
    try:
        declared = {
            q for q in platform.broker.get_declared_queues() if not q.endswith((".DQ", ".XQ"))
        }
        general = frozenset(general_queues(platform.broker))
        assert general | WEBHOOK_QUEUES == declared
        return general, frozenset(WEBHOOK_QUEUES)
    finally:
        platform.close()


def autoscaled() -> dict[str, str]:
    """Deployment name -> what scales it (HPA or KEDA ScaledObject)."""
    targets: dict[str, str] = {}
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for name, obj in of_kind(kind).items():
            ref = obj["spec"]["scaleTargetRef"]
            assert ref.get("kind", "Deployment") == "Deployment", name
            assert ref["name"] not in targets, f"{ref['name']} scaled by two autoscalers"
            targets[ref["name"]] = kind
    return targets


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_builds_in_stages_from_python_311_slim() -> None:
    args = {}
    for ins in dockerfile():
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args[name] = value
    bases = []
    for stage in stages():
        image = stage[0].args.split()[0]
        bases.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image))
    assert len(bases) >= 2, "expected a multi-stage build"
    assert set(bases) == {"python:3.11-slim"}
    copied_from = {strip_flags(i.args)[0].get("from") for i in final_stage() if i.keyword == "COPY"}
    stage_names = {s[0].args.split()[-1] for s in stages()[:-1]}
    assert copied_from & stage_names, "the final stage copies nothing from a build stage"


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    uid = dockerfile_user_uid()
    assert uid not in ("root", "0")
    # Kubernetes' runAsNonRoot can only verify a numeric UID.
    assert uid.isdigit(), f"USER {uid} is not numeric"


def test_dockerfile_healthcheck_probes_healthz_without_curl() -> None:
    checks = [ins.args for ins in final_stage() if ins.keyword == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK in the final stage"
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.+)", checks[-1], re.DOTALL)
    assert match, f"HEALTHCHECK {checks[-1]}"
    flags = {f.split("=")[0] for f in match.group(1).split()}
    probe = match.group(2)
    command = exec_form(probe) if probe.startswith("[") else shlex.split(probe)
    assert "/healthz" in probe
    assert command[0] == "python", "slim images have no curl/wget: probe with python"
    assert {"--interval", "--timeout"} <= flags


def test_dockerfile_exposes_the_web_port_and_defaults_to_web() -> None:
    exposed = {p for i in final_stage() if i.keyword == "EXPOSE" for p in i.args.split()}
    assert str(WEB_PORT) in exposed
    cmds = [exec_form(i.args) for i in final_stage() if i.keyword == "CMD"]
    assert cmds
    assert cmds[-1] == ["taskmanager", "web"]
    assert "taskmanager" in pyproject()["project"]["scripts"], "no `taskmanager` console script"


def test_dockerfile_entrypoint_is_an_installed_init() -> None:
    # PID 1 must forward SIGTERM (graceful shutdown) and reap the worker's child processes.
    entrypoints = [i.args for i in final_stage() if i.keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT: the app would run as PID 1 without an init"
    program = exec_form(entrypoints[-1])[0]  # exec form, or a shell would swallow signals
    installs = " ".join(i.args for i in final_stage() if i.keyword == "RUN")
    assert re.search(rf"apt-get install[^&]*\b{re.escape(program)}\b", installs), (
        f"ENTRYPOINT {program} is not installed in the final stage"
    )


def test_dockerfile_copies_existing_paths_only() -> None:
    sources = context_copies()
    assert sources
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_dockerfile_copies_every_package_and_the_project_metadata() -> None:
    copied = {s.rstrip("/") for s in context_copies()}
    assert {"pyproject.toml", pyproject()["project"]["readme"]} <= copied
    missing = [p for p in project_packages() if p not in copied]
    assert not missing, f"packages listed in pyproject.toml but not copied: {missing}"


def test_dockerfile_installs_the_project_with_pinned_dependencies() -> None:
    runs = [i.args for s in stages()[:-1] for i in s if i.keyword == "RUN"]
    assert any(re.search(r"pip install .*--no-cache-dir.* \.(\s|$)", r) for r in runs)
    unpinned = [d for d in pyproject()["project"]["dependencies"] if "==" not in d]
    assert not unpinned, f"unpinned dependencies: {unpinned}"


# --------------------------------------------------------------------------------------------
# .dockerignore and the build context


@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        ("**/__pycache__", "core/__pycache__/x.cpython-311.pyc", True),
        ("**/__pycache__", "__pycache__/x.pyc", True),
        ("**/*.py[cod]", "web/handlers/a.pyc", True),
        ("**/*.py[cod]", "web/handlers/a.py", False),
        ("*.egg-info", "taskmanager.egg-info/PKG-INFO", True),
        ("*.egg-info", "vendor/x.egg-info/PKG-INFO", False),  # anchored at the root
        ("tests", "tests/deploy/test_manifests.py", True),
        ("tests\n!tests/keep.py", "tests/keep.py", False),
        ("docker-compose*.yml", "docker-compose.override.yml", True),
        ("/.env", ".env", True),
        (".env.*", ".envrc", False),
    ],
)
def test_dockerignore_matcher_follows_docker_rules(patterns: str, path: str, ignored: bool) -> None:
    assert is_ignored(path, parse_dockerignore(patterns)) is ignored


def test_build_context_leaves_out_local_state() -> None:
    rules = dockerignore_rules()
    for path in (".venv/bin/python", ".git/HEAD", ".env", "core/__pycache__/a.pyc", "tests/x"):
        assert is_ignored(path, rules), f"{path} would be sent to the Docker daemon"
    sent = build_context()
    leaked = sorted(p for p in sent if p.split("/")[0] in {".venv", ".git", "tests"})
    assert not leaked, leaked[:10]
    assert "pyproject.toml" in sent
    for package in project_packages():
        assert f"{package}/__init__.py" in sent, f"{package} is missing from the build context"


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    sent = build_context()
    for source in context_copies():
        source = source.rstrip("/")
        assert not is_ignored(source, dockerignore_rules()), f"{source} is in .dockerignore"
        if (REPO / source).is_dir():
            assert any(p.startswith(f"{source}/") for p in sent), f"{source}/ sends no file"


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads((HERE / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    # The schema really constrains: a misspelt condition is rejected.
    broken = json.loads(json.dumps(compose()))
    broken["services"]["web1"]["depends_on"]["mongo"]["condition"] = "service_ready"
    assert not validator.is_valid(broken)


def test_compose_dependencies_exist_and_have_no_cycle() -> None:
    graph = {name: set(depends_on(svc)) for name, svc in services().items()}
    for name, deps in graph.items():
        assert deps <= graph.keys(), f"{name} depends on unknown {deps - graph.keys()}"
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {n for n, deps in graph.items() if n not in done and deps <= done}
        assert ready, f"dependency cycle among {sorted(graph.keys() - done)}"
        done |= ready


def test_healthy_conditions_wait_on_real_healthchecks() -> None:
    for name, svc in services().items():
        for dep, spec in depends_on(svc).items():
            if spec.get("condition") == "service_healthy":
                check = services()[dep].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
    for name in APP_SERVICES:
        assert {"mongo", "redis"} <= depends_on(services()[name]).keys(), name
    for name in WEB_SERVICES:
        assert depends_on(services()["nginx"])[name]["condition"] == "service_healthy"


def test_app_services_share_one_image_and_build() -> None:
    app = [services()[name] for name in APP_SERVICES]
    assert all("build" in s and "image" in s for s in app)
    assert len({json.dumps([s["build"], s["image"]], sort_keys=True) for s in app}) == 1
    build = app[0]["build"]
    context = REPO / (build if isinstance(build, str) else build.get("context", "."))
    assert context.resolve() == REPO
    dockerfile_name = (
        "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    )
    assert (context / dockerfile_name).is_file()


def test_app_services_get_the_production_environment() -> None:
    for name in APP_SERVICES:
        env = services()[name]["environment"]
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        missing = [key for key in REQUIRED_ENV if key not in env]
        assert not missing, f"{name} lacks {missing}"
        assert env["APP_ENV"] == "production"
        # production refuses a placeholder secret: compose must demand a real one.
        assert re.fullmatch(r"\$\{JWT_SECRET:\?.+\}", env["JWT_SECRET"]), env["JWT_SECRET"]
        # An empty string is a value the settings would have to validate; leave unset instead.
        empty = [k for k, v in env.items() if v == "" or (isinstance(v, str) and v.endswith(":-}"))]
        assert not empty, f"{name}: empty values for {empty}"


def test_app_urls_point_at_compose_services() -> None:
    env = services()["web1"]["environment"]
    for key in ("MONGODB_URL", "REDIS_URL", "BROKER_URL", "SMTP_URL"):
        host = urlsplit(env_default(env[key])).hostname
        assert host in services(), f"{key} points at {host!r}, not a compose service"
    mongo_url = urlsplit(env["MONGODB_URL"])
    assert parse_qs(mongo_url.query).get("replicaSet") == ["rs0"]


def test_app_commands_name_the_taskmanager_subcommands() -> None:
    for name in WEB_SERVICES:
        assert services()[name]["command"] == ["taskmanager", "web"]
    for name in WORKER_SERVICES:
        worker = services()[name]["command"]
        assert worker[:2] == ["taskmanager", "worker"]
        assert "--processes" in worker
        assert "--threads" in worker
    assert services()["scheduler"]["command"] == ["taskmanager", "scheduler"]
    assert services()["archiver"]["command"] == ["taskmanager", "archiver"]


def test_webhook_deliveries_run_in_their_own_worker_service() -> None:
    """A slow receiver must never hold the threads of the other actors: the general worker
    serves every queue but the webhook ones, worker-webhooks exactly those."""
    general, hooks = app_queues()
    assert queues_of(services()["worker"]["command"]) == general
    assert queues_of(services()["worker-webhooks"]["command"]) == hooks


def test_non_web_app_services_override_the_http_healthcheck() -> None:
    # The image's HEALTHCHECK polls :8000/healthz, which only `taskmanager web` serves.
    for name in (*WORKER_SERVICES, "scheduler", "archiver"):
        check = services()[name].get("healthcheck")
        assert check, f"{name} would inherit the image's HTTP healthcheck"
        assert check.get("disable") or "/healthz" not in json.dumps(check.get("test"))


def test_mongo_is_a_single_node_replica_set() -> None:
    mongo = services()["mongo"]
    command = mongo["command"]
    set_name = command[command.index("--replSet") + 1]
    assert "--bind_ip_all" in command
    url = urlsplit(services()["web1"]["environment"]["MONGODB_URL"])
    assert parse_qs(url.query)["replicaSet"] == [set_name]
    probe = " ".join(mongo["healthcheck"]["test"])
    assert "rs.initiate(" in probe
    assert f"_id: '{set_name}'" in probe
    assert f"host: '{url.hostname}:{url.port or 27017}'" in probe
    volumes = [v.split(":")[1] for v in mongo["volumes"]]
    assert "/data/db" in volumes


def test_redis_keeps_broker_messages() -> None:
    redis = services()["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert redis["image"].startswith("redis:7")


def test_nginx_service_fronts_the_web_replicas() -> None:
    nginx = services()["nginx"]
    assert nginx["image"].startswith("nginx:1.27")
    assert "8080:80" in nginx["ports"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in nginx["volumes"]}
    assert mounts.get("./deploy/nginx/nginx.conf") == "/etc/nginx/nginx.conf"
    assert (REPO / "deploy/nginx/nginx.conf").is_file()
    for name in WEB_SERVICES:
        assert "ports" not in services()[name], f"{name} should only be reached through nginx"


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_long_running_services_restart_with_a_valid_policy() -> None:
    # The schema types `restart` as a free string; Compose itself accepts only these.
    for name, svc in services().items():
        policy = svc.get("restart", "no")
        assert re.fullmatch(r"no|always|unless-stopped|on-failure(:\d+)?", policy), name
        assert policy in ("always", "unless-stopped"), f"{name} is not restarted after a crash"


def test_worker_gets_time_to_finish_messages() -> None:
    for name in WORKER_SERVICES:
        grace = services()[name]["stop_grace_period"]
        match = re.fullmatch(r"(\d+)([sm])", grace)
        assert match, grace
        seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 1)
        assert seconds >= 30, name


# --------------------------------------------------------------------------------------------
# deploy/nginx/nginx.conf


def test_nginx_conf_braces_balance() -> None:
    depth = 0
    for char in nginx_conf():
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0


def test_nginx_upstream_is_least_conn_over_both_web_services() -> None:
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", nginx_conf()))
    assert len(upstreams) == 1
    [(name, body)] = upstreams.items()
    assert re.search(r"(?m)^\s*least_conn\s*;", body), "upstream is not least_conn"
    servers = {args.split()[0] for args in nginx_directive_args(body, "server")}
    assert servers == {f"{s}:{WEB_PORT}" for s in WEB_SERVICES}
    assert nginx_directive_args(body, "keepalive"), "no keep-alive pool to the upstream"
    assert nginx_directive_args(nginx_conf(), "proxy_pass") == [f"http://{name}"]


def test_nginx_proxy_headers() -> None:
    conf = nginx_conf()
    headers = dict(args.split(None, 1) for args in nginx_directive_args(conf, "proxy_set_header"))
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Request-ID"] == "$req_id"
    assert headers["Host"] == "$host"
    # Upstream keep-alive works only with HTTP/1.1 and the Connection header cleared.
    assert headers["Connection"] == '""'
    assert nginx_directive_args(conf, "proxy_http_version") == ["1.1"]
    assert nginx_directive_args(conf, "client_max_body_size") == ["1m"]


def test_nginx_keeps_the_clients_request_id() -> None:
    match = re.search(r"map\s+\$http_x_request_id\s+\$req_id\s*\{([^}]*)\}", nginx_conf())
    assert match, "no map from $http_x_request_id to $req_id"
    entries = dict(line.split() for line in match.group(1).strip().rstrip(";").split(";"))
    assert entries == {"default": "$http_x_request_id", '""': "$request_id"}


def test_nginx_health_location_serves_the_compose_healthcheck() -> None:
    locations = re.findall(r"location\s+=\s+(\S+)\s*\{", nginx_conf())
    probe = " ".join(services()["nginx"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1(/\S*)", probe)
    assert path
    assert path.group(1) in locations


# --------------------------------------------------------------------------------------------
# deploy/k8s


def test_k8s_manifests_have_identity_and_no_namespace() -> None:
    docs = manifests()
    assert len(docs) >= 10
    seen = set()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        name = doc.get("metadata", {}).get("name")
        assert name, f"{doc['kind']} without metadata.name"
        assert "namespace" not in doc["metadata"], f"{doc['kind']}/{name} pins a namespace"
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']}/{name}"
        seen.add((doc["kind"], name))


def test_kustomization_lists_every_manifest_except_the_secret_example() -> None:
    [kustomization] = k8s_files()["kustomization.yaml"]
    resources = kustomization["resources"]
    expected = set(k8s_files()) - {"kustomization.yaml", "secret.example.yaml"}
    assert set(resources) == expected
    image_names = {i["name"] for i in kustomization["images"]}
    app_images = {c["image"].split(":")[0] for c in all_containers()}
    assert app_images <= image_names


def test_deployments_select_their_own_pods() -> None:
    deployments = of_kind("Deployment")
    assert {
        "taskmanager-web",
        "taskmanager-worker",
        "taskmanager-worker-webhooks",
        "taskmanager-scheduler",
        "taskmanager-archiver",
    } <= deployments.keys()
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels), name
        others = [o for o, d in deployments.items() if o != name]
        for other in others:
            other_labels = deployments[other]["spec"]["template"]["metadata"]["labels"]
            assert not selects(selector, other_labels), f"{name} also selects {other}'s pods"


def test_deployments_run_one_image_as_the_dockerfile_user() -> None:
    assert len({c["image"] for c in all_containers()}) == 1
    uid = int(dockerfile_user_uid())
    for name, dep in of_kind("Deployment").items():
        pod_security = pod_spec(dep).get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, name
        assert pod_security.get("runAsUser") == uid, name
        for container in pod_spec(dep)["containers"]:
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, name


def test_deployments_run_the_right_subcommand() -> None:
    def command(name: str) -> list[str]:
        [container] = pod_spec(of_kind("Deployment")[name])["containers"]
        return container.get("command", []) + container.get("args", [])

    # One process per pod (its CPU limit is under a core; the HPA scales pods).
    assert command("taskmanager-web") == ["taskmanager", "web", "--processes", "1"]
    assert command("taskmanager-worker")[:2] == ["taskmanager", "worker"]
    assert command("taskmanager-worker-webhooks")[:2] == ["taskmanager", "worker"]
    assert command("taskmanager-scheduler") == ["taskmanager", "scheduler"]
    assert command("taskmanager-archiver") == ["taskmanager", "archiver"]
    # Webhook deliveries have their own pods; the general workers serve every other queue.
    general, hooks = app_queues()
    assert queues_of(command("taskmanager-worker")) == general
    assert queues_of(command("taskmanager-worker-webhooks")) == hooks


def test_k8s_references_resolve() -> None:
    config_maps, secrets = of_kind("ConfigMap"), of_kind("Secret")
    claims = of_kind("PersistentVolumeClaim")
    for name, dep in of_kind("Deployment").items():
        spec = pod_spec(dep)
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name} mounts unknown volume {mount['name']}"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name


def test_config_and_secret_provide_the_environment() -> None:
    [config] = of_kind("ConfigMap").values()
    [secret] = of_kind("Secret").values()
    config_keys = set(config["data"])
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert not config_keys & secret_keys, f"set twice: {config_keys & secret_keys}"
    missing = set(REQUIRED_ENV) - config_keys - secret_keys
    assert not missing, f"not provided to the pods: {sorted(missing)}"
    assert config["data"]["APP_ENV"] == "production"
    assert {"JWT_SECRET", "MONGODB_URL", "REDIS_URL"} <= secret_keys
    assert all(isinstance(v, str) for v in config["data"].values()), "ConfigMap values are strings"
    mongo = urlsplit(secret["stringData"]["MONGODB_URL"])
    assert "replicaSet" in parse_qs(mongo.query), "transactions need a replica set"


def test_services_target_container_ports() -> None:
    deployments = of_kind("Deployment")
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        backends = [
            d
            for d in deployments.values()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert backends, f"Service {name} selects no Deployment's pods"
        for port in service["spec"]["ports"]:
            target = str(port.get("targetPort", port["port"]))
            for backend in backends:
                assert target in container_ports(backend), f"{name}: no container port {target}"


def test_web_probes_point_at_healthz_and_readyz() -> None:
    web = of_kind("Deployment")["taskmanager-web"]
    [container] = pod_spec(web)["containers"]
    ports = container_ports(web)
    assert ports["http"] == WEB_PORT
    probes = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert str(get["port"]) in ports, probe


def test_web_rolls_out_without_losing_capacity() -> None:
    web = of_kind("Deployment")["taskmanager-web"]
    strategy = web["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    [container] = pod_spec(web)["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    [pdb] = of_kind("PodDisruptionBudget").values()
    assert selects(
        pdb["spec"]["selector"]["matchLabels"], web["spec"]["template"]["metadata"]["labels"]
    )


def test_autoscalers_target_deployments_that_leave_replicas_to_them() -> None:
    targets = autoscaled()
    assert targets == {
        "taskmanager-web": "HorizontalPodAutoscaler",
        "taskmanager-worker": "ScaledObject",
        "taskmanager-worker-webhooks": "ScaledObject",
    }
    deployments = of_kind("Deployment")
    for name in targets:
        # A fixed replicas field would be reapplied on every `kubectl apply`.
        assert "replicas" not in deployments[name]["spec"], name


def test_web_hpa_scales_on_cpu() -> None:
    [hpa] = of_kind("HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"


def test_worker_keda_scales_on_the_dramatiq_queues() -> None:
    """Each worker Deployment is scaled on the queues it serves: one trigger per queue its
    --queues names (a trigger on a queue nobody sends to would never scale anything, and one
    on another pool's queue would scale the wrong pods)."""
    deployments = of_kind("Deployment")
    scaled_objects = of_kind("ScaledObject")
    assert len(scaled_objects) == 2
    served: set[str] = set()
    for name, scaled in scaled_objects.items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        [container] = pod_spec(target)["containers"]
        queues = queues_of(container.get("command", []) + container.get("args", []))
        redis = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
        assert {t["listName"] for t in redis} == {WORKER_QUEUE_KEY.format(q) for q in queues}, name
        assert len(redis) == len(queues), name
        assert all(int(t["listLength"]) > 0 for t in redis)
        assert scaled["spec"]["minReplicaCount"] >= 1
        assert not served & queues, f"{name}: a queue served by two Deployments"
        served |= queues
    general, hooks = app_queues()
    assert served == general | hooks


def test_worker_and_scheduler_settings() -> None:
    deployments = of_kind("Deployment")
    worker_grace = pod_spec(deployments["taskmanager-worker"])["terminationGracePeriodSeconds"]
    web_grace = pod_spec(deployments["taskmanager-web"]).get("terminationGracePeriodSeconds", 30)
    assert worker_grace >= 60
    assert worker_grace > web_grace
    assert deployments["taskmanager-scheduler"]["spec"]["replicas"] == 2
    # One archiver (the lock would make more idle); never two at once during a rollout.
    archiver = deployments["taskmanager-archiver"]["spec"]
    assert archiver["replicas"] == 1
    assert archiver["strategy"]["type"] == "Recreate"


def test_ingress_routes_to_the_web_service() -> None:
    services_ = of_kind("Service")
    [ingress] = of_kind("Ingress").values()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] in services_
            ports = services_[backend["name"]]["spec"]["ports"]
            port = backend["port"]
            assert any(
                p.get("name") == port.get("name") or p["port"] == port.get("number") for p in ports
            )


# --------------------------------------------------------------------------------------------
# deploy/grafana


def test_dashboard_panels_all_query_prometheus() -> None:
    dash = dashboard()
    assert dash["title"]
    assert dash["uid"]
    variables = {v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"}
    panels = dash["panels"]
    assert panels
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            expr = target.get("expr", "").strip()
            assert expr, f"panel {panel['title']!r} has an empty query"
            assert expr.count("(") == expr.count(")"), expr
            assert expr.count("{") == expr.count("}"), expr
        uid = panel["datasource"]["uid"]
        assert uid.startswith("${") and uid[2:-1] in variables, panel["title"]


def test_dashboard_uses_the_apps_metric_names() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"([a-z_:][a-z0-9_:]*)\s*[{\[]", e)}
    assert used == KNOWN_METRICS, f"unknown: {used - KNOWN_METRICS}, unused: {KNOWN_METRICS - used}"
    p95 = [e for e in exprs if "histogram_quantile(0.95" in e]
    assert p95 and all(re.search(r"by \(le\b", e) for e in p95), "p95 must aggregate by le"
    assert any('result="hit"' in e and "/" in e for e in exprs), "no cache hit-rate query"


def test_dashboard_has_the_operators_panels() -> None:
    """Throughput, failures, oldest age, dead letters, workers and web p95 each have a panel."""
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard()["panels"]}
    wanted = {
        "throughput": "rate(taskmanager_worker_messages_processed_total",
        "failures": "rate(taskmanager_worker_messages_failed_total",
        "oldest age": "taskmanager_queue_oldest_age_seconds",
        "dead letters": 'taskmanager_queue_messages{state="dead"}',
        "workers": "taskmanager_worker_processes",
        "web p95": "histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds",
    }
    for what, needle in wanted.items():
        assert any(needle in e for e in exprs.values()), f"no {what} panel ({needle})"


# --------------------------------------------------------------------------------------------
# deploy/prometheus


def exported_metric_names() -> set[str]:
    """Sample names the processes export: the web registry's and the worker families."""
    from prometheus_client import REGISTRY, CollectorRegistry

    import web.app  # noqa: F401 (declares the web, cache, relay and queue metrics)
    from workers.metrics import Families

    registry = CollectorRegistry()
    Families.make(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for reg in (REGISTRY, registry):
        for family in reg.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    # Yielded only by the replica holding the queue-exporter lease, with a fresh reading.
    names |= {
        "taskmanager_queue_messages",
        "taskmanager_queue_oldest_age_seconds",
        "taskmanager_queue_latency_objective_seconds",
    }
    return names | archiver_metric_names()


def archiver_metric_names() -> set[str]:
    """Sample names ``taskmanager archiver`` exports (read from a leading archiver's registry,
    checked against the documented list)."""
    from types import SimpleNamespace

    from core import archive_metrics

    leading = SimpleNamespace(
        lock=SimpleNamespace(leads=True),
        covered_until=0.0,
        segments_written=0,
        gaps=0,
        last_gap=0.0,
    )
    registry = archive_metrics.registry_for(leading)  # type: ignore[arg-type]
    # The replication failures have samples only once a copy to a remote target failed in
    # the process (one per target; an earlier test of the session may have made some).
    replication = "taskmanager_backup_replication_failures"
    families = list(registry.collect())
    names = {s.name for family in families if family.name != replication for s in family.samples}
    assert names == set(archive_metrics.NAMES)
    assert [f.type for f in families if f.name == replication] == ["counter"]
    return names | {replication + "_total"}


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def test_alert_rules_cover_the_objectives_and_name_real_metrics() -> None:
    rules = alert_rules()
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert {
        "TaskmanagerQueueAgeOverObjective",
        "TaskmanagerDeadLettersGrowing",
        "TaskmanagerNoLiveWorkers",
        "TaskmanagerWorkerErrorRate",
        "TaskmanagerApiErrorRate",
        "TaskmanagerApiLatencyP95",
    } <= alerts.keys()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0m")), name
    # The objectives are the setting's, exported beside the ages: each queue has its own.
    from config.settings import DEFAULT_LATENCY_OBJECTIVES, parse_latency_objectives

    general, webhooks = app_queues()
    objectives = parse_latency_objectives(DEFAULT_LATENCY_OBJECTIVES)
    assert set(objectives) == general | webhooks, "every queue needs a latency objective"
    assert (
        "taskmanager_queue_latency_objective_seconds"
        in alerts["TaskmanagerQueueAgeOverObjective"]["expr"]
    )
    exported = exported_metric_names()
    panels = [{"expr": t["expr"]} for p in dashboard()["panels"] for t in p["targets"]]
    for rule in [*rules, *panels]:
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), expr
        used = set(re.findall(r"\b(taskmanager_[a-z0-9_]+|http_[a-z0-9_]+)\b", expr))
        assert used <= exported, f"not exported: {used - exported}"


def test_alert_rules_pass_promtool() -> None:
    """Syntax (check rules) and behaviour (the unit tests in alerts.test.yaml)."""
    for args in (["check", "rules", ALERTS.name], ["test", "rules", ALERT_TESTS.name]):
        done = subprocess.run(
            ["promtool", *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_worker_pods_are_scraped_on_the_worker_metrics_port() -> None:
    from config.settings import Settings

    port = Settings.model_fields["worker_metrics_port"].default
    for name in ("taskmanager-worker", "taskmanager-worker-webhooks"):
        deployment = of_kind("Deployment")[name]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(port), name
        assert annotations["prometheus.io/path"] == "/metrics", name
        assert container_ports(deployment)["metrics"] == port, name


def test_archiver_pod_is_scraped_and_shares_the_backups_volume() -> None:
    from config.settings import Settings

    port = Settings.model_fields["archiver_metrics_port"].default
    archiver = of_kind("Deployment")["taskmanager-archiver"]
    annotations = archiver["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert container_ports(archiver)["metrics"] == port
    volumes = {v["name"]: v for v in pod_spec(archiver)["volumes"]}
    claim = volumes["backups"]["persistentVolumeClaim"]["claimName"]
    worker = of_kind("Deployment")["taskmanager-worker"]
    worker_volumes = {v["name"]: v for v in pod_spec(worker)["volumes"]}
    assert worker_volumes["backups"]["persistentVolumeClaim"]["claimName"] == claim
