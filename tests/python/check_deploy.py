#!/usr/bin/env python3
"""Validates deploy/ (and the JSON in loadtest/) as far as it can be without Docker or a cluster.

  1. promtool (Debian package `prometheus`; missing promtool is a failure, never a skip):
     `check config` of deploy/prometheus/prometheus.yml, `check rules` of alerts.yml, its unit
     tests (`test rules` alerts_test.yml), and the PromQL of every Grafana query (as rules).
  2. Every YAML file under deploy/ parses (all documents) and every JSON file under deploy/ and
     loadtest/ parses (loadtest/data/ and loadtest/reports/ are generated and skipped).
  3. Kubernetes: built-in kinds validate strictly against the Kubernetes 1.30 schemas
     (kubernetes-validate); the Services, probes, HPA and ServiceMonitor point at what the
     Deployment defines; the KServe InferenceService matches its ServingRuntime; the
     PrometheusRule carries exactly the groups of alerts.yml.
  4. Grafana: panel ids unique, every query has an expression and uses the ${datasource}
     variable; docker-compose mounts and build files exist.
  5. With --metrics FILE (a saved /metrics page) or --metrics URL: every `slimserve_*` metric
     named by a Grafana query or an alert rule is exported by the server (histograms by their
     `# TYPE` line, for `_bucket`/`_sum`/`_count`), and the labels the selectors use exist.

Usage: check_deploy.py [--metrics FILE|http://HOST:PORT/metrics]
Exit status 0 when everything passes; 1 with one line per problem.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "slimserve.json"
GENERATED = [ROOT / "loadtest" / "data", ROOT / "loadtest" / "reports"]
K8S_VERSION = "1.30"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC = re.compile(r"\b(slimserve_[A-Za-z0-9_:]*[A-Za-z0-9_])")
SELECTOR = re.compile(r"\b(slimserve_[A-Za-z0-9_:]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")

problems = []


def fail(msg):
    problems.append(msg)


def rel(p):
    return str(Path(p).relative_to(ROOT))


# --- 1. promtool ------------------------------------------------------------------------------

def promtool(*args):
    """Runs promtool; its output is printed, a non-zero exit is a problem."""
    args = [rel(a) if isinstance(a, Path) and ROOT in a.parents else a for a in args]
    cmd = [PROMTOOL, *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    print(f"$ promtool {' '.join(map(str, args))}\n" + "\n".join("  " + l for l in out.splitlines()))
    if r.returncode != 0:
        fail(f"promtool {' '.join(map(str, args))} failed (exit {r.returncode})")
    return r.returncode == 0


def dashboard_exprs(dash):
    """(where, expression) for every PromQL string in the dashboard: panel targets and the
    templating queries."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str) and value.strip():
                    found.append((f"{title} ({key})", value))
                else:
                    walk(value, title)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dash, "dashboard")
    return found


