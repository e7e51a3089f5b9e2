#!/usr/bin/env python3
"""Deploy checks for mongo-watcher, all offline (no Docker, cluster, AWS account or network).

- Dockerfile: hadolint, checkov, and what the image must keep (distroless, non-root, 8080,
  HEALTHCHECK by the `healthcheck` subcommand).
- charts/mongo-watcher: strict lint; renders with default, all-toggles-on and leases values, with
  assertions on replicas and strategy (Recreate, 1 replica without leases; RollingUpdate, 2
  replicas and a PodDisruptionBudget with them), probes, ports, security context, the ConfigMap
  (with `leases` from values.leases), values.schema.json refusing bad values, the PrometheusRule (every
  alert of files/alerts.yaml, the oplog headroom threshold from values) and the Grafana
  dashboard ConfigMap; `promtool check rules` and `promtool test rules` (tests/deploy/
  alerts*_test.yaml) on the rendered rules; the dashboard's JSON (unique panel ids, every
  panel's PromQL parsed by promtool); checkov on the rendered manifests.
- terraform/: python-hcl2 assertions (checkpoint and lease tables = migrations/*.json, ALB
  health check /healthz, container healthCheck = the `healthcheck` subcommand, stopTimeout >= 30,
  desired_count validated, rolling deployment with leases, lease IAM), the example
  terraform/examples/replicas (leases, 2 tasks), checkov on both, `terraform fmt -check`, and
  the variable validations evaluated by terraform itself (a plan of variables.tf alone).
- the docker context (.dockerignore) holds the workspace and every file the sources embed
  (migrations/*.json for `migrate`).

Run it through tests/deploy/run, which installs the pinned tools (requirements-deploy.txt);
CHECKOV and HADOLINT name the binaries. Prints one line per check and closes with
`deploy checks: N passed, M failed`; exits 1 when any check failed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import hcl2
import helm_python as helm
import yaml
from hcl2.utils import SerializationOptions

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "charts" / "mongo-watcher"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "dashboards" / "mongo-watcher.json"
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yaml"
THRESHOLD_ALERT_TESTS = Path(__file__).resolve().parent / "alerts_threshold_test.yaml"
HEADROOM_ALERT = "MongoWatcherOplogHeadroomLow"
TERRAFORM = ROOT / "terraform"
CHECKPOINTS_TABLE = ROOT / "migrations" / "checkpoints.json"
LEASES_TABLE = ROOT / "migrations" / "leases.json"
VALUES_SCHEMA = CHART / "values.schema.json"
EXAMPLE_REPLICAS = TERRAFORM / "examples" / "replicas"

VENV_BIN = Path(sys.executable).parent
CHECKOV = os.environ.get("CHECKOV") or str(VENV_BIN / "checkov")
HADOLINT = os.environ.get("HADOLINT") or str(VENV_BIN / "hadolint")

RELEASE = "mw"
NAMESPACE = "streams"
CONFIG_PATH = "/etc/mongo-watcher/config.yaml"

# Every checkov skip, with the place that justifies it. A new skip must be added here too.
EXPECTED_SKIPS = {
    "dockerfile": set(),
    "kubernetes": {"CKV_K8S_35", "CKV_K8S_43"},  # env from Secret; tag instead of digest
    "terraform": set(),
}

# Values with every toggle on.
ALL_ON_VALUES: dict[str, Any] = {
    "image": {"repository": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mongo-watcher", "tag": "1.2.3"},
    "serviceAccount": {
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mongo-watcher"}
    },
    "awsRegion": "eu-west-1",
    "secrets": {"apiToken": "test-token", "mongoPassword": "test-password"},
    "env": {"LOG_LEVEL": "debug"},
    "networkPolicy": {
        "enabled": True,
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
    "metrics": {
        "podAnnotations": True,
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "grafana": {
        "dashboard": {
            "enabled": True,
            "labels": {"team": "streams"},
            "annotations": {"grafana_folder": "MongoDB"},
        }
    },
    "config": {
        "mongodb": {
            "uri": "mongodb://db-1:27017,db-2:27017/?replicaSet=rs0",
            "username": "app",
            "password": "${MONGO_PASSWORD}",
        },
        "checkpoints": {"table": "mongo-watcher-checkpoints"},
        "defaults": {"checkpoint_interval": "1s"},
        "watchers": [
            {"name": "orders", "database": "shop", "collection": "orders", "stream": "orders-events"},
            {
                "name": "users",
                "database": "shop",
                "collection": "users",
                "stream": "users-events",
                "partition_key": "fullDocument.email",
            },
        ],
    },
}


# All toggles on, and leases: 2 replicas sharing the watchers.
LEASES_VALUES: dict[str, Any] = {
    **json.loads(json.dumps(ALL_ON_VALUES)),
    "leases": {"enabled": True, "table": "mongo-watcher-leases", "ttl": "10s"},
}


class CheckFailed(Exception):
    pass


def require(condition: Any, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, fn: Callable[[], str | None]) -> None:
        start = time.monotonic()
        try:
            note = fn()
        except CheckFailed as e:
            self.failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            return
        except Exception:  # a bug or a tool crash: show it all
            self.failed += 1
            print(f"FAIL {name}: unexpected error\n{traceback.format_exc()}", flush=True)
            return
        self.passed += 1
        took = time.monotonic() - start
        print(f"ok   {name}" + (f" ({note})" if note else "") + (f" [{took:.1f}s]" if took >= 1 else ""), flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kwargs)


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- checkov -------------------------------------------------------------------------------------

def checkov(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs checkov offline (no Prisma Cloud look-ups) with JSON output."""
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE")
    return run(
        [CHECKOV, *args, "--output", "json", "--skip-download"],
        env=env,
        timeout=300,
    )


def checkov_verdict(framework: str, proc: subprocess.CompletedProcess[str]) -> str:
    require(proc.stdout.strip(), f"checkov printed nothing (exit {proc.returncode}):\n{tail(proc.stderr)}")
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CheckFailed(f"checkov output is not JSON (exit {proc.returncode}):\n{tail(proc.stdout)}\n{tail(proc.stderr)}")
    reports = report if isinstance(report, list) else [report]
    report = next((r for r in reports if r.get("check_type") == framework), None)
    require(report, f"checkov ran no {framework} checks: {[r.get('check_type') for r in reports]}")
    summary = report["summary"]
    failed = report["results"]["failed_checks"]
    skipped = report["results"]["skipped_checks"]
    require(summary["parsing_errors"] == 0, f"checkov could not parse: {report['results'].get('parsing_errors')}")
    require(summary["passed"] > 0, "checkov passed no check: nothing was scanned")
    require(
        not failed,
        "\n  ".join(
            ["checkov findings:"]
            + [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in failed]
        ),
    )
    skipped_ids = {c["check_id"] for c in skipped}
    unexpected = skipped_ids - EXPECTED_SKIPS[framework]
    require(not unexpected, f"skips not listed in EXPECTED_SKIPS: {sorted(unexpected)}")
    missing = EXPECTED_SKIPS[framework] - skipped_ids
    require(not missing, f"expected skips no longer used (remove them from EXPECTED_SKIPS): {sorted(missing)}")
    require(proc.returncode == 0, f"checkov exited {proc.returncode}:\n{tail(proc.stderr)}")
    return f"{summary['passed']} passed, skipped {', '.join(sorted(skipped_ids)) or 'none'}"


