"""docker-compose.yml and the Dockerfile, read rather than run: every project command they start exists.

Each ``python -m worker`` / ``python -m producer`` command of a service, healthcheck or the image's CMD is
parsed with the project's own argument parser, so a renamed subcommand or a dropped flag fails here instead of
in a crash-looping container. The rest checks what scaling, persistence and monitoring depend on: the
monitoring profile's Prometheus scrapes every metrics port the commands open, and Grafana reads the
provisioning files and the Prometheus of this file.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import producer.cli
import producer.mock_upstream
import worker.cli
from streamfold.settings import Settings, read_upstreams

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PROJECT = {name: service for name, service in SERVICES.items() if "build" in service}


def argv(command: str | list[str]) -> list[str]:
    """A compose command or healthcheck test as the argument vector it runs."""
    if isinstance(command, str):
        return shlex.split(command)
    if command[:1] == ["CMD"]:
        return list(command[1:])
    if command[:1] == ["CMD-SHELL"]:
        return shlex.split(command[1])
    return list(command)


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command the project image runs: services, healthchecks, the Dockerfile CMD."""
    found = []
    for name, service in PROJECT.items():
        if "command" in service:
            found.append((f"{name} command", argv(service["command"])))
        if "healthcheck" in service:
            found.append((f"{name} healthcheck", argv(service["healthcheck"]["test"])))
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert cmd is not None, "the Dockerfile has no exec-form CMD"
    found.append(("Dockerfile CMD", yaml.safe_load(cmd[1])))
    return found


def parser_for(args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The project's parser for a ``python -m ...`` command, and the arguments it is given."""
    if args[:3] == ["python", "-m", "worker"]:
        return worker.cli.build_parser(), args[3:]
    if args[:4] == ["python", "-m", "producer", "mock-upstream"]:
        # producer/cli.py hands mock-upstream's arguments to the mock's own parser, untouched.
        parser = argparse.ArgumentParser(prog="python -m producer mock-upstream")
        producer.mock_upstream.add_arguments(parser)
        return parser, args[4:]
    if args[:3] == ["python", "-m", "producer"]:
        return producer.cli.build_parser(), args[3:]
    raise AssertionError(f"not a project command: {shlex.join(args)}")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(name): str(value) for name, value in env.items()}