def grafana_to_promql(expr):
    """Grafana's variables and functions replaced by values promtool can parse."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(:[a-z]+)?\}?", ".*", expr)
    m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", expr)
    return m.group(1) if m else expr


def check_dashboard_promql(dash, tmp):
    """Every dashboard query becomes a recording rule, so `promtool check rules` parses it."""
    exprs = [(w, e) for w, e in dashboard_exprs(dash) if e.strip() != "prometheus"]
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)]
    path = Path(tmp) / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    if not promtool("check", "rules", path):
        for i, (where, _) in enumerate(exprs):
            fail(f"  (dashboard:query_{i} above is the dashboard's {where})")


# --- 2. parsing -------------------------------------------------------------------------------

def files(root, *suffixes):
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix in suffixes
                  and not any(g == p or g in p.parents for g in GENERATED))


def load_yaml_files():
    docs = {}
    for path in files(DEPLOY, ".yml", ".yaml"):
        try:
            parsed = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{rel(path)}: YAML does not parse: {e}")
            continue
        if not parsed:
            fail(f"{rel(path)}: no YAML documents")
        docs[path] = parsed
    print(f"check_deploy: {len(docs)} YAML files parse ({sum(map(len, docs.values()))} documents)")
    return docs


def load_json_files():
    parsed = {}
    for path in files(DEPLOY, ".json") + files(ROOT / "loadtest", ".json"):
        try:
            parsed[path] = json.loads(path.read_text())
        except ValueError as e:
            fail(f"{rel(path)}: JSON does not parse: {e}")
    print(f"check_deploy: {len(parsed)} JSON files parse")
    return parsed


# --- 3. Kubernetes ----------------------------------------------------------------------------

def k8s_objects(docs):
    objs = []
    for path, ds in docs.items():
        if not any(d in path.parents for d in (DEPLOY / "k8s", DEPLOY / "kserve")):
            continue
        for d in ds:
            if not isinstance(d, dict) or not all(k in d for k in ("apiVersion", "kind")):
                fail(f"{rel(path)}: a document without apiVersion and kind")
                continue
            if d["kind"] != "Kustomization" and not (d.get("metadata") or {}).get("name"):
                fail(f"{rel(path)}: {d['kind']} without metadata.name")
                continue
            objs.append((path, d))
    return objs


def validate_builtin_kinds(objs):
    import kubernetes_validate as kv

    n = 0
    for path, obj in objs:
        group = obj["apiVersion"].rpartition("/")[0]
        if "." in group and (not group.endswith(".k8s.io") or group == "kustomize.config.k8s.io"):
            continue  # custom resources (monitoring.coreos.com, serving.kserve.io, kustomize): below
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
            n += 1
        except kv.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            fail(f"{rel(path)}: {obj['kind']} {obj['metadata']['name']} fails the Kubernetes {K8S_VERSION} schema at {where}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            fail(f"{rel(path)}: {obj['kind']}: no Kubernetes {K8S_VERSION} schema ({e})")
    print(f"check_deploy: {n} built-in Kubernetes objects validate strictly against {K8S_VERSION}")


def by_kind(objs, kind):
    return [(p, o) for p, o in objs if o["kind"] == kind]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_k8s_references(objs, alerts):
    deployments = by_kind(objs, "Deployment")
    if not deployments:
        fail("deploy/k8s: no Deployment")
        return
    for path, dep in deployments:
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        if not matches(dep["spec"]["selector"].get("matchLabels"), labels):
            fail(f"{rel(path)}: Deployment {name}'s selector does not match its pod labels")
        for c in pod["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            grpc_port = ports.get("grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c.get(probe)
                if not spec or "grpc" not in spec:
                    fail(f"{rel(path)}: container {c['name']} has no gRPC {probe}")
                elif spec["grpc"].get("port") != grpc_port:
                    fail(f"{rel(path)}: {probe} asks port {spec['grpc'].get('port')}, the grpc port is {grpc_port}")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            queue = env.get("SLIMSERVE_MAX_QUEUE_SIZE", "256")
            for rule in alerts:
                if rule.get("alert") == "SlimserveQueueSaturated" and f"/ {queue}" not in rule["expr"]:
                    fail(f"{rel(path)}: SLIMSERVE_MAX_QUEUE_SIZE={queue} but alert SlimserveQueueSaturated divides by another size")
            sec = {**pod["spec"].get("securityContext", {}), **c.get("securityContext", {})}
            if not sec.get("runAsNonRoot") or sec.get("runAsUser", 0) == 0:
                fail(f"{rel(path)}: container {c['name']} may run as root")
        for spath, svc in by_kind(objs, "Service"):
            if not matches(svc["spec"].get("selector"), labels):
                continue
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                known = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])} | \
                        {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                if target not in known:
                    fail(f"{rel(spath)}: Service {svc['metadata']['name']} port {port.get('name')} targets {target}, not a container port")
                if port.get("name") == "grpc" and port.get("appProtocol") != "grpc":
                    fail(f"{rel(spath)}: Service {svc['metadata']['name']} port grpc lacks appProtocol: grpc")
        for hpath, hpa in by_kind(objs, "HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            if ref.get("kind") == "Deployment" and ref.get("name") != name:
                fail(f"{rel(hpath)}: HPA scales Deployment {ref.get('name')}, not {name}")
    services = by_kind(objs, "Service")
    for mpath, mon in by_kind(objs, "ServiceMonitor"):
        sel = mon["spec"]["selector"]
        chosen = [s for _, s in services if matches(sel.get("matchLabels"), s["metadata"].get("labels", {}))
                  and all(e["operator"] != "DoesNotExist" or e["key"] not in s["metadata"].get("labels", {})
                          for e in sel.get("matchExpressions", []))]
        if len(chosen) != 1:
            fail(f"{rel(mpath)}: ServiceMonitor selects {len(chosen)} Services, expected exactly one")
        for ep in mon["spec"]["endpoints"]:
            if chosen and ep.get("port") not in {p.get("name") for p in chosen[0]["spec"]["ports"]}:
                fail(f"{rel(mpath)}: ServiceMonitor endpoint port {ep.get('port')} is not a port of Service {chosen[0]['metadata']['name']}")
    runtimes = {o["metadata"]["name"]: (p, o) for p, o in by_kind(objs, "ServingRuntime")}
    for rpath, rt in runtimes.values():
        spec = rt["spec"]
        if "grpc-v2" not in spec.get("protocolVersions", []):
            fail(f"{rel(rpath)}: ServingRuntime does not list protocolVersions grpc-v2")
        ports = [p for c in spec.get("containers", []) for p in c.get("ports", [])]
        if not any(p.get("name") == "h2c" and p.get("containerPort") == 8001 for p in ports):
            fail(f"{rel(rpath)}: ServingRuntime has no port h2c on containerPort 8001")
    for ipath, isvc in by_kind(objs, "InferenceService"):
        model = isvc["spec"]["predictor"].get("model", {})
        rt = runtimes.get(model.get("runtime"))
        if rt is None:
            fail(f"{rel(ipath)}: InferenceService runtime {model.get('runtime')!r} is not a ServingRuntime in deploy/")
            continue
        formats = {f["name"] for f in rt[1]["spec"]["supportedModelFormats"]}
        if model.get("modelFormat", {}).get("name") not in formats:
            fail(f"{rel(ipath)}: modelFormat {model.get('modelFormat')} is not one the runtime supports ({sorted(formats)})")
        if model.get("protocolVersion") not in rt[1]["spec"].get("protocolVersions", []):
            fail(f"{rel(ipath)}: protocolVersion {model.get('protocolVersion')!r} is not one the runtime speaks")


def check_kustomization(objs):
    for path, k in by_kind(objs, "Kustomization"):
        for res in k.get("resources", []):
            if not (path.parent / res).exists():
                fail(f"{rel(path)}: resource {res} does not exist")
        listed = {(path.parent / r).resolve() for r in k.get("resources", [])}
        for other in sorted(path.parent.glob("*.yaml")):
            if other != path and other.resolve() not in listed:
                fail(f"{rel(path)}: {other.name} is not listed in resources")


def check_prometheus_rule(objs, alerts_doc):
    rules = by_kind(objs, "PrometheusRule")
    if not rules:
        fail("deploy/k8s: no PrometheusRule")
    for path, pr in rules:
        if pr["spec"].get("groups") != alerts_doc.get("groups"):
            fail(f"{rel(path)}: spec.groups differ from deploy/prometheus/alerts.yml (copy them over)")


# --- 4. Grafana and compose -------------------------------------------------------------------

def check_dashboard(dash):
    ids = []
    for panel in dash.get("panels", []):
        ids.append(panel.get("id"))
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "?")
        if "gridPos" not in panel:
            fail(f"dashboard panel {title!r}: no gridPos")
        targets = panel.get("targets") or []
        if not targets:
            fail(f"dashboard panel {title!r}: no queries")
        for t in targets:
            if not (t.get("expr") or "").strip():
                fail(f"dashboard panel {title!r}: query {t.get('refId')} has no expr")
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in targets]:
            if not isinstance(ds, dict) or ds.get("uid") != "${datasource}":
                fail(f"dashboard panel {title!r}: datasource is not the ${{datasource}} variable")
                break
    if len(ids) != len(set(ids)):
        fail("dashboard: panel ids are not unique")
    names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    for var in ("datasource", "model"):
        if var not in names:
            fail(f"dashboard: no ${var} variable")


def check_compose(docs):
    path = DEPLOY / "docker-compose.yml"
    if path not in docs:
        fail("deploy/docker-compose.yml is missing")
        return
    compose = docs[path][0]
    for name, svc in compose.get("services", {}).items():
        if "image" not in svc and "build" not in svc:
            fail(f"{rel(path)}: service {name} has neither image nor build")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = (path.parent / build.get("context", ".")).resolve()
            if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                fail(f"{rel(path)}: service {name} builds {build.get('dockerfile')}, which does not exist in {ctx}")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")) and not (path.parent / src).exists():
                fail(f"{rel(path)}: service {name} mounts {src}, which does not exist")
    for name in ("slimserve", "prometheus", "grafana"):
        if name not in compose.get("services", {}):
            fail(f"{rel(path)}: no {name} service")


# --- 5. metric names against a live /metrics --------------------------------------------------

def read_metrics(source):
    if re.match(r"https?://", source):
        with urllib.request.urlopen(source, timeout=10) as r:
            return r.read().decode()
    return Path(source).read_text()


def parse_metrics(text):
    """({sample name: set of label names}, {name: type})."""
    samples, types = {}, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s", line)
            if m:
                samples.setdefault(m.group(1), set()).update(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', m.group(3) or ""))
    return samples, types


def check_metric_names(uses, text, source):
    samples, types = parse_metrics(text)
    if not samples:
        fail(f"{source}: no samples: not a Prometheus /metrics page")
        return
    missing = {}
    for where, expr in uses:
        for name in set(METRIC.findall(expr)):
            if name in samples:
                continue
            base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
            if base and types.get(base) in ("histogram", "summary"):
                continue
            if types.get(name) == "histogram":
                fail(f"{where}: {name} is a histogram; query {name}_bucket, _sum or _count")
                continue
            missing.setdefault(f"{base} (histogram, as {name})" if base else name, []).append(where)
        for name, body in SELECTOR.findall(expr):
            have = samples.get(name)
            if have is None:
                continue
            for label in MATCHER.findall(body):
                if label not in have:
                    fail(f"{where}: {name} has no label {label!r} in {source} (it has {sorted(have)})")
    for name, wheres in sorted(missing.items()):
        fail(f"{name} is not exported by the server ({source}); used in: {'; '.join(sorted(set(wheres)))}")
    used = {n for _, e in uses for n in METRIC.findall(e)}
    print(f"check_deploy: {len(used)} slimserve_* names in dashboard and alerts checked against {source}")


def main():
    global PROMTOOL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", help="a saved /metrics page, or its http:// URL, to check metric names against")
    args = ap.parse_args()

    PROMTOOL = shutil.which("promtool")
    if PROMTOOL is None:
        sys.exit("check_deploy: FAIL promtool not found on PATH: install Debian's `prometheus` "
                 "package (bash .ci/setup does); these checks are never skipped")

    docs = load_yaml_files()
    jsons = load_json_files()
    alerts_doc = docs.get(PROM / "alerts.yml", [{}])[0]
    alerts = [r for g in alerts_doc.get("groups", []) for r in g.get("rules", [])]
    dash = jsons.get(DASHBOARD)
    if dash is None:
        fail(f"{rel(DASHBOARD)} is missing or does not parse")

    promtool("check", "config", PROM / "prometheus.yml")
    promtool("check", "rules", PROM / "alerts.yml")
    promtool("test", "rules", PROM / "alerts_test.yml")
    with tempfile.TemporaryDirectory(prefix="check_deploy.") as tmp:
        if dash is not None:
            check_dashboard_promql(dash, tmp)

    objs = k8s_objects(docs)
    validate_builtin_kinds(objs)
    check_k8s_references(objs, alerts)
    check_kustomization(objs)
    check_prometheus_rule(objs, alerts_doc)
    if dash is not None:
        check_dashboard(dash)
    check_compose(docs)

    if args.metrics:
        uses = [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in alerts]
        if dash is not None:
            uses += [(f"dashboard {w}", e) for w, e in dashboard_exprs(dash)]
        try:
            text = read_metrics(args.metrics)
        except OSError as e:
            fail(f"--metrics {args.metrics}: cannot read: {e}")
        else:
            check_metric_names(uses, text, args.metrics)
    else:
        print("check_deploy: metric names NOT checked against the server: pass --metrics FILE|URL")

    if problems:
        for p in problems:
            print(f"check_deploy: FAIL {p}", file=sys.stderr)
        sys.exit(1)
    print("check_deploy: all checks passed")


if __name__ == "__main__":
    main()
