#!/usr/bin/env python3
"""Deploy checks for mongo-watcher, all offline (no Docker, cluster, AWS account or network).

- Dockerfile: hadolint, checkov, and what the image must keep (distroless, non-root, 8080).
- charts/mongo-watcher: strict lint; renders with default and with all-toggles-on values, with
  assertions on probes, ports, security context, the ConfigMap and the PrometheusRule (every
  alert of files/alerts.yaml); checkov on the rendered manifests.
- terraform/: python-hcl2 assertions (checkpoint table = migrations/checkpoints.json, ALB
  health check /healthz, stopTimeout >= 30, one task), checkov, `terraform fmt -check`.

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
TERRAFORM = ROOT / "terraform"
CHECKPOINTS_TABLE = ROOT / "migrations" / "checkpoints.json"

VENV_BIN = Path(sys.executable).parent
CHECKOV = os.environ.get("CHECKOV") or str(VENV_BIN / "checkov")
HADOLINT = os.environ.get("HADOLINT") or str(VENV_BIN / "hadolint")

RELEASE = "mw"
NAMESPACE = "streams"
CONFIG_PATH = "/etc/mongo-watcher/config.yaml"

# Every checkov skip, with the place that justifies it. A new skip must be added here too.
EXPECTED_SKIPS = {
    "dockerfile": {"CKV_DOCKER_2"},  # no HEALTHCHECK: distroless, probed from outside
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
    return f"{len(files)} files, packages {', '.join(sorted(packages))}"


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


def render(values: dict[str, Any] | None) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def check_lint() -> str:
    report = helm.lint(str(CHART), strict=True)
    require(report["total_charts_linted"] == 1, f"linted {report['total_charts_linted']} charts")
    require(not report["errors"], f"lint errors: {report['errors']}")
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    require(not bad, f"lint warnings/errors (strict): {bad}")
    report_all = helm.lint(str(CHART), ALL_ON_VALUES, strict=True)
    require(not report_all["errors"], f"lint errors with all toggles on: {report_all['errors']}")
    bad = [m for m in report_all["messages"] if m["severity"] >= 2]
    require(not bad, f"lint warnings/errors with all toggles on (strict): {bad}")
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
    require(spec["replicas"] == 1, f"replicas should default to 1, got {spec['replicas']}")
    require(spec["strategy"]["type"] == "Recreate", f"strategy should be Recreate, got {spec['strategy']}")
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

    cm = only(docs, "ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    expected = json.loads(json.dumps(values["config"]))
    expected.setdefault("http", {}).setdefault("listen", "0.0.0.0:8080")
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
    return f"{len(docs)} objects; alerts: {', '.join(names)}"


def check_render_existing_secret() -> None:
    values = {"secrets": {"existingSecret": "mongo-watcher-prod", "apiToken": "ignored"}}
    docs = documents(render(values))
    require(not [d for d in docs if d["kind"] == "Secret"], "no Secret with existingSecret")
    env = {e["name"]: e for e in container_of(only(docs, "Deployment"))["env"]}
    for var in ("MONGO_WATCHER_API_TOKEN", "MONGO_PASSWORD"):
        require(env[var]["valueFrom"]["secretKeyRef"]["name"] == "mongo-watcher-prod", f"{var} from existingSecret")


def check_render_refuses_two_replicas() -> None:
    try:
        render({"replicaCount": 2})
    except helm.HelmError as e:
        require("sharded" in str(e), f"render failed without saying why: {e}")
        return
    raise CheckFailed("replicaCount: 2 rendered; the chart should refuse it")


def check_config_with_binary(binary: Path, tmp: Path) -> str:
    """The rendered config files pass the real binary's `check-config`."""
    configs = {}
    for label, values in (("default", None), ("all-on", ALL_ON_VALUES)):
        cm = only(documents(render(values)), "ConfigMap")
        configs[label] = cm["data"]["config.yaml"]
    configs["terraform example"] = terraform_example_config()
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


