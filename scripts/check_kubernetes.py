"""Checks the rendered Kubernetes manifests against the server they deploy.

    python scripts/check_kubernetes.py RENDERED.yaml [RENDERED.yaml ...] [--serve-help FILE]

Each RENDERED file is the output of `kubectl kustomize` for one variant. Schema
validation is kubernetes-validate's job (scripts/test-kubernetes.sh); this checks what a
schema cannot: that the probes, the scrape annotations, the Service, the autoscaler's
metric and the shutdown timing agree with the server's routes, flags and metrics as
the source defines them, and with the image (its user, its port, its busybox).
Prints each failed check and a count; exits 1 if any fails.
"""

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SERVER_LIB = REPO / "crates/verdict-server/src/lib.rs"
MIDDLEWARE = REPO / "crates/verdict-server/src/middleware.rs"
METRICS = REPO / "crates/verdict-server/src/metrics.rs"
SERVE_ARGS = REPO / "crates/verdict/src/serve.rs"
CONTAINERFILES = [REPO / "Containerfile", REPO / "Containerfile.cuda"]
ADAPTER_VALUES = REPO / "deploy/kubernetes/prometheus-adapter-values.yaml"
PODMONITOR = REPO / "deploy/kubernetes/podmonitor.yaml"

failures = []


passed = []


def check(ok, what):
    if ok:
        passed.append(what)
    else:
        print(f"FAIL {what}")
        failures.append(what)


def server_get_routes():
    """Paths routed with a GET handler in the axum router."""
    text = SERVER_LIB.read_text()
    return set(re.findall(r'\.route\(\s*"([^"]+)",\s*get\(', text))


def open_paths():
    """Paths that stay open when an API key is set."""
    m = re.search(r"OPEN_PATHS: &\[&str\] = &\[([^\]]*)\]", MIDDLEWARE.read_text())
    return set(re.findall(r'"([^"]+)"', m.group(1))) if m else set()


def exported_metrics():
    return set(re.findall(r'const [A-Z_]+: &str = "([a-z_]+)";', METRICS.read_text()))


def default_port():
    m = re.search(r"default_value_t = (\d+)\)\]\s*pub port: u16", SERVE_ARGS.read_text())
    return int(m.group(1)) if m else None


def flag_value(args, flag):
    """The value of `--flag V` or `--flag=V` in a container's args, else None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def container_port(container, port):
    """A probe's or Service's port (a number or a port name) as a number, else None."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def image_facts(containerfile):
    text = containerfile.read_text()
    user = re.search(r"^USER (\d+)(?::(\d+))?", text, re.M)
    expose = re.search(r"^EXPOSE (\d+)", text, re.M)
    health = re.search(r'HEALTHCHECK .*?CMD \[(.*?)\]', text, re.S)
    return {
        "uid": int(user.group(1)) if user else None,
        "gid": int(user.group(2)) if user and user.group(2) else None,
        "port": int(expose.group(1)) if expose else None,
        "healthcheck": re.findall(r'"([^"]*)"', health.group(1)) if health else [],
    }