# --- Dockerfile ----------------------------------------------------------------------------------

def check_hadolint() -> str:
    proc = run([HADOLINT, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])
    require(proc.returncode == 0, f"hadolint exit {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return run([HADOLINT, "--version"]).stdout.strip()


def check_dockerfile_shape() -> None:
    lines = [l.strip() for l in DOCKERFILE.read_text().splitlines()]
    instructions = [l for l in lines if l and not l.startswith("#")]
    froms = [l for l in instructions if l.upper().startswith("FROM ")]
    require(len(froms) >= 2, f"expected a multi-stage build, found {froms}")
    require(
        froms[0].split()[1].startswith("rust:"),
        f"builder stage should be a rust image: {froms[0]}",
    )
    final = froms[-1].split()[1]
    require(final.startswith("gcr.io/distroless/cc-debian12:nonroot"), f"final stage should be distroless cc nonroot: {final}")
    final_stage = instructions[instructions.index(froms[-1]):]
    users = [l.split()[1] for l in final_stage if l.upper().startswith("USER ")]
    require(users, "final stage sets no USER")
    uid = users[-1].split(":")[0]
    require(uid.isdigit() and int(uid) != 0, f"final USER should be a numeric non-root uid: {users[-1]}")
    require("EXPOSE 8080" in final_stage, "final stage should EXPOSE 8080")
    require('ENTRYPOINT ["/usr/local/bin/mongo-watcher"]' in final_stage, "ENTRYPOINT should be the binary")
    require('CMD ["run"]' in final_stage, 'CMD should be ["run"]')
    require(
        any("cargo build --release --locked -p mongo-watcher" in l for l in lines),
        "the builder should run cargo build --release --locked -p mongo-watcher",
    )
    # Instructions with their continuation lines joined.
    logical = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text().split(froms[-1], 1)[1]).splitlines()
    healthchecks = [l.strip() for l in logical if l.strip().upper().startswith("HEALTHCHECK ")]
    require(len(healthchecks) == 1, f"final stage should have one HEALTHCHECK: {healthchecks}")
    require(
        healthchecks[0].endswith('CMD ["/usr/local/bin/mongo-watcher", "healthcheck"]'),
        f"HEALTHCHECK should run the binary's healthcheck subcommand (exec form): {healthchecks[0]}",
    )
    require(not any(l.upper().startswith("ENV MONGO_WATCHER_CONFIG") for l in instructions),
            "the image must not set MONGO_WATCHER_CONFIG (drop-in mode needs it unset)")
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    require("*" in ignore and "!src/" in ignore, ".dockerignore should allow-list the sources")


def dockerignore_rules() -> list[tuple[bool, str, re.Pattern[str]]]:
    """.dockerignore as (include, pattern, regex) rules, last match wins (Docker's semantics)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        # A pattern also matches everything under a matching directory.
        rules.append((include, pattern, re.compile(f"{regex}(?:/.*)?")))
    return rules


def docker_context_files() -> list[Path]:
    rules = dockerignore_rules()
    # Walk only what an allow rule names (never target/ or the venvs).
    tops = {pattern.split("/")[0] for include, pattern, _ in rules if include}
    files = []
    for top in sorted(t for t in tops if t and not any(c in t for c in "*?[")):
        base = ROOT / top
        candidates = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        for path in candidates:
            rel = path.relative_to(ROOT).as_posix()
            included = True
            for include, _, regex in rules:
                if regex.fullmatch(rel):
                    included = include
            if included:
                files.append(path)
    return files


def check_docker_context(cargo: str, tmp: Path) -> str:
    """The build context (.dockerignore) holds everything cargo needs to load the workspace."""
    ctx = tmp / "docker-context"
    files = docker_context_files()
    for path in files:
        dest = ctx / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    require((ctx / "Cargo.lock").is_file() and (ctx / "src" / "main.rs").is_file(), "context lacks Cargo.lock or src/main.rs")
    proc = run([cargo, "metadata", "--format-version", "1", "--no-deps", "--offline", "--locked",
                "--manifest-path", str(ctx / "Cargo.toml")], timeout=120)
    require(proc.returncode == 0, f"cargo cannot load the workspace from the docker context:\n{tail(proc.stderr)}")
    packages = {p["name"] for p in json.loads(proc.stdout)["packages"]}
    require("mongo-watcher" in packages, f"packages in the context: {sorted(packages)}")
    # Files the sources embed (include_str!/include_bytes!, relative to the including file).
    embedded = set()
    for source in [f for f in files if f.suffix == ".rs"]:
        for rel in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)', source.read_text()):
            embedded.add((source.parent / rel).resolve().relative_to(ROOT))
    missing = sorted(str(e) for e in embedded if not (ctx / e).is_file())
    require(not missing, f"files embedded by the sources are not in the docker context (.dockerignore): {missing}")
    return f"{len(files)} files ({len(embedded)} embedded), packages {', '.join(sorted(packages))}"


# --- Helm ----------------------------------------------------------------------------------------

def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for name, text in rendered.items():
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    require(len(found) == 1, f"expected one {kind}, rendered {len(found)}")
    return found[0]


def config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap holding the config file (not the Grafana dashboard's)."""
    found = [d for d in docs if d.get("kind") == "ConfigMap" and "config.yaml" in d.get("data", {})]
    require(len(found) == 1, f"expected one ConfigMap with config.yaml, rendered {len(found)}")
    return found[0]


def dashboard_config_maps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d for d in docs
        if d.get("kind") == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") is not None
    ]


def render(values: dict[str, Any] | None) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def check_lint() -> str:
    report = helm.lint(str(CHART), strict=True)
    require(report["total_charts_linted"] == 1, f"linted {report['total_charts_linted']} charts")
    require(not report["errors"], f"lint errors: {report['errors']}")
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    require(not bad, f"lint warnings/errors (strict): {bad}")
    for label, values in (("all toggles on", ALL_ON_VALUES), ("leases", LEASES_VALUES)):
        report_all = helm.lint(str(CHART), values, strict=True)
        require(not report_all["errors"], f"lint errors with {label}: {report_all['errors']}")
        bad = [m for m in report_all["messages"] if m["severity"] >= 2]
        require(not bad, f"lint warnings/errors with {label} (strict): {bad}")
    info = [m["error"] for m in report["messages"]]
    return f"helm {helm.helm_sdk_version()}" + (f"; info: {'; '.join(info)}" if info else "")


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    require(len(containers) == 1, f"expected one container, got {len(containers)}")
    return containers[0]