def check_tf_table() -> None:
    t = tf()
    want = json.loads(CHECKPOINTS_TABLE.read_text())
    table = resource(t, "aws_dynamodb_table.checkpoints")
    got = {
        "TableName": resolve(t, table["name"]),
        "AttributeDefinitions": [
            {"AttributeName": a["name"], "AttributeType": a["type"]} for a in table["attribute"]
        ],
        "KeySchema": [{"AttributeName": table["hash_key"], "KeyType": "HASH"}]
        + ([{"AttributeName": table["range_key"], "KeyType": "RANGE"}] if "range_key" in table else []),
        "BillingMode": table["billing_mode"],
    }
    require(got == want, f"checkpoint table differs from migrations/checkpoints.json:\n{got}\n!=\n{want}")
    require(block(table, "point_in_time_recovery").get("enabled") is True, "point-in-time recovery")
    require(block(table, "server_side_encryption").get("enabled") is True, "server-side encryption")


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
    init = resolve(t, "${local.config_init_container}")
    require(init.get("essential") is False, "config-init should not be essential")
    require(CONFIG_PATH in init["command"][0], "config-init writes the config file")


def check_tf_one_task() -> None:
    t = tf()
    service = resource(t, "aws_ecs_service.this")
    require(service["desired_count"] == "${var.desired_count}", "service desired_count = var.desired_count")
    require(t["variable"]["desired_count"].get("default") == 1, "desired_count default should be 1")
    require(t["variable"]["desired_count"].get("validation"), "desired_count should be validated (0 or 1)")
    require(service["deployment_minimum_healthy_percent"] == 0, "deployment_minimum_healthy_percent 0")
    require(service["deployment_maximum_percent"] == 100, "deployment_maximum_percent 100")
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
    for dyn in doc.get("dynamic", []):
        for content in dyn["statement"]["content"]:
            actions.update(content["actions"])
    want = {
        "kinesis:PutRecords", "kinesis:DescribeStreamSummary",
        "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DescribeTable",
        "ssm:GetParameter", "kms:Decrypt",
    }
    require(actions == want, f"task role actions {sorted(actions)} != {sorted(want)}")


def terraform_example_config() -> str:
    readme = (TERRAFORM / "README.md").read_text()
    m = re.search(r"config_yaml = <<-EOT\n(.*?)\n\s*EOT", readme, re.S)
    require(m, "terraform/README.md has no config_yaml example")
    return "\n".join(l[2:] if l.startswith("  ") else l for l in m.group(1).splitlines()) + "\n"


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
        for label, values in (("default", None), ("all-on", ALL_ON_VALUES)):
            try:
                for name, text in render(values).items():
                    if name.endswith(".yaml") and text.strip():
                        (rendered_dir / f"{label}-{Path(name).name}").write_text(text)
            except helm.HelmError as e:
                print(f"render with {label} values failed: {e}", flush=True)

        # The slow scans run in the background while the quick checks go on.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
        scans = {
            "checkov Dockerfile": ("dockerfile", pool.submit(
                checkov, ["--file", str(DOCKERFILE), "--framework", "dockerfile"])),
            "checkov rendered chart (default and all-on values)": ("kubernetes", pool.submit(
                checkov, ["--directory", str(rendered_dir), "--framework", "kubernetes"])),
            "checkov terraform": ("terraform", pool.submit(
                checkov, ["--directory", str(TERRAFORM), "--framework", "terraform"])),
        }

        runner.check("hadolint Dockerfile", check_hadolint)
        runner.check("Dockerfile: multi-stage, distroless nonroot, 8080, entrypoint", check_dockerfile_shape)
        cargo = shutil.which("cargo")
        if cargo:
            runner.check(".dockerignore context loads as a cargo workspace", lambda: check_docker_context(cargo, tmp))
        else:
            print("skip docker context check: no cargo on PATH", flush=True)
        runner.check("helm lint --strict", check_lint)
        runner.check("helm render, default values", check_render_default)
        runner.check("helm render, all toggles on", check_render_all_on)
        runner.check("helm render, existingSecret", check_render_existing_secret)
        runner.check("helm render refuses replicaCount 2", check_render_refuses_two_replicas)
        runner.check("terraform parses (python-hcl2)", check_hcl_parse)
        runner.check("terraform checkpoint table = migrations/checkpoints.json", check_tf_table)
        runner.check("terraform ALB target group health check GET /healthz 200", check_tf_health_check)
        runner.check("terraform containers: stopTimeout >= 30, 8080, config init", check_tf_containers)
        runner.check("terraform one task: desired_count 1, deploy 0%/100%", check_tf_one_task)
        runner.check("terraform tasks accept 8080 from the ALB security group only", check_tf_ingress)
        runner.check("terraform task role least privilege", check_tf_iam)

        terraform = shutil.which("terraform")
        if terraform:
            runner.check("terraform fmt -check -recursive terraform", lambda: check_terraform_fmt(terraform))
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
