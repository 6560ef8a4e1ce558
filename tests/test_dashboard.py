"""The monitoring stack and the code cannot drift apart.

The Grafana dashboard is valid provisioning whose every query parses as PromQL and selects only metrics that a
running stream worker, call runner and gateway expose - scraped over HTTP after calls went through them, so
that labelled series exist too. Every metric they expose follows Prometheus's naming conventions and has its
row, with its type and labels, in the README's table.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.producer.runner.rig import MESSAGES, SHORT, Rig, rig, wait_until
from tests.promql import metric_names

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
(DATASOURCE,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
    "datasources"]
COMPONENTS = ("worker", "runner", "gateway")
# The model the fixture's chunks name, priced in the worker's settings so that its cost is counted.
MODEL = "gpt-4o-2024-08-06"
PRICES = {MODEL: {"input_mtok": 2.5, "output_mtok": 10, "currency": "USD"}}

# Prometheus's naming conventions: base units only, a unit suffix where there is a unit.
NOT_BASE_UNITS = {"ms", "milliseconds", "us", "microseconds", "ns", "nanoseconds", "minutes", "hours", "days",
                  "kb", "kib", "kilobytes", "mb", "mib", "megabytes", "gb", "gib", "gigabytes", "percent"}
TIME_WORDS = {"seconds", "latency", "duration", "time", "age", "wait"}
SIZE_WORDS = {"bytes", "memory", "size"}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries() -> list[tuple[str, str]]:
    """(dashboard: panel, expression) of every query of every dashboard."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            found += [(f"{path.name}: {panel['title']}", target["expr"]) for target in panel.get("targets", [])]
    return found


def test_the_dashboards_are_grafana_provisioning_on_the_provisioned_datasource() -> None:
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "streamfold.yml").read_text())[
        "providers"]
    assert (provider["type"], DATASOURCE["type"]) == ("file", "prometheus")
    assert DASHBOARDS
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids and dashboard["title"]
        uids.add(dashboard["uid"])
        assert isinstance(dashboard["schemaVersion"], int) and dashboard.get("id") is None
        ids, cells = set(), set()
        for panel in panels(dashboard):
            assert panel["id"] not in ids, f"{path.name}: panel id {panel['id']} twice"
            ids.add(panel["id"])
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
            covered = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
            assert not covered & cells, f"{path.name}: {panel['title']} overlaps another panel"
            cells |= covered
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE["uid"]}, panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(set(refs)) == len(refs), panel["title"]
            assert all(target["datasource"] == panel["datasource"] for target in panel["targets"])


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[f"{where} {n}" for n, (where, _) in enumerate(queries())])
def test_every_query_is_promql_that_names_its_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names and None not in names, f"{where}: select metrics by name: {expr}"


# --- a running stack -----------------------------------------------------------------------------------

_SCRAPED: dict[str, list[Metric]] = {}


@pytest.fixture
def exposition(real_redis_url: str, namespace: str) -> dict[str, list[Metric]]:
    """The metric families a real worker, call runner and gateway serve on /metrics, per component, after
    calls went through them. Started once for the tests that read it: three processes are slow to start."""
    if not _SCRAPED:
        with rig(real_redis_url, namespace) as pipeline:
            _SCRAPED.update(_scrape_after_traffic(pipeline))
    return _SCRAPED


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape_after_traffic(pipeline: Rig) -> dict[str, list[Metric]]:
    ports = {component: _free_port() for component in (*COMPONENTS, "http")}
    env = {**pipeline.env, "STREAMFOLD_PRICES": json.dumps(PRICES)}
    pipeline.runner("--metrics-port", str(ports["runner"]), "--name", f"{pipeline.settings.namespace}-runner")
    for command in (["worker", "run", "--metrics-port", str(ports["worker"])],
                    ["producer", "serve", "--port", str(ports["http"]), "--metrics-port", str(ports["gateway"])]):
        # In the rig's list, so that it is killed whatever happens.
        pipeline.processes.append(subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=ROOT,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    gateway = f"http://127.0.0.1:{ports['http']}"
    wait_until(lambda: _answers(f"{gateway}/healthz"), what="the gateway")
    with httpx.Client(base_url=gateway, timeout=60) as client:
        # A call answered whole, one streamed (time to first chunk), and one whose upstream answers 429
        # three times before it serves (upstream errors by status).
        for model, stream in ((f"default/{SHORT}", False), (f"default/{SHORT}", True),
                              (f"rate_limited/{SHORT}", False)):
            with client.stream("POST", "/v1/chat/completions",
                               json={"model": model, "messages": MESSAGES, "stream": stream}) as answer:
                assert answer.status_code == 200, answer.read()
                answer.read()
    # Each call's result is published before the gateway answers; the worker counts it right after.
    wait_until(lambda: _count(_families(ports["worker"]), "streamfold_worker_requests_finished_total") == 3,
               what="the worker to count three results")
    scraped = {component: _families(ports[component]) for component in COMPONENTS}
    for process in pipeline.processes:
        process.send_signal(signal.SIGTERM)
    for process in pipeline.processes:
        process.communicate(timeout=60)
    return scraped


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _families(port: int) -> list[Metric]:
    return list(text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text))