def assert_workload(docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    deployment = only(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    leases = (values.get("leases") or {}).get("enabled") is True
    replicas = values.get("replicaCount")
    if replicas is None:
        replicas = 2 if leases else 1
    require(spec["replicas"] == replicas, f"replicas should be {replicas}, got {spec['replicas']}")
    if leases:
        want = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        require(spec["strategy"] == want, f"with leases the strategy should be {want}, got {spec['strategy']}")
    else:
        require(spec["strategy"] == {"type": "Recreate"}, f"strategy should be Recreate, got {spec['strategy']}")
    budgets = [d for d in docs if d.get("kind") == "PodDisruptionBudget"]
    if leases and replicas >= 2:
        require(len(budgets) == 1, f"with leases and {replicas} replicas: one PodDisruptionBudget, rendered {len(budgets)}")
        pdb = budgets[0]["spec"]
        require(pdb.get("minAvailable") == 1 and "maxUnavailable" not in pdb, f"PodDisruptionBudget minAvailable 1: {pdb}")
        require(pdb["selector"] == spec["selector"], f"PodDisruptionBudget selects the pods: {pdb['selector']} != {spec['selector']}")
    else:
        require(not budgets, f"no PodDisruptionBudget without leases or with one replica, rendered {len(budgets)}")
    require(pod["terminationGracePeriodSeconds"] >= 30, "terminationGracePeriodSeconds < 30")
    require(pod.get("automountServiceAccountToken") is False, "automountServiceAccountToken should be false")
    c = container_of(deployment)
    ports = {p["name"]: p for p in c["ports"]}
    require("http" in ports and ports["http"]["containerPort"] == 8080, f"container port http:8080 missing: {c['ports']}")
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    require(live["path"] == "/healthz" and live["port"] in ("http", 8080), f"liveness probe: {live}")
    require(ready["path"] == "/readyz" and ready["port"] in ("http", 8080), f"readiness probe: {ready}")
    require(c["args"] == ["run", "--config", CONFIG_PATH], f"args: {c['args']}")
    env = {e["name"]: e for e in c["env"]}
    require(env["MONGO_WATCHER_CONFIG"]["value"] == CONFIG_PATH, "MONGO_WATCHER_CONFIG")
    for name in ("MONGO_WATCHER_API_TOKEN", "MONGO_PASSWORD"):
        ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
        require(ref, f"{name} should come from a Secret")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    require(mounts.get("/etc/mongo-watcher", {}).get("readOnly") is True, "config mount at /etc/mongo-watcher (read-only)")

    psc, sc = pod["securityContext"], c["securityContext"]
    require(psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is True, "runAsNonRoot")
    require(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    require(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation should be false")
    require(sc.get("capabilities", {}).get("drop") == ["ALL"], f"capabilities.drop should be [ALL]: {sc.get('capabilities')}")
    require(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile RuntimeDefault")
    require(int(str(sc.get("runAsUser", 0))) >= 10000, "runAsUser should be a high uid (65532)")
    res = c["resources"]
    require(res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), f"resources: {res}")
    require(res.get("requests", {}).get("cpu") and res.get("limits", {}).get("cpu"), f"resources: {res}")

    annotations = spec["template"]["metadata"].get("annotations", {})
    require(annotations.get("prometheus.io/scrape") == "true", "prometheus.io/scrape annotation")
    require(annotations.get("prometheus.io/port") == "8080", "prometheus.io/port annotation")
    require(annotations.get("prometheus.io/path") == "/metrics", "prometheus.io/path annotation")
    require("checksum/config" in annotations, "checksum/config annotation (restart on config change)")

    service = only(docs, "Service")
    sports = service["spec"]["ports"]
    require(
        any(p["name"] == "http" and p["port"] == 8080 and p["targetPort"] in ("http", 8080) for p in sports),
        f"Service port http 8080: {sports}",
    )
    sa = only(docs, "ServiceAccount")
    require(pod["serviceAccountName"] == sa["metadata"]["name"], "pod uses the chart's ServiceAccount")

    cm = config_map(docs)
    config = yaml.safe_load(cm["data"]["config.yaml"])
    expected = json.loads(json.dumps(values["config"]))
    expected.setdefault("http", {}).setdefault("listen", "0.0.0.0:8080")
    if leases:
        expected["leases"] = {"table": values["leases"]["table"], "ttl": values["leases"]["ttl"]}
    require(config == expected, f"ConfigMap config.yaml differs from .Values.config:\n{config}\n!=\n{expected}")
    require(config["watchers"], "config has no watchers")
    volumes = {v["name"]: v for v in pod["volumes"]}
    require(volumes["config"]["configMap"]["name"] == cm["metadata"]["name"], "config volume is the ConfigMap")
    for doc in docs:
        require(doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} has no namespace")


def check_render_default() -> str:
    rendered = render(None)
    docs = documents(rendered)
    with helm.Chart.load(str(CHART)) as chart:
        values = chart.values
    assert_workload(docs, values)
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("ServiceMonitor", "PrometheusRule", "Secret"):
        require(kind not in kinds, f"{kind} should be off by default")
    require(not dashboard_config_maps(docs), "the Grafana dashboard ConfigMap should be off by default")
    notes = next((t for n, t in rendered.items() if n.endswith("NOTES.txt")), "")
    require("curl" in notes and "/healthz" in notes and "Authorization: Bearer" in notes, "NOTES.txt curl examples")
    return ", ".join(kinds)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def check_render_all_on() -> str:
    rendered = render(ALL_ON_VALUES)
    docs = documents(rendered)
    assert_workload(docs, ALL_ON_VALUES)
    deployment = only(docs, "Deployment")
    c = container_of(deployment)
    require(c["image"] == "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mongo-watcher:1.2.3", f"image: {c['image']}")
    env = {e["name"]: e for e in c["env"]}
    require(env.get("AWS_REGION", {}).get("value") == "eu-west-1", "AWS_REGION from awsRegion")
    require(env.get("LOG_LEVEL", {}).get("value") == "debug", "extra env")

    secret = only(docs, "Secret")
    for var, key in (("MONGO_WATCHER_API_TOKEN", "api-token"), ("MONGO_PASSWORD", "mongo-password")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        require(ref["name"] == secret["metadata"]["name"] and ref["key"] == key, f"{var} -> {ref}")
        require(key in secret["data"], f"Secret lacks {key}")

    sa = only(docs, "ServiceAccount")
    require(
        sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "").startswith("arn:aws:iam::"),
        "ServiceAccount IRSA annotation",
    )
    monitor = only(docs, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    require(endpoint["port"] == "http" and endpoint["path"] == "/metrics", f"ServiceMonitor endpoint: {endpoint}")
    require(monitor["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor extra labels")
    policy = only(docs, "NetworkPolicy")
    require(policy["spec"]["ingress"][0]["from"], "NetworkPolicy from peers")

    rule = only(docs, "PrometheusRule")
    rendered_rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    wanted = alert_rules()
    names = [r["alert"] for r in wanted]
    require(names, "files/alerts.yaml has no alerts")
    missing = [n for n in names if n not in rendered_rules]
    require(not missing, f"PrometheusRule lacks alerts {missing}")
    for r in wanted:
        require(rendered_rules[r["alert"]] == r, f"alert {r['alert']} differs from files/alerts.yaml")
    require(rule["metadata"]["labels"].get("release") == "prometheus", "PrometheusRule extra labels")

    dashboards = dashboard_config_maps(docs)
    require(len(dashboards) == 1, f"expected one Grafana dashboard ConfigMap, rendered {len(dashboards)}")
    board = dashboards[0]
    labels = board["metadata"]["labels"]
    require(labels.get("grafana_dashboard") == "1", f"sidecar label grafana_dashboard: \"1\": {labels}")
    require(labels.get("team") == "streams", "dashboard extra labels")
    require(board["metadata"].get("annotations", {}).get("grafana_folder") == "MongoDB", "dashboard annotations")
    require(board["metadata"]["name"] != config_map(docs)["metadata"]["name"], "dashboard ConfigMap name clashes")
    require(list(board["data"]) == ["mongo-watcher.json"], f"dashboard ConfigMap keys: {list(board['data'])}")
    require(
        board["data"]["mongo-watcher.json"].rstrip("\n") == DASHBOARD.read_text().rstrip("\n"),
        "the dashboard ConfigMap should hold dashboards/mongo-watcher.json verbatim",
    )
    json.loads(board["data"]["mongo-watcher.json"])
    return f"{len(docs)} objects; alerts: {', '.join(names)}"


def rendered_rules(values: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule's spec (a Prometheus rule file) as the chart renders it."""
    return only(documents(render(values)), "PrometheusRule")["spec"]


def headroom_expr(rules: dict[str, Any]) -> str:
    found = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == HEADROOM_ALERT]
    require(len(found) == 1, f"expected one {HEADROOM_ALERT}, found {len(found)}")
    return found[0]


def promtool() -> str:
    binary = shutil.which("promtool")
    require(binary, "promtool is not installed (scripts/test-setup installs Debian's prometheus package)")
    return binary


def promtool_rules(binary: str, rules: dict[str, Any], test: Path, tmp: Path, label: str) -> None:
    """`promtool check rules` and `promtool test rules` on `rules`, written as alerts.yaml next
    to a copy of the unit test file `test` (which names alerts.yaml in rule_files)."""
    folder = tmp / f"rules-{label}"
    folder.mkdir()
    (folder / "alerts.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(test, folder / test.name)
    proc = run([binary, "check", "rules", str(folder / "alerts.yaml")], timeout=60)
    require(proc.returncode == 0, f"promtool check rules ({label}):\n{proc.stdout}{proc.stderr}")
    proc = subprocess.run([binary, "test", "rules", test.name], capture_output=True, text=True,
                          cwd=folder, timeout=60)
    require(proc.returncode == 0, f"promtool test rules {test.name} ({label}):\n{proc.stdout}{proc.stderr}")


def check_alert_rules_with_promtool(tmp: Path) -> str:
    """The rules the chart renders pass promtool's checks and unit tests, with the default
    threshold and with one from values; files/alerts.yaml itself carries the default."""
    binary = promtool()
    on = {"metrics": {"prometheusRule": {"enabled": True}}}
    default = rendered_rules(on)
    with helm.Chart.load(str(CHART)) as chart:
        threshold = chart.values["metrics"]["prometheusRule"]["oplogHeadroomThresholdSeconds"]
    file_expr = headroom_expr(yaml.safe_load(ALERTS.read_text()))
    require(
        re.search(rf"<\s*{threshold}\s*$", file_expr),
        f"files/alerts.yaml's {HEADROOM_ALERT} should carry the default threshold {threshold}: {file_expr}",
    )
    require(headroom_expr(default) == file_expr, f"default render changed the expr: {headroom_expr(default)}")
    promtool_rules(binary, default, ALERT_TESTS, tmp, "default")

    custom = rendered_rules({"metrics": {"prometheusRule": {"enabled": True, "oplogHeadroomThresholdSeconds": 900}}})
    expr = headroom_expr(custom)
    require(expr.rstrip().endswith("< 900"), f"threshold 900 not rendered: {expr}")
    promtool_rules(binary, custom, THRESHOLD_ALERT_TESTS, tmp, "threshold-900")

    for bad in (0, -5, 1800.5, "soon"):
        try:
            rendered_rules({"metrics": {"prometheusRule": {"enabled": True, "oplogHeadroomThresholdSeconds": bad}}})
        except helm.HelmError as e:
            require("oplogHeadroomThresholdSeconds" in str(e), f"threshold {bad!r} refused without saying why: {e}")
            continue
        raise CheckFailed(f"oplogHeadroomThresholdSeconds {bad!r} rendered; the chart should refuse it")
    version = run([binary, "--version"]).stdout.splitlines()
    return version[0] if version else ""


# Grafana's variables, replaced by something Prometheus parses.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$watcher": ".*",
    "${watcher}": ".*",
}


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, Grafana variables replaced."""
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((f"panel {panel['id']} ({panel['title']}) target {target.get('refId')}", expr))
    return out


def check_dashboard(tmp: Path) -> str:
    """dashboards/mongo-watcher.json is valid JSON, its panel ids are unique, every panel
    queries the dashboard's Prometheus data source, and promtool parses every expression
    (tests/observability.rs checks that every metric they name is exposed)."""
    try:
        board = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        raise CheckFailed(f"{DASHBOARD.relative_to(ROOT)} is not valid JSON: {e}")
    panels = board.get("panels", [])
    require(panels, "the dashboard has no panels")
    ids = [p.get("id") for p in panels]
    require(all(isinstance(i, int) for i in ids), f"panel ids should be integers: {ids}")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    require(not dupes, f"duplicate panel ids: {dupes}")
    titles = [p.get("title") for p in panels]
    require(len(set(titles)) == len(titles), f"duplicate panel titles: {titles}")
    variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
    require(variables.get("datasource", {}).get("query") == "prometheus", "a `datasource` variable of type prometheus")
    for p in panels:
        require(p.get("targets"), f"panel {p['id']} ({p['title']}) has no query")
        require(p.get("description"), f"panel {p['id']} ({p['title']}) has no description")
        for t in [p, *p["targets"]]:
            require(t.get("datasource", {}).get("uid") == "${datasource}",
                    f"panel {p['id']} ({p['title']}) should use the ${{datasource}} variable")
    exprs = dashboard_exprs(board)
    require(all(e for _, e in exprs), f"targets without expr: {[w for w, e in exprs if not e]}")
    # Recording rules are the way to have promtool parse PromQL offline.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)
    ]}]}
    path = tmp / "dashboard-exprs.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = run([promtool(), "check", "rules", str(path)], timeout=60)
    if proc.returncode != 0:
        where = "\n".join(f"  expr_{i}: {w}" for i, (w, _) in enumerate(exprs))
        raise CheckFailed(f"promtool cannot parse the dashboard's PromQL:\n{proc.stdout}{proc.stderr}\n{where}")
    return f"{len(panels)} panels, {len(exprs)} queries"


def check_render_existing_secret() -> None:
    values = {"secrets": {"existingSecret": "mongo-watcher-prod", "apiToken": "ignored"}}
    docs = documents(render(values))
    require(not [d for d in docs if d["kind"] == "Secret"], "no Secret with existingSecret")
    env = {e["name"]: e for e in container_of(only(docs, "Deployment"))["env"]}
    for var in ("MONGO_WATCHER_API_TOKEN", "MONGO_PASSWORD"):
        require(env[var]["valueFrom"]["secretKeyRef"]["name"] == "mongo-watcher-prod", f"{var} from existingSecret")


def check_render_leases() -> str:
    """leases.enabled: 2 replicas, RollingUpdate, a PodDisruptionBudget, `leases` in the config;
    replicaCount 3 and 1 with leases; refusals of a config without a checkpoint table and of
    config.leases set by hand."""
    rendered = render(LEASES_VALUES)
    docs = documents(rendered)
    assert_workload(docs, LEASES_VALUES)
    notes = next((t for n, t in rendered.items() if n.endswith("NOTES.txt")), "")
    require("2 replicas sharing the watchers through the lease table mongo-watcher-leases" in notes
            and "mongo-watcher migrate" in notes and "dynamodb:DescribeTable, Scan, UpdateItem and DeleteItem" in notes,
            f"NOTES.txt should describe the replicas, migrate and the lease table's IAM:\n{notes}")
    for replicas in (3, 1):
        values = {**LEASES_VALUES, "replicaCount": replicas}
        assert_workload(documents(render(values)), values)
    refusals = (
        ({"leases": {"enabled": True}, "config": {**LEASES_VALUES["config"], "checkpoints": None}},
         "leases.enabled needs config.checkpoints.table"),
        ({"config": {**LEASES_VALUES["config"], "leases": {"table": "t"}}}, "set leases.enabled"),
    )
    for values, reason in refusals:
        try:
            render(values)
        except helm.HelmError as e:
            require(reason in str(e), f"render refused without saying {reason!r}: {e}")
            continue
        raise CheckFailed(f"rendered {values}; the chart should refuse it ({reason})")
    return f"{len(docs)} objects; replicas 2, 3 and 1"


# Values values.schema.json must refuse, each with the path the error must name.
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicaCount": -1}, "/replicaCount"),
    ({"replicaCount": "2"}, "/replicaCount"),
    ({"leases": {"enabled": "yes"}}, "/leases/enabled"),
    ({"leases": {"ttl": "soon"}}, "/leases/ttl"),
    ({"leases": {"table": ""}}, "/leases/table"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"terminationGracePeriodSeconds": 10}, "/terminationGracePeriodSeconds"),
    ({"replicas": 2}, "replicas"),
    ({"config": {"mongodb": {"uri": "mongodb://h"}, "watchers": []}}, "/config/watchers"),
]


def check_values_schema() -> str:
    """values.schema.json describes every top-level value of values.yaml and refuses bad values
    naming them."""
    try:
        schema = json.loads(VALUES_SCHEMA.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckFailed(f"{VALUES_SCHEMA.relative_to(ROOT)}: {e}")
    described = set(schema.get("properties", {})) - {"global"}
    with helm.Chart.load(str(CHART)) as chart:
        values = set(chart.values)
    require(described == values, f"values.schema.json and values.yaml differ: only in schema {sorted(described - values)}, "
                                 f"only in values {sorted(values - described)}")
    require(schema.get("additionalProperties") is False, "values.schema.json should refuse unknown top-level values")
    for values, path in BAD_VALUES:
        try:
            render(values)
        except helm.HelmError as e:
            require("schema" in str(e) and path in str(e), f"{values} refused without naming {path}: {e}")
            continue
        raise CheckFailed(f"{values} rendered; values.schema.json should refuse it")
    return f"{len(described)} values described, {len(BAD_VALUES)} bad values refused"


def check_render_refuses_two_replicas() -> None:
    try:
        render({"replicaCount": 2})
    except helm.HelmError as e:
        require("sharded" in str(e) and "leases.enabled" in str(e), f"render failed without saying why: {e}")
        return
    raise CheckFailed("replicaCount: 2 rendered; the chart should refuse it")


def check_config_with_binary(binary: Path, tmp: Path) -> str:
    """The rendered config files pass the real binary's `check-config`."""
    configs = {}
    for label, values in (("default", None), ("all-on", ALL_ON_VALUES), ("leases", LEASES_VALUES)):
        cm = config_map(documents(render(values)))
        configs[label] = cm["data"]["config.yaml"]
    configs["terraform example"] = terraform_example_config()
    configs["terraform replicas example"] = heredoc(example_module()["config_yaml"])
    for label, text in configs.items():
        path = tmp / f"config-{label.replace(' ', '-')}.yaml"
        path.write_text(text)
        proc = run([str(binary), "check-config", "--config", str(path)],
                   env=dict(os.environ, MONGO_PASSWORD="x"), timeout=60)
        require(proc.returncode == 0, f"{label} config rejected:\n{proc.stdout}{proc.stderr}")
    return f"{binary.relative_to(ROOT)}: {', '.join(configs)}"


# --- Terraform -----------------------------------------------------------------------------------

HCL_OPTIONS = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def load_terraform() -> dict[str, Any]:
    """Every block of terraform/*.tf: resources, data, variables, locals, outputs."""
    tf: dict[str, Any] = {"resource": {}, "data": {}, "variable": {}, "locals": {}, "output": {}}
    files = sorted(TERRAFORM.glob("*.tf"))
    require(files, "no terraform/*.tf")
    for path in files:
        with path.open() as f:
            try:
                doc = hcl2.load(f, serialization_options=HCL_OPTIONS)
            except Exception as e:
                raise CheckFailed(f"{path.relative_to(ROOT)} does not parse: {e}")
        for kind in ("resource", "data"):
            for entry in doc.get(kind, []):
                for rtype, named in entry.items():
                    for name, body in named.items():
                        tf[kind][f"{rtype}.{name}"] = body
        for block in doc.get("variable", []):
            tf["variable"].update(block)
        for block in doc.get("output", []):
            tf["output"].update(block)
        for block in doc.get("locals", []):
            tf["locals"].update(block)
    return tf


def resource(tf: dict[str, Any], address: str) -> dict[str, Any]:
    require(address in tf["resource"], f"terraform has no {address}")
    return tf["resource"][address]


def resolve(tf: dict[str, Any], value: Any) -> Any:
    """Resolves a bare `${var.x}` / `${local.x}` reference to its default / value."""
    while isinstance(value, str):
        m = re.fullmatch(r"\$\{(var|local)\.([A-Za-z0-9_]+)\}", value)
        if not m:
            break
        kind, name = m.groups()
        if kind == "var":
            require(name in tf["variable"], f"undeclared variable {name}")
            value = tf["variable"][name].get("default")
        else:
            require(name in tf["locals"], f"undefined local {name}")
            value = tf["locals"][name]
    return value


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    items = body.get(name)
    require(isinstance(items, list) and len(items) == 1, f"expected one `{name}` block")
    return items[0]


_TF: dict[str, Any] = {}


def tf() -> dict[str, Any]:
    if not _TF:
        _TF.update(load_terraform())
    return _TF


def check_hcl_parse() -> str:
    t = tf()
    return f"python-hcl2 {hcl2_version()}: {len(t['resource'])} resources, {len(t['variable'])} variables"


def hcl2_version() -> str:
    from importlib.metadata import version

    return version("python-hcl2")


def check_tf_tables() -> str:
    """The checkpoint and lease tables are those of migrations/*.json: name, key, billing, and
    the schema version tag `mongo-watcher migrate` writes; PITR and encryption; the lease table
    only with leases_enabled."""
    t = tf()
    for address, path in (("aws_dynamodb_table.checkpoints", CHECKPOINTS_TABLE), ("aws_dynamodb_table.leases", LEASES_TABLE)):
        want = json.loads(path.read_text())
        table = resource(t, address)
        got = {
            "TableName": resolve(t, table["name"]),
            "AttributeDefinitions": [
                {"AttributeName": a["name"], "AttributeType": a["type"]} for a in table["attribute"]
            ],
            "KeySchema": [{"AttributeName": table["hash_key"], "KeyType": "HASH"}]
            + ([{"AttributeName": table["range_key"], "KeyType": "RANGE"}] if "range_key" in table else []),
            "BillingMode": table["billing_mode"],
        }
        want_keys = {k: v for k, v in want.items() if k != "Tags"}
        require(got == want_keys, f"{address} differs from {path.relative_to(ROOT)}:\n{got}\n!=\n{want_keys}")
        require(table.get("tags") == "${merge(local.tags, local.schema_version_tag)}", f"{address} tags: {table.get('tags')}")
        tags = {tag["Key"]: tag["Value"] for tag in want["Tags"]}
        require(t["locals"]["schema_version_tag"] == tags,
                f"local.schema_version_tag {t['locals']['schema_version_tag']} != {path.relative_to(ROOT)} Tags {tags}")
        require(block(table, "point_in_time_recovery").get("enabled") is True, f"{address}: point-in-time recovery")
        require(block(table, "server_side_encryption").get("enabled") is True, f"{address}: server-side encryption")
        require(table.get("deletion_protection_enabled") is True, f"{address}: deletion protection")
    count = resource(t, "aws_dynamodb_table.leases").get("count")
    require(count == "${var.leases_enabled ? 1 : 0}", f"the lease table exists only with leases_enabled: count = {count}")
    return f"schema version {t['locals']['schema_version_tag']}"


def check_tf_health_check() -> None:
    t = tf()
    tg = resource(t, "aws_lb_target_group.this")
    hc = block(tg, "health_check")
    require(hc.get("path") == "/healthz", f"ALB health check path: {hc.get('path')}")
    require(str(hc.get("matcher")) == "200", f"ALB health check matcher: {hc.get('matcher')}")
    require(resolve(t, tg["port"]) == 8080 and tg["target_type"] == "ip", "target group ip:8080")


def check_tf_containers() -> None:
    t = tf()
    app = resolve(t, "${local.mongo_watcher_container}")
    require(isinstance(app, dict), "local.mongo_watcher_container should be an object")
    require(isinstance(app.get("stopTimeout"), int) and app["stopTimeout"] >= 30, f"stopTimeout: {app.get('stopTimeout')}")
    ports = app.get("portMappings", [])
    require(any(resolve(t, p.get("containerPort")) == 8080 for p in ports), f"containerPort 8080: {ports}")
    require(app.get("readonlyRootFilesystem") is True, "mongo-watcher readonlyRootFilesystem")
    require(app.get("dependsOn") == [{"containerName": "config-init", "condition": "SUCCESS"}], f"dependsOn: {app.get('dependsOn')}")
    require(resolve(t, app["command"][2]) == CONFIG_PATH and app["command"][:2] == ["run", "--config"], f"command: {app['command']}")
    hc = app.get("healthCheck") or {}
    require(hc.get("command") == ["CMD", "/usr/local/bin/mongo-watcher", "healthcheck"],
            f"container healthCheck should run the healthcheck subcommand: {hc}")
    require(isinstance(hc.get("timeout"), int) and 2 < hc["timeout"] <= hc.get("interval", 0),
            f"healthCheck timeout above the probe's 2 s and within the interval: {hc}")
    init = resolve(t, "${local.config_init_container}")
    require(init.get("essential") is False, "config-init should not be essential")
    require(CONFIG_PATH in init["command"][0], "config-init writes the config file")


def check_tf_service() -> None:
    """desired_count 1 by default, validated (0/1 without leases, any whole number with them);
    deployments stop-then-start without leases (0 %/100 %), rolling with them (100 %/200 %)."""
    t = tf()
    service = resource(t, "aws_ecs_service.this")
    require(service["desired_count"] == "${var.desired_count}", "service desired_count = var.desired_count")
    variable = t["variable"]["desired_count"]
    require(variable.get("default") == 1, "desired_count default should be 1")
    conditions = [v["condition"] for v in variable.get("validation", [])]
    want = "${var.desired_count >= 0 && floor(var.desired_count) == var.desired_count && (var.leases_enabled || var.desired_count <= 1)}"
    require(conditions == [want], f"desired_count validation: {conditions}")
    require(t["variable"]["leases_enabled"].get("default") is False, "leases_enabled default false")
    require(service["deployment_minimum_healthy_percent"] == "${var.leases_enabled ? 100 : 0}",
            f"deployment_minimum_healthy_percent: {service['deployment_minimum_healthy_percent']}")
    require(service["deployment_maximum_percent"] == "${var.leases_enabled ? 200 : 100}",
            f"deployment_maximum_percent: {service['deployment_maximum_percent']}")
    require(service["launch_type"] == "FARGATE", "launch_type FARGATE")
    require(block(service, "network_configuration").get("assign_public_ip") is False, "no public IP")
    lb = block(service, "load_balancer")
    require(lb["container_name"] == "mongo-watcher" and resolve(t, lb["container_port"]) == 8080, f"load_balancer: {lb}")


def check_tf_ingress() -> None:
    t = tf()
    ingress = resource(t, "aws_vpc_security_group_ingress_rule.task_from_alb")
    require(resolve(t, ingress["from_port"]) == 8080 == resolve(t, ingress["to_port"]), "task ingress port 8080")
    require("referenced_security_group_id" in ingress and "cidr_ipv4" not in ingress, "task ingress from the ALB SG only")
    task_ingress = [a for a, r in t["resource"].items()
                    if a.startswith("aws_vpc_security_group_ingress_rule.")
                    and r.get("security_group_id") == "${aws_security_group.task.id}"]
    require(task_ingress == ["aws_vpc_security_group_ingress_rule.task_from_alb"], f"task ingress rules: {task_ingress}")


def check_tf_iam() -> None:
    t = tf()
    doc = t["data"]["aws_iam_policy_document.task"]
    actions = set()
    for statement in doc.get("statement", []):
        actions.update(statement["actions"])
        require(statement["resources"] != ["*"], f"statement {statement.get('sid')} on *")
    leases = None
    for dyn in doc.get("dynamic", []):
        for content in dyn["statement"]["content"]:
            actions.update(content["actions"])
            if content.get("sid") == "DynamoDBLeases":
                leases = (dyn["statement"]["for_each"], content)
    want = {
        "kinesis:PutRecords", "kinesis:DescribeStreamSummary",
        "dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem",
        "dynamodb:DescribeTable", "dynamodb:Scan", "dynamodb:DeleteItem",
        "ssm:GetParameter", "kms:Decrypt", "s3:PutObject",
    }
    require(actions == want, f"task role actions {sorted(actions)} != {sorted(want)}")
    # The lease table: exactly what watchers/src/lease.rs calls, only with leases.
    require(leases, "no DynamoDBLeases statement")
    for_each, content = leases
    require(for_each == "${var.leases_enabled ? [1] : []}", f"DynamoDBLeases only with leases_enabled: {for_each}")
    lease_actions = {"dynamodb:DescribeTable", "dynamodb:Scan", "dynamodb:UpdateItem", "dynamodb:DeleteItem"}
    require(set(content["actions"]) == lease_actions, f"lease table actions {sorted(content['actions'])}")
    require(content["resources"] == ["${aws_dynamodb_table.leases[0].arn}"], f"lease table resources {content['resources']}")


def terraform_example_config() -> str:
    readme = (TERRAFORM / "README.md").read_text()
    m = re.search(r"config_yaml = <<-EOT\n(.*?)\n\s*EOT", readme, re.S)
    require(m, "terraform/README.md has no config_yaml example")
    return "\n".join(l[2:] if l.startswith("  ") else l for l in m.group(1).splitlines()) + "\n"


def heredoc(value: str) -> str:
    """The text of a `<<-EOT` heredoc as python-hcl2 returns it (markers included, indented)."""
    lines = value.splitlines()
    require(lines and lines[0].strip() == "<<-EOT" and lines[-1].strip() == "EOT", f"not a <<-EOT heredoc: {value[:40]!r}")
    body = lines[1:-1]
    indent = min((len(l) - len(l.lstrip()) for l in body if l.strip()), default=0)
    return "\n".join(l[indent:] for l in body) + "\n"


def example_module() -> dict[str, Any]:
    path = EXAMPLE_REPLICAS / "main.tf"
    with path.open() as f:
        try:
            doc = hcl2.load(f, serialization_options=HCL_OPTIONS)
        except Exception as e:
            raise CheckFailed(f"{path.relative_to(ROOT)} does not parse: {e}")
    modules = {name: body for entry in doc.get("module", []) for name, body in entry.items()}
    require(list(modules) == ["mongo_watcher"], f"{path.relative_to(ROOT)}: modules {list(modules)}")
    return modules["mongo_watcher"]


def check_tf_example_replicas() -> str:
    """terraform/examples/replicas: the module with leases and 2 tasks; every argument is a
    variable of the module, every required variable is given, and its config names the module's
    tables with `leases`."""
    t = tf()
    module = example_module()
    require(module.get("source") == "../..", f"source: {module.get('source')}")
    require(module.get("leases_enabled") is True, "leases_enabled = true")
    require(isinstance(module.get("desired_count"), int) and module["desired_count"] >= 2,
            f"desired_count >= 2: {module.get('desired_count')}")
    args = set(module) - {"source"}
    unknown = args - set(t["variable"])
    require(not unknown, f"arguments the module does not declare: {sorted(unknown)}")
    required = {name for name, v in t["variable"].items() if "default" not in v}
    missing = required - args
    require(not missing, f"required variables not given: {sorted(missing)}")
    config = yaml.safe_load(heredoc(module["config_yaml"]))
    lease_table = module.get("lease_table_name", t["variable"]["lease_table_name"]["default"])
    checkpoint_table = module.get("checkpoint_table_name", t["variable"]["checkpoint_table_name"]["default"])
    require(config.get("leases", {}).get("table") == lease_table, f"config leases.table should be {lease_table}: {config.get('leases')}")
    require(config.get("checkpoints", {}).get("table") == checkpoint_table,
            f"config checkpoints.table should be {checkpoint_table}: {config.get('checkpoints')}")
    return f"desired_count {module['desired_count']}, {len(config['watchers'])} watchers"


# (desired_count, leases_enabled, config has leases.table) -> the validation error expected
# (None: accepted).
VARIABLE_CASES: list[tuple[float, bool, bool, str | None]] = [
    (1, False, False, None),
    (0, False, False, None),
    (2, False, False, "desired_count: 0 or 1 without leases_enabled"),
    (2, True, True, None),
    (0, True, True, None),
    (5, True, True, None),
    (1.5, True, True, "desired_count: 0 or 1 without leases_enabled"),
    (-1, True, True, "desired_count: 0 or 1 without leases_enabled"),
    (1, True, False, "leases_enabled must be true exactly when config_yaml has `leases.table`"),
    (1, False, True, "leases_enabled must be true exactly when config_yaml has `leases.table`"),
]


def check_tf_variable_validations(binary: str, tmp: Path) -> str:
    """Terraform itself evaluates variables.tf's validations (a plan of variables.tf alone: no
    provider, so no download): desired_count against leases_enabled, leases_enabled against
    config_yaml."""
    folder = tmp / "tf-variables"
    folder.mkdir()
    shutil.copy(TERRAFORM / "variables.tf", folder / "variables.tf")
    env = dict(os.environ, TF_CLI_CONFIG_FILE=os.devnull, TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1")
    tf_run = lambda args: subprocess.run([binary, *args, "-input=false", "-no-color"], capture_output=True,
                                         text=True, cwd=folder, env=env, timeout=120)
    proc = tf_run(["init", "-backend=false"])
    require(proc.returncode == 0, f"terraform init (no providers):\n{tail(proc.stdout)}\n{tail(proc.stderr)}")
    required = ["-var", "image=x", "-var", "ecs_cluster_arn=x", "-var", "vpc_id=x", "-var", 'subnet_ids=["s"]',
                "-var", 'kinesis_stream_arns=["arn:aws:kinesis:eu-west-1:123456789012:stream/s"]',
                "-var", "mongodb_cidr_blocks=[]"]
    for count, leases, config_leases, error in VARIABLE_CASES:
        config = ("leases: {table: mongo-watcher-leases}\n" if config_leases else "") + "watchers: [{name: a}]\n"
        proc = tf_run(["plan", "-lock=false", *required, "-var", f"desired_count={count}",
                       "-var", f"leases_enabled={str(leases).lower()}", "-var", f"config_yaml={config}"])
        said = " ".join(f"{proc.stdout}{proc.stderr}".split())
        case = f"desired_count={count} leases_enabled={leases} config leases={config_leases}"
        if error is None:
            require(proc.returncode == 0, f"{case} refused:\n{tail(proc.stdout)}\n{tail(proc.stderr)}")
        else:
            require(proc.returncode != 0 and error in said, f"{case} should be refused with {error!r}:\n{tail(said)}")
    return f"{len(VARIABLE_CASES)} cases"


def check_terraform_fmt(binary: str) -> str:
    proc = run([binary, "fmt", "-check", "-recursive", "-diff", "terraform"], timeout=120)
    require(proc.returncode == 0, f"terraform fmt -check failed:\n{tail(proc.stdout, 60)}\n{tail(proc.stderr)}")
    version = run([binary, "version"]).stdout.splitlines()
    return version[0] if version else ""


# --- main ----------------------------------------------------------------------------------------

def main() -> int:
    started = time.monotonic()
    runner = Runner()
    for tool in (CHECKOV, HADOLINT):
        if not Path(tool).exists():
            print(f"FAIL tools: {tool} is missing; run tests/deploy/run", flush=True)
            print("deploy checks: 0 passed, 1 failed")
            return 1

    with tempfile.TemporaryDirectory(prefix="deploy-checks-") as tmpdir:
        tmp = Path(tmpdir)
        # Rendered manifests for checkov: both values sets in one folder (one checkov run).
        rendered_dir = tmp / "rendered"
        rendered_dir.mkdir()
        for label, values in (("default", None), ("all-on", ALL_ON_VALUES), ("leases", LEASES_VALUES)):
            try:
                for name, text in render(values).items():
                    if name.endswith(".yaml") and text.strip():
                        (rendered_dir / f"{label}-{Path(name).name}").write_text(text)
            except helm.HelmError as e:
                print(f"render with {label} values failed: {e}", flush=True)

        # The slow scans run in the background while the quick checks go on.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        scans = {
            "checkov Dockerfile": ("dockerfile", pool.submit(
                checkov, ["--file", str(DOCKERFILE), "--framework", "dockerfile"])),
            "checkov rendered chart (default, all-on and leases values)": ("kubernetes", pool.submit(
                checkov, ["--directory", str(rendered_dir), "--framework", "kubernetes"])),
            "checkov terraform (with examples/)": ("terraform", pool.submit(
                checkov, ["--directory", str(TERRAFORM), "--framework", "terraform"])),
            "checkov terraform/examples/replicas (leases, 2 tasks)": ("terraform", pool.submit(
                checkov, ["--directory", str(EXAMPLE_REPLICAS), "--framework", "terraform"])),
        }

        runner.check("hadolint Dockerfile", check_hadolint)
        runner.check("Dockerfile: multi-stage, distroless nonroot, 8080, entrypoint, HEALTHCHECK", check_dockerfile_shape)
        cargo = shutil.which("cargo")
        if cargo:
            runner.check(".dockerignore context loads as a cargo workspace", lambda: check_docker_context(cargo, tmp))
        else:
            print("skip docker context check: no cargo on PATH", flush=True)
        runner.check("helm lint --strict", check_lint)
        runner.check("helm render, default values", check_render_default)
        runner.check("helm render, all toggles on", check_render_all_on)
        runner.check("helm render, existingSecret", check_render_existing_secret)
        runner.check("helm render with leases: 2 replicas, RollingUpdate, PodDisruptionBudget, leases in the config",
                     check_render_leases)
        runner.check("helm render refuses replicaCount 2 without leases", check_render_refuses_two_replicas)
        runner.check("values.schema.json describes values.yaml and refuses bad values", check_values_schema)
        runner.check("alert rules as rendered: promtool check rules and test rules (default and custom threshold)",
                     lambda: check_alert_rules_with_promtool(tmp))
        runner.check("Grafana dashboard: valid JSON, unique panel ids, PromQL parses", lambda: check_dashboard(tmp))
        runner.check("terraform parses (python-hcl2)", check_hcl_parse)
        runner.check("terraform checkpoint and lease tables = migrations/*.json", check_tf_tables)
        runner.check("terraform ALB target group health check GET /healthz 200", check_tf_health_check)
        runner.check("terraform containers: stopTimeout >= 30, 8080, config init, healthCheck", check_tf_containers)
        runner.check("terraform service: desired_count validated, deploy 0%/100% (100%/200% with leases)", check_tf_service)
        runner.check("terraform tasks accept 8080 from the ALB security group only", check_tf_ingress)
        runner.check("terraform task role least privilege (lease table with leases only)", check_tf_iam)
        runner.check("terraform/examples/replicas: leases, desired_count >= 2, module arguments, config", check_tf_example_replicas)

        terraform = shutil.which("terraform")
        if terraform:
            runner.check("terraform fmt -check -recursive terraform", lambda: check_terraform_fmt(terraform))
            runner.check("terraform evaluates the variable validations (desired_count, leases_enabled)",
                         lambda: check_tf_variable_validations(terraform, tmp))
        else:
            print("skip terraform fmt: no terraform binary on PATH", flush=True)

        binary = next((p for p in (ROOT / "target/release/mongo-watcher", ROOT / "target/debug/mongo-watcher")
                       if p.is_file() and os.access(p, os.X_OK)), None)
        if binary:
            runner.check("mongo-watcher check-config on the chart's and terraform's configs",
                         lambda: check_config_with_binary(binary, tmp))
        else:
            print("skip check-config: no built mongo-watcher binary in target/", flush=True)

        for name, (framework, future) in scans.items():
            runner.check(name, lambda f=framework, fut=future: checkov_verdict(f, fut.result()))
        pool.shutdown()

    print(f"took {time.monotonic() - started:.0f}s")
    print(f"deploy checks: {runner.passed} passed, {runner.failed} failed")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
