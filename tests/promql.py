"""The metric names a PromQL expression selects, read with a real PromQL parser rather than a pattern, so a
label, a function or a Grafana variable is never taken for a metric."""

from __future__ import annotations

import promql_parser

# What Grafana puts in place of its variables before Prometheus sees a query; any valid value parses.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def metric_names(expr: str) -> list[str | None]:
    """Every metric an expression selects, in order; None for a selector that names none (``{__name__=~}``).
    ValueError when the expression is not PromQL."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: list[str | None] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names