def _count(families: list[Metric], sample_name: str) -> float:
    return sum(sample.value for family in families for sample in family.samples if sample.name == sample_name)


def named(families: list[Metric]) -> list[Metric]:
    """The families a component names itself: without the ``*_created`` timestamps the client library adds
    beside each counter and histogram, whose names follow OpenMetrics, not this project."""
    return [family for family in families if not family.name.endswith("_created")]


# --- what the stack exposes ------------------------------------------------------------------------------

@pytest.mark.redis
@pytest.mark.timeout(180)
def test_every_metric_the_dashboards_query_is_exposed_by_a_running_worker_runner_or_gateway(
        exposition: dict[str, list[Metric]]) -> None:
    exposed = {sample.name for families in exposition.values() for family in families for sample in family.samples}
    missing = {(where, name) for where, expr in queries() for name in metric_names(expr) if name not in exposed}
    assert not missing, f"queried but not exposed: {sorted(missing)}"
    # The series only traffic makes: tokens and cost per model, upstream errors by status, gateway routes.
    for name, labels in (("streamfold_worker_tokens_total", {"model": MODEL, "type": "output"}),
                         ("streamfold_worker_cost_total", {"model": MODEL, "currency": "USD"}),
                         ("streamfold_runner_upstream_errors_total", {"status": "429"})):
        assert any(sample.name == name and sample.labels == labels and sample.value > 0
                   for families in exposition.values() for family in families for sample in family.samples), name


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_every_exposed_metric_follows_the_prometheus_naming_conventions(
        exposition: dict[str, list[Metric]]) -> None:
    for component, families in exposition.items():
        for family in named(families):
            name, words = family.name, family.name.split("_")
            assert re.fullmatch(rf"(streamfold_{component}|process)_[a-z0-9_]+", name), name
            assert not NOT_BASE_UNITS & set(words), f"{name}: use base units (seconds, bytes)"
            for sample in family.samples:
                assert sample.name.endswith("_total") == (family.type == "counter"), sample.name
            if TIME_WORDS & set(words) or family.type == "histogram":
                assert name.endswith("_seconds"), f"{name}: a time is in seconds, and says so"
            if SIZE_WORDS & set(words):
                assert name.endswith("_bytes"), f"{name}: a size is in bytes, and says so"


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_the_readme_table_gives_every_exposed_metric_its_type_and_labels(
        exposition: dict[str, list[Metric]]) -> None:
    exposed = {}
    for families in exposition.values():
        for family in named(families):
            if family.name.startswith("process_"):
                continue  # one row for the process collector's standard series
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = {label for sample in family.samples for label in sample.labels if label != "le"}
            exposed[name] = (family.type, labels)
    assert _readme_table() == {**exposed, "process_*": ("", set())}


def _readme_table() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) of each row of the README's table of metrics."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n### Metrics\n"):].split("\n#", 2)[1]
    rows = re.findall(r"^\| `([a-z_*]+)` \|\s*([a-z]*)\s*\|([^|]*)\|", section, re.MULTILINE)
    return {name: (kind, set(re.findall(r"`([a-z_]+)`", labels))) for name, kind, labels in rows}


def test_the_readme_tells_where_the_dashboard_and_the_manifests_are() -> None:
    text = (ROOT / "README.md").read_text()
    for path in ("deploy/grafana", "deploy/prometheus/prometheus.yml", "deploy/kubernetes"):
        assert path in text and (ROOT / path).exists(), path
    assert "--profile monitoring" in text