def check_variant(path, serve_flags):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    name = Path(path).name
    routes, opened = server_get_routes(), open_paths()
    deployment = by_kind.get("Deployment")
    check(deployment is not None, f"{name}: has a Deployment")
    if deployment is None:
        return
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    args = container.get("args", [])
    port = int(flag_value(args, "--port") or default_port())
    image = container["image"]
    containerfile = CONTAINERFILES[1] if image.endswith(":cuda") else CONTAINERFILES[0]
    facts = image_facts(containerfile)

    ports = [p["containerPort"] for p in container.get("ports", [])]
    check(ports == [port], f"{name}: containerPort {ports} is the server's port {port}")
    check(facts["port"] == port, f"{name}: {containerfile.name} EXPOSEs {facts['port']}")
    hc = facts["healthcheck"]
    check(
        any(f"127.0.0.1:{port}/health" in a for a in hc) and "/health" in routes,
        f"{name}: {containerfile.name} HEALTHCHECK asks /health on port {port}",
    )

    for probe_name, want in [
        ("startupProbe", None),
        ("readinessProbe", "/health"),
        ("livenessProbe", "/ping"),
    ]:
        probe = container.get(probe_name)
        check(probe is not None and "httpGet" in probe, f"{name}: {probe_name} is an HTTP probe")
        if not probe or "httpGet" not in probe:
            continue
        get = probe["httpGet"]
        if want:
            check(get["path"] == want, f"{name}: {probe_name} asks {get['path']} (want {want})")
        check(get["path"] in routes, f"{name}: {probe_name} path {get['path']} is a GET route")
        check(
            get["path"] in opened,
            f"{name}: {probe_name} path {get['path']} stays open with an API key",
        )
        check(
            container_port(container, get["port"]) == port,
            f"{name}: {probe_name} port {get['port']} is {port}",
        )

    ann = pod["metadata"].get("annotations", {})
    check(
        ann.get("prometheus.io/path") in routes and ann.get("prometheus.io/path") in opened,
        f"{name}: scrape path {ann.get('prometheus.io/path')} is an open GET route",
    )
    check(ann.get("prometheus.io/port") == str(port), f"{name}: scrape port is {port}")

    service = by_kind.get("Service")
    check(service is not None, f"{name}: has a Service")
    if service:
        selector = service["spec"]["selector"]
        labels = pod["metadata"]["labels"]
        check(
            all(labels.get(k) == v for k, v in selector.items()),
            f"{name}: Service selects the pods",
        )
        for sp in service["spec"]["ports"]:
            check(
                container_port(container, sp["targetPort"]) == port,
                f"{name}: Service targetPort {sp['targetPort']} is {port}",
            )

    hpa = by_kind.get("HorizontalPodAutoscaler")
    check(hpa is not None, f"{name}: has a HorizontalPodAutoscaler")
    if hpa:
        target = hpa["spec"]["scaleTargetRef"]
        check(
            target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"],
            f"{name}: autoscaler scales the Deployment",
        )
        metrics = exported_metrics()
        adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
        served = {r["name"]["as"]: r["seriesQuery"] for r in adapter["rules"]["custom"]}
        for m in hpa["spec"]["metrics"]:
            if m["type"] != "Pods":
                continue
            metric = m["pods"]["metric"]["name"]
            check(metric in metrics, f"{name}: autoscaler metric {metric} is exported by /metrics")
            check(
                metric in served and served[metric].startswith(metric + "{"),
                f"{name}: the adapter rule serves {metric} from that series",
            )

    shutdown = flag_value(args, "--shutdown-timeout")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(pre_stop[-1]) if pre_stop[-2:-1] == ["sleep"] else 0
    check(shutdown is not None, f"{name}: passes --shutdown-timeout explicitly")
    if shutdown is not None:
        seconds = float(shutdown.rstrip("s"))
        check(
            grace > seconds + sleep,
            f"{name}: terminationGracePeriodSeconds {grace} > preStop {sleep} s + shutdown {shutdown} s",
        )
    check(
        not pre_stop or pre_stop[0] == hc[0],
        f"{name}: preStop runs the image's {hc[0] if hc else '?'}",
    )

    sc = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    check(sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
    check(
        sc.get("runAsUser") == facts["uid"] and sc.get("runAsGroup") == facts["gid"],
        f"{name}: runAs {sc.get('runAsUser')}:{sc.get('runAsGroup')} is the image's USER",
    )
    if sc.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        check("/tmp" in mounts, f"{name}: read-only root file system with a writable /tmp")

    model = flag_value(args, "--model")
    if model and model.startswith("/"):
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        check(
            any(model.startswith(m.rstrip("/") + "/") for m in mounts),
            f"{name}: --model {model} is on a mounted volume",
        )

    if serve_flags is not None:
        for a in args:
            if a.startswith("--"):
                flag = a.split("=", 1)[0]
                check(flag in serve_flags, f"{name}: `verdict serve` takes {flag}")

    if image.endswith(":cuda"):
        limits = container.get("resources", {}).get("limits", {})
        check(str(limits.get("nvidia.com/gpu")) == "1", f"{name}: asks for one nvidia.com/gpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered", nargs="+")
    ap.add_argument("--serve-help", help="output of `verdict serve --help`")
    a = ap.parse_args()
    flags = None
    if a.serve_help:
        flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", Path(a.serve_help).read_text()))
    for path in a.rendered:
        check_variant(path, flags)
    monitor = yaml.safe_load(PODMONITOR.read_text())
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    check(
        endpoint["path"] in server_get_routes() and endpoint["port"] == "http",
        "podmonitor.yaml: scrapes the http port's /metrics",
    )
    print(f"check_kubernetes: {len(passed)} checks ok, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
