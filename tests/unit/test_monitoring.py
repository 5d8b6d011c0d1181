"""deploy/monitoring/: the alert rules are a valid Prometheus rule file, the Grafana dashboard is
well formed, and every metric an alert or a panel reads is one the code emits.

The emitted names are read from source, never listed by hand: every Ray metric constructor
(``ray.util.metrics`` / ``ray.serve.metrics`` Counter, Gauge, Histogram, and the node agent's
``ray._private.metrics_agent.Gauge``) in platform/bloomray and in the installed ``ray``
package, and vLLM's ``self._counter_cls(name="vllm:...")`` style metrics in the installed
``vllm`` package (what Ray Serve LLM's ``RayPrometheusStatLogger`` re-creates as Ray metrics,
``:`` replaced by ``_``). Ray's Prometheus endpoint names them the way Ray exports them:
``ray_`` prefix, counters with ``_total``, histograms as ``_bucket``/``_sum``/``_count``.
Ray core metrics recorded in C++ (``ray_tasks``, ``ray_resources``, ...) are not in that set;
none is used here, so no hand-written list is needed.

``promtool check rules`` also runs where ``promtool`` is on PATH (Debian's ``prometheus``
package); the schema check below runs everywhere.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "bloomray-alerts.yaml"
DASHBOARD = MONITORING / "grafana-bloomray.json"
BLOOMRAY = ROOT / "platform" / "bloomray"

# ----------------------------------------------------------------- what the code emits

_RAY_METRIC_MODULES = {"ray.util.metrics", "ray.serve.metrics", "ray._private.metrics_agent"}
_KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
# vLLM's PrometheusStatLogger (and its spec-decode / KV-connector / perf parts) build metrics
# through these class attributes; the Ray subclasses swap in ray.util.metrics wrappers.
_VLLM_FACTORIES = {"_counter_cls": "counter", "_gauge_cls": "gauge", "_histogram_cls": "histogram"}
_PLACEHOLDER = "[A-Za-z0-9]+"  # what an f-string field in a metric name may expand to (one word)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _name_pattern(call: ast.Call) -> str | None:
    """The metric name argument as a regex (f-string fields become a wildcard), or None."""
    arg = next((k.value for k in call.keywords if k.arg == "name"), call.args[0] if call.args else None)
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return re.escape(arg.value)
    if isinstance(arg, ast.JoinedStr):
        if not (isinstance(arg.values[0], ast.Constant) and arg.values[0].value):
            return None  # f"{prefix}_..." (Ray Data's, Ray LLM's): no fixed name to check against
        return "".join(
            re.escape(v.value) if isinstance(v, ast.Constant) else _PLACEHOLDER for v in arg.values
        )
    return None  # a name held in a variable: not resolvable from source


def ray_metric_calls(tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(kind, name regex) of every Ray metric constructed in a module, imports resolved."""
    modules: dict[str, str] = {}  # local name -> ray metrics module
    classes: dict[str, str] = {}  # local name -> kind
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                local = a.asname or a.name
                if f"{node.module}.{a.name}" in _RAY_METRIC_MODULES:
                    modules[local] = f"{node.module}.{a.name}"
                elif node.module in _RAY_METRIC_MODULES and a.name in _KINDS:
                    classes[local] = _KINDS[a.name]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in _RAY_METRIC_MODULES:
                    modules[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, kind = node.func, None
        if isinstance(func, ast.Name) and func.id in classes:
            kind = classes[func.id]
        elif isinstance(func, ast.Attribute) and func.attr in _KINDS:
            owner = _dotted(func.value)
            if owner in modules or owner in _RAY_METRIC_MODULES:
                kind = _KINDS[func.attr]
        if kind and (pattern := _name_pattern(node)):
            yield kind, pattern


def vllm_metric_calls(tree: ast.AST) -> Iterator[tuple[str, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            kind = _VLLM_FACTORIES.get(node.func.attr)
            pattern = _name_pattern(node) if kind else None
            if kind and pattern and pattern.startswith("vllm:"):
                # RayPrometheusMetric._get_sanitized_opentelemetry_name: [^a-zA-Z0-9_] -> _
                yield kind, pattern.replace(":", "_")


def series(kind: str, pattern: str) -> list[str]:
    """The series names Ray's endpoint serves for one metric (``ray_`` namespace)."""
    base = "ray_" + pattern
    if kind == "counter":
        return [base + "_total"] + ([base] if base.endswith("_total") else [])
    if kind == "histogram":
        return [base + s for s in ("_bucket", "_sum", "_count")]
    return [base]


def _sources(package: Path, must_contain: tuple[str, ...]) -> Iterator[ast.AST]:
    for path in sorted(package.rglob("*.py")):
        if "tests" in path.relative_to(package).parts or path.name.startswith("test_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(s in text for s in must_contain):
            try:
                yield ast.parse(text)
            except SyntaxError:
                continue


def _installed(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    assert spec and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


class Emitted:
    """Exact series names plus the patterns of f-string-named metrics."""

    def __init__(self, patterns: dict[str, set[str]]) -> None:
        self.by_source = patterns
        self._regex = [re.compile(p) for ps in patterns.values() for p in ps]

    def __contains__(self, name: str) -> bool:
        return any(r.fullmatch(name) for r in self._regex)


@cache
def emitted() -> Emitted:
    found: dict[str, set[str]] = {"bloomray": set(), "ray": set(), "vllm": set()}
    ray_markers = ("Counter(", "Gauge(", "Histogram(")
    for tree in _sources(BLOOMRAY, ray_markers):
        found["bloomray"] |= {s for k, p in ray_metric_calls(tree) for s in series(k, p)}
    for tree in _sources(_installed("ray"), ray_markers):
        found["ray"] |= {s for k, p in ray_metric_calls(tree) for s in series(k, p)}
    for tree in _sources(_installed("vllm"), tuple(f + "(" for f in _VLLM_FACTORIES)):
        found["vllm"] |= {s for k, p in vllm_metric_calls(tree) for s in series(k, p)}
    return Emitted(found)


# ----------------------------------------------------------------- PromQL metric names

_FUNCTIONS = set(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg
    delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase
    info irate label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time
    min_over_time minute month pi predict_linear present_over_time quantile_over_time rad rate resets
    round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year start end""".split()
)
_AGGREGATIONS = set(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()
)
_KEYWORDS = set(
    "by without on ignoring group_left group_right offset bool and or unless atan2 inf nan".split()
)
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_TOKEN = re.compile(r"(?P<num>\d[\w.]*)|(?<![$\w])(?P<ident>[A-Za-z_:][\w:]*)")


def _bare(expr: str) -> str:
    """``expr`` without strings, comments, label matchers, ranges and grouping label lists."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"#[^\n]*", "", text)
    text = re.sub(r"\{[^{}]*\}", "{}", text)
    text = re.sub(r"\[[^\[\]]*\]", "[]", text)
    return _GROUPING.sub(r"\1", text)


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, unknown function names) in a PromQL expression."""
    text = _bare(expr)
    metrics, unknown = set(), set()
    for m in _TOKEN.finditer(text):
        word = m.group("ident")
        if not word or word in _KEYWORDS:
            continue
        called = text[m.end() :].lstrip().startswith("(")
        if word in _AGGREGATIONS or (called and word in _FUNCTIONS):
            continue
        (unknown if called else metrics).add(word)
    return metrics, unknown


def label_names(expr: str) -> set[str]:
    """Labels an expression names (grouping lists and matchers): what its alerts may template."""
    text = _STRINGS.sub('""', expr)
    names = {n.strip() for _, lst in _GROUPING.findall(text) for n in lst.split(",") if n.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", text):
        names |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return names


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in _STRINGS.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def unknown_metrics(expr: str, known: Emitted) -> list[str]:
    """What an expression gets wrong: metrics the code does not emit, functions PromQL lacks."""
    metrics, functions = metric_names(expr)
    problems = [f"unknown function {f}()" for f in sorted(functions)]
    problems += [f"{m} is not emitted" for m in sorted(metrics) if m not in known]
    if not balanced(expr):
        problems.append("unbalanced brackets")
    return problems


# ----------------------------------------------------------------- the rule file's schema


class _StrictLoader(yaml.SafeLoader):
    """Rejects duplicate keys, as Prometheus' strict YAML decoding does."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dup)}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

_DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
_GROUP_KEYS = {"name", "interval", "query_offset", "limit", "rules", "labels"}
SEVERITIES = {"critical", "warning", "info"}


def _duration_ok(value: object) -> bool:
    return isinstance(value, str) and value != "" and bool(_DURATION.match(value))


def rule_file_problems(doc: object) -> list[str]:
    """Prometheus' rule file schema (rulefmt) plus bloomray's conventions for alerts."""
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        return ["the file must be a mapping with exactly one key, groups (a list)"]
    problems, group_names = [], set()
    for gi, group in enumerate(doc["groups"]):
        where = f"groups[{gi}]"
        if not isinstance(group, dict):
            problems.append(f"{where} is not a mapping")
            continue
        problems += [f"{where}: unknown key {k!r}" for k in sorted(set(group) - _GROUP_KEYS)]
        name = group.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: name missing")
        elif name in group_names:
            problems.append(f"{where}: duplicate group name {name!r}")
        group_names.add(name)
        if "interval" in group and not _duration_ok(group["interval"]):
            problems.append(f"{where}: bad interval {group['interval']!r}")
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            problems.append(f"{where}: rules must be a non-empty list")
            continue
        for ri, rule in enumerate(rules):
            problems += [f"{where}.rules[{ri}]: {p}" for p in _rule_problems(rule)]
    return problems


def _rule_problems(rule: object) -> list[str]:
    if not isinstance(rule, dict):
        return ["not a mapping"]
    problems = [f"unknown key {k!r}" for k in sorted(set(rule) - _RULE_KEYS)]
    if ("alert" in rule) == ("record" in rule):
        return problems + ["needs exactly one of alert / record"]
    expr = rule.get("expr")
    if not isinstance(expr, str) or not expr.strip():
        problems.append("expr missing")
        expr = ""
    if "record" in rule:
        if not isinstance(rule["record"], str) or not _METRIC_NAME.match(rule["record"]):
            problems.append(f"bad record name {rule['record']!r}")
        return problems + [
            f"{k} is only for alerts" for k in ("for", "keep_firing_for", "annotations") if k in rule
        ]
    name = rule["alert"]
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        problems.append(f"bad alert name {name!r}")
    for key in ("for", "keep_firing_for"):
        if key in rule and not _duration_ok(rule[key]):
            problems.append(f"{key}: bad duration {rule[key]!r}")
    if "for" not in rule:
        problems.append("for missing")
    for key in ("labels", "annotations"):
        value = rule.get(key)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and _LABEL_NAME.match(k) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(f"{key} must map label names to strings")
    labels, annotations = rule.get("labels") or {}, rule.get("annotations") or {}
    if isinstance(labels, dict) and labels.get("severity") not in SEVERITIES:
        problems.append(f"labels.severity must be one of {sorted(SEVERITIES)}")
    if isinstance(annotations, dict):
        problems += [f"annotations.{k} missing" for k in ("summary", "description") if not annotations.get(k)]
        known_labels = label_names(expr)
        for key, text in annotations.items():
            if isinstance(text, str):
                if text.count("{{") != text.count("}}"):
                    problems.append(f"annotations.{key}: unbalanced {{{{ }}}}")
                for label in re.findall(r"\$labels\.(\w+)", text):
                    if label not in known_labels:
                        problems.append(f"annotations.{key} uses $labels.{label}, which expr does not keep")
    return problems


def load_rules(path: Path = RULES) -> dict:
    return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def alert_rules() -> list[dict]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every templating query's selector."""
    found = []
    panels = list(dash.get("panels", []))
    while panels:
        p = panels.pop(0)
        panels += p.get("panels", [])  # rows may nest panels
        for t in p.get("targets", []):
            found.append((f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\s*\)\s*", query)
        assert m, f"variable {var['name']}: use label_values(<metric or selector>, <label>), got {query!r}"
        found.append((f"variable {var['name']!r}", m.group(1)))
    return found


# ----------------------------------------------------------------- tests


def test_rule_file_matches_the_prometheus_schema():
    doc = load_rules()
    assert rule_file_problems(doc) == []
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt install prometheus)"
)
def test_promtool_accepts_the_rule_file():
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alerts_cover_what_the_issue_asks_for():
    exprs = " ".join(r["expr"] for r in alert_rules())
    for name in (
        "ray_serve_num_http_requests_total",  # error rate
        "ray_bloomray_request_latency_ms_bucket",  # p99 latency
        "ray_bloomray_queue_depth",  # queue depth
        "ray_serve_deployment_replica_starts_total",  # replica restarts
        "ray_bloomray_train_last_step_timestamp_seconds",  # training stalled
        "ray_bloomray_train_loss_nonfinite",  # loss NaN
    ):
        assert name in exprs


def test_every_alert_expression_reads_emitted_metrics():
    known = emitted()
    problems = {r["alert"]: unknown_metrics(r["expr"], known) for r in alert_rules()}
    assert {k: v for k, v in problems.items() if v} == {}


def test_every_dashboard_expression_reads_emitted_metrics():
    dash = json.loads(DASHBOARD.read_text())
    known = emitted()
    exprs = dashboard_exprs(dash)
    assert exprs
    problems = {where: unknown_metrics(expr, known) for where, expr in exprs}
    assert {k: v for k, v in problems.items() if v} == {}


def test_every_bloomray_metric_is_on_the_dashboard():
    """A metric added to bloomray without a panel fails here (histograms: any one series)."""
    text = DASHBOARD.read_text()
    bases = {re.sub(r"_(bucket|sum|count|total)$", "", s) for s in emitted().by_source["bloomray"]}
    assert bases, "no ray.util.metrics constructor found under platform/bloomray"
    assert sorted(b for b in bases if b.replace("\\", "") not in text) == []


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids, defined = [], {v["name"] for v in dash["templating"]["list"]}
    for p in dash["panels"]:
        ids.append(p["id"])
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= defined, f"{p['title']}: undefined variables {used - defined}"
    assert len(ids) == len(set(ids)), "panel ids must be unique"


# --- the checks themselves catch what they are for


def test_a_made_up_metric_is_reported():
    known = emitted()
    expr = 'sum by (application) (rate(ray_bloomray_made_up_total{code="503"}[5m])) > 0'
    assert unknown_metrics(expr, known) == ["ray_bloomray_made_up_total is not emitted"]
    # a real counter without the _total Ray's exporter adds is not what the endpoint serves
    assert unknown_metrics("rate(ray_bloomray_errors[5m])", known) == ["ray_bloomray_errors is not emitted"]
    assert (
        unknown_metrics("histogram_quantle(0.99, x_bucket)", known)[0]
        == "unknown function histogram_quantle()"
    )


def test_the_tokenizer_skips_labels_functions_and_durations():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(ray_a_bucket{route!~".*:stream", b="x{y}"}[5m])))'
        " > on (run) group_left max without (c) (ray_b offset 30m) or vector(0) * 1e3 unless ray_c"
    )
    assert metric_names(expr) == ({"ray_a_bucket", "ray_b", "ray_c"}, set())


def test_source_scan_reads_f_string_names_and_imports(tmp_path: Path):
    code = (
        "from ray.util import metrics as m\nfrom ray.serve.metrics import Histogram\n"
        "m.Counter(f'serve_num_{p}_requests')\nHistogram(name='lat_ms', boundaries=[1])\n"
        "m.Gauge(some_variable)\nOther.Gauge('not_ray')\n"
    )
    found = Emitted({"t": {s for k, p in ray_metric_calls(ast.parse(code)) for s in series(k, p)}})
    assert "ray_serve_num_http_requests_total" in found and "ray_lat_ms_bucket" in found
    assert "ray_not_ray" not in found and "ray_serve_num_http_requests" not in found


def test_the_schema_check_reports_broken_rules():
    rule = {"alert": "X", "expr": "up", "for": "5 minutes", "labels": {}, "annotations": {"summary": "s"}}
    problems = rule_file_problems(
        {"groups": [{"name": "g", "rules": [rule, {"record": "a b", "expr": "up"}]}]}
    )
    assert "groups[0].rules[0]: for: bad duration '5 minutes'" in problems
    assert any("severity" in p for p in problems)
    assert "groups[0].rules[0]: annotations.description missing" in problems
    assert "groups[0].rules[1]: bad record name 'a b'" in problems
    bad_label = {**rule, "for": "5m", "annotations": {"summary": "{{ $labels.job }}", "description": "d"}}
    assert rule_file_problems({"groups": [{"name": "g", "rules": [bad_label]}]}) == [
        "groups[0].rules[0]: labels.severity must be one of ['critical', 'info', 'warning']",
        "groups[0].rules[0]: annotations.summary uses $labels.job, which expr does not keep",
    ]
    with pytest.raises(yaml.YAMLError, match="duplicate"):
        yaml.load("groups: []\ngroups: []\n", Loader=_StrictLoader)  # noqa: S506