def seconds(duration: str) -> float:
    """A compose duration (``45s``, ``2m``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.mark.parametrize(("where", "args"), commands(), ids=[where for where, _ in commands()])
def test_every_project_command_parses_with_the_projects_own_parser(
        where: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser, rest = parser_for(args)
    try:
        parser.parse_args(rest)
        refused = False
    except SystemExit:  # argparse's way of refusing an unknown subcommand or flag
        refused = True
    if refused:
        pytest.fail(f"{where}: `{shlex.join(args)}` is refused: {capsys.readouterr().err.strip()}", pytrace=False)


def test_the_stream_worker_job_runner_and_mock_upstream_all_run_from_the_project_image() -> None:
    roles = {name: " ".join(argv(service["command"])[:4]) for name, service in PROJECT.items()}
    assert sorted(roles.values()) == ["python -m producer mock-upstream", "python -m producer serve",
                                      "python -m producer work", "python -m worker run"]
    assert all("healthcheck" in SERVICES[name] for name in ("worker", "jobs", "gateway"))


def test_every_redis_url_points_at_the_compose_redis_service() -> None:
    for name, service in SERVICES.items():
        urls = {var: url for var, url in environment(service).items() if var.endswith("REDIS_URL")}
        if name in PROJECT:
            assert "STREAMFOLD_REDIS_URL" in urls, f"{name} sets no STREAMFOLD_REDIS_URL"
        for var, url in urls.items():
            parts = urlsplit(url)
            assert (parts.scheme, parts.hostname) == ("redis", "redis"), f"{name}: {var}={url}"
    assert "redis" in SERVICES


@pytest.mark.parametrize("name", ["worker", "jobs"])
def test_workers_and_call_runners_can_be_scaled_no_container_name_no_fixed_host_port(name: str) -> None:
    service = SERVICES[name]
    assert "container_name" not in service
    for port in service.get("ports", []):
        published = port.get("published") if isinstance(port, dict) else (str(port).count(":") > 0)
        assert not published, f"{name} publishes a fixed host port ({port}): a second replica could not start"


@pytest.mark.parametrize("name", ["worker", "jobs"])
def test_workers_and_call_runners_get_their_shutdown_grace_before_docker_kills_them(name: str) -> None:
    service = SERVICES[name]
    default = Settings.model_fields["shutdown_grace"].default
    grace = float(environment(service).get("STREAMFOLD_SHUTDOWN_GRACE", default))
    # Docker's default is 10 s: a drain cut short hands nothing back, and peers wait out the claim timeout
    # (or, for runners, the lease) before they take over.
    assert seconds(service.get("stop_grace_period", "10s")) > grace


def test_redis_persists_with_an_append_only_file_on_a_volume() -> None:
    redis = SERVICES["redis"]
    args = argv(redis["command"])
    options = dict(zip(args[1::2], args[2::2])) if args[0] == "redis-server" else {}
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") == "everysec"
    assert any(str(volume).endswith(":/data") for volume in redis.get("volumes", []))


def test_the_upstream_table_names_the_mock_upstream_where_it_listens_and_the_runner_has_its_key() -> None:
    mock_args = parser_for(argv(SERVICES["mock-upstream"]["command"]))
    mock = mock_args[0].parse_args(mock_args[1])
    jobs_env = environment(SERVICES["jobs"])
    upstream = read_upstreams(jobs_env["STREAMFOLD_UPSTREAMS"])["default"]
    assert (urlsplit(upstream.base_url).hostname, urlsplit(upstream.base_url).port) == ("mock-upstream", mock.port)
    assert mock.host == "0.0.0.0"  # reachable from the other containers
    assert upstream.api_key_env in jobs_env


def test_the_dockerfile_copies_the_packages_and_the_fixtures_the_mock_upstream_serves() -> None:
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE, re.MULTILINE)
    assert workdir is not None
    copied: dict[str, str] = {}  # path in the image -> path in the repository
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.MULTILINE):
        *sources, target = line.split()
        into = posixpath.normpath(posixpath.join(workdir[1], target))
        for source in sources:
            # A directory's contents land in the target; files land in it by name unless one names the file.
            whole = (ROOT / source).is_dir() or (len(sources) == 1 and not target.endswith("/"))
            copied[into if whole else f"{into}/{Path(source).name}"] = source
    for package in ("streamfold", "worker", "producer"):
        assert copied.get(f"{workdir[1]}/{package}") == package, f"the Dockerfile does not COPY {package}"
    assert {"pyproject.toml", "README.md"} <= set(copied.values())  # pip install . reads both

    mock = parser_for(argv(SERVICES["mock-upstream"]["command"]))
    for directory in mock[0].parse_args(mock[1]).fixtures:
        image_path = str(directory)
        source = next((repo + image_path[len(path):] for path, repo in copied.items()
                       if image_path == path or image_path.startswith(path + "/")), None)
        assert source is not None, f"{image_path} is not copied into the image"
        assert list((ROOT / source).glob("*.jsonl")), f"{source} holds no fixtures"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(pattern.strip("/*") == "fixtures" for pattern in ignored)


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of each file or folder of the repository a service mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("./"):
            found[target] = ROOT / source
    return found


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_the_monitoring_services_run_pinned_images_in_the_monitoring_profile_only(name: str) -> None:
    service = SERVICES[name]
    assert service["profiles"] == ["monitoring"]
    assert re.fullmatch(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+", service["image"]), f"{name}: pin a release"
    assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))


def test_prometheus_scrapes_every_metrics_port_of_the_stack_and_every_replica_of_a_scaled_service() -> None:
    prometheus = SERVICES["prometheus"]
    config = yaml.safe_load(mounts(prometheus)["/etc/prometheus/prometheus.yml"].read_text())  # the image's path
    discovered, static = set(), set()
    for job in config["scrape_configs"]:
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            discovered |= {(name, dns["port"]) for name in dns["names"]}
        for targets in job.get("static_configs", []):
            static |= {(host, int(port)) for host, port in (target.split(":") for target in targets["targets"])}
    served = set()
    for name, service in PROJECT.items():
        parser, rest = parser_for(argv(service["command"]))
        port = getattr(parser.parse_args(rest), "metrics_port", None)
        if port is not None:
            served.add((name, port))
            assert str(port) in [str(exposed) for exposed in service.get("expose", [])], f"{name} exposes no {port}"
    assert served == discovered | static, "every metrics port scraped, and nothing else"
    # A static target is one address: a scaled service's replicas are found by its name in Docker's DNS.
    scaled = {(name, port) for name, port in served if name in ("worker", "jobs")}
    assert len(scaled) == 2 and scaled <= discovered


def test_grafana_is_provisioned_from_the_repository_with_the_compose_prometheus() -> None:
    grafana = mounts(SERVICES["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(source["url"])
    container_ports = {int(str(port).rsplit(":", 1)[1]) for port in SERVICES["prometheus"]["ports"]}
    assert url.hostname == "prometheus" and url.port in container_ports
    assert "prometheus" in SERVICES["grafana"]["depends_on"]
    for provider in yaml.safe_load((provisioning / "dashboards" / "streamfold.yml").read_text())["providers"]:
        dashboards = grafana[provider["options"]["path"]]
        assert list(dashboards.glob("*.json")), f"{dashboards} holds no dashboard"
    home = environment(SERVICES["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, file = home.rpartition("/")
    assert (grafana[folder] / file).is_file()


def test_each_service_gets_only_the_settings_it_uses_so_a_bad_upstream_table_cannot_stop_the_workers() -> None:
    holders = {name for name, service in SERVICES.items() if "STREAMFOLD_UPSTREAMS" in environment(service)}
    assert holders == {"jobs", "gateway"}  # the call runners and the gateway; never the stream workers
    assert {name for name, service in SERVICES.items()
            if "STREAMFOLD_GATEWAY_KEYS" in environment(service)} == {"gateway"}


def test_no_service_takes_a_host_port_a_local_redis_already_holds() -> None:
    host_ports = {str(port).rsplit(":", 1)[0] for service in SERVICES.values() for port in service.get("ports", [])}
    redis_port = next(str(p) for p in SERVICES["redis"]["ports"])
    assert re.fullmatch(r"127\.0\.0\.1:\$\{STREAMFOLD_REDIS_HOST_PORT:-(\d+)\}:6379", redis_port)
    assert not any(port.endswith(":6379") for port in host_ports)
    assert re.search(r"STREAMFOLD_REDIS_HOST_PORT:-(\d+)", redis_port).group(1) != "6379"  # type: ignore[union-attr]


def test_every_image_from_outside_the_project_is_a_pinned_release_and_so_is_what_it_installs() -> None:
    for name, service in SERVICES.items():
        if name in PROJECT:
            continue
        assert re.fullmatch(r"[a-z0-9./-]+:v?\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", service["image"]), f"{name}: pin a release"
        for requirement in re.findall(r"pip install [^&]*", " ".join(argv(service.get("command", [])))):
            packages = [word for word in requirement.split()[2:] if not word.startswith("-")]
            assert packages and all(re.fullmatch(r"[a-z0-9_.-]+==[\d.]+", package) for package in packages), name
