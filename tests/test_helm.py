"""The Helm chart (helm/tokenwire) and the Dockerfile, checked offline.

Every values file under helm/tokenwire/ci/ is linted (`helm lint --strict`), rendered (`helm template`) for
several Kubernetes versions and validated against those versions' schemas (`kubernetes-validate --strict`);
the tests then read the rendered YAML: probes, Services, the security context, GPU limits, shutdown timing,
the gateway's upstream, Secrets. Every file under helm/bad-values/ must be refused, with the message its
`# expect:` line names. helm comes from .tools/bin (scripts/install_helm.sh) or PATH; without it these tests
fail rather than skip, so CI cannot pass without checking the chart.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tokenwire"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
BAD_VALUES = sorted((ROOT / "helm" / "bad-values").glob("*.yaml"))
# The oldest Kubernetes the chart supports with the exec preStop, the first with the sleep action, and the
# newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.28.0", "1.31.0", "1.37.0"]
RELEASE, NAMESPACE = "tw", "llm"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
# Kinds whose schemas are CRDs, not Kubernetes': checked structurally below instead.
CRD_KINDS = {"ServiceMonitor"}
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.fail("helm not found in .tools/bin or PATH: run scripts/install_helm.sh (make helm-check does)")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_helm(), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@functools.cache
def render(values: Path, kube_version: str = KUBE_VERSIONS[-1], crd: bool = True) -> tuple[dict[str, Any], ...]:
    """Every manifest `helm template` renders for one values file, hooks included."""
    args = [
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "-f",
        str(values),
        "--kube-version",
        kube_version,
    ]
    if crd:
        args += ["--api-versions", SERVICE_MONITOR_API]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render_inline(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> tuple[dict[str, Any], ...]:
    """`render` for values written here (each test's tmp_path is its own, so the cache cannot mix them up)."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return render(path)


def values_of(values: Path) -> dict[str, Any]:
    """The chart's defaults with one values file merged over them (Helm's merge: maps merge, null deletes)."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(defaults, yaml.safe_load(values.read_text()) or {})


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in find(docs, kind)]}"
    return found[0]


def server(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment", f"{RELEASE}-tokenwire-server")


def gateways(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return find(docs, "Deployment", f"{RELEASE}-tokenwire-gateway")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def flag(c: dict[str, Any], name: str) -> str | None:
    """The value of `--name=value` in a container's args."""
    for arg in c["args"]:
        if arg.startswith(f"--{name}="):
            return str(arg.split("=", 1)[1])
    return None


def pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    out = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in find(docs, "Deployment")]
    return out + [(d["metadata"]["name"], d["spec"]) for d in find(docs, "Pod")]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


ids = [p.stem for p in CI_VALUES]


# ---------------------------------------------------------------------------------------------------------
# lint, render, validate
# ---------------------------------------------------------------------------------------------------------


def test_ci_values_files_cover_the_required_cases() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "cpu-default-values.yaml",
        "gpu-values.yaml",
        "existing-pvc-secret-values.yaml",
        "hpa-servicemonitor-values.yaml",
        "everything-off-values.yaml",
    }


def test_bad_values_files_cover_engine_and_metrics() -> None:
    assert {p.name for p in BAD_VALUES} >= {
        "engine-negative-kv-cache.yaml",
        "engine-kv-cache-not-integer.yaml",
        "engine-zero-batch-tokens.yaml",
        "metrics-port-privileged.yaml",
        "metrics-port-is-grpc-port.yaml",
    }
    assert "server-metrics-enabled.yaml" not in {p.name for p in BAD_VALUES}, "server metrics are real now"


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_helm_lint_strict(values: Path) -> None:
    result = run_helm("lint", "--strict", str(CHART), "-f", str(values), "--kube-version", KUBE_VERSIONS[-1])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_manifests_match_the_kubernetes_schemas(values: Path, kube_version: str) -> None:
    docs = render(values, kube_version)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} on Kubernetes {kube_version}: {e.message} "
                f"at {'/'.join(map(str, e.path))}"
            )


def test_the_validator_is_strict() -> None:
    """Guard against a validator that passes everything: an unknown field and a wrong type are refused."""
    docs = render(CI_VALUES[0])
    deployment = server(docs)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["portt"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[p.stem for p in BAD_VALUES])
def test_bad_values_are_refused(bad: Path) -> None:
    first = bad.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{bad.name} must start with '# expect: <part of the error>'"
    expected = first.removeprefix("# expect: ")
    result = run_helm("template", RELEASE, str(CHART), "-f", str(bad))
    assert result.returncode != 0, f"{bad.name} was accepted"
    assert expected in result.stderr, result.stderr
    if "don't meet the specifications of the schema" in result.stderr:
        # lint applies the schema too (a template `fail` is only INFO to lint, so rendering is the check there)
        assert run_helm("lint", str(CHART), "-f", str(bad)).returncode != 0


# ---------------------------------------------------------------------------------------------------------
# probes and Services
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_server_probes_are_native_grpc_on_the_grpc_port(values: Path) -> None:
    c = container(server(render(values)))
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
    assert flag(c, "grpc-port") == str(port)
    expected = {"startupProbe": "readiness", "readinessProbe": "readiness", "livenessProbe": "liveness"}
    for probe, service in expected.items():
        assert c[probe]["grpc"] == {"port": port, "service": service}, probe
        assert c[probe]["timeoutSeconds"] > 1, f"{probe}: the 1 s default is too short under load"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "startup must allow for model loading"


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_gateway_probes_are_http_on_the_http_port(values: Path) -> None:
    for gateway in gateways(render(values)):
        c = container(gateway)
        assert [p["name"] for p in c["ports"]] == ["http"]
        assert flag(c, "http-port") == str(c["ports"][0]["containerPort"])
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        # liveness must not follow the pool's health (a loading pool would restart every gateway)
        assert c["livenessProbe"]["httpGet"]["port"] == "http"
        assert c["livenessProbe"]["httpGet"]["path"] != "/health"


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_services_select_the_right_pods_and_ports(values: Path) -> None:
    docs = render(values)
    pool = server(docs)
    pool_labels = pool["spec"]["template"]["metadata"]["labels"]
    grpc = one(docs, "Service", f"{RELEASE}-tokenwire-grpc")
    headless = one(docs, "Service", f"{RELEASE}-tokenwire-grpc-headless")
    assert grpc["spec"]["type"] == "ClusterIP" and "clusterIP" not in grpc["spec"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False, "only Ready pods may be in DNS"
    for svc in (grpc, headless):
        assert selects(svc["spec"]["selector"], pool_labels)
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert port["targetPort"] == "grpc" and port["appProtocol"] == "grpc"
    # the ClusterIP Service is for gRPC clients only; the server's metrics port is on the headless one alone
    assert [p["name"] for p in grpc["spec"]["ports"]] == ["grpc"]
    metrics_enabled = values_of(values)["server"]["metrics"]["enabled"]
    assert [p["name"] for p in headless["spec"]["ports"]] == (["grpc", "metrics"] if metrics_enabled else ["grpc"])
    for gateway in gateways(docs):
        gw_labels = gateway["spec"]["template"]["metadata"]["labels"]
        svc = one(docs, "Service", f"{RELEASE}-tokenwire-gateway")
        assert selects(svc["spec"]["selector"], gw_labels)
        assert not selects(svc["spec"]["selector"], pool_labels)
        assert not selects(grpc["spec"]["selector"], gw_labels)
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
    for deployment in find(docs, "Deployment"):
        assert selects(
            deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
        )


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_gateway_upstream_is_the_headless_service(values: Path) -> None:
    docs = render(values)
    headless = one(docs, "Service", f"{RELEASE}-tokenwire-grpc-headless")
    port = headless["spec"]["ports"][0]["port"]
    expected = f"dns:///{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    for gateway in gateways(docs):
        assert flag(container(gateway), "upstream") == expected


# ---------------------------------------------------------------------------------------------------------
# security
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_every_pod_meets_the_restricted_profile(values: Path) -> None:
    specs = pod_specs(render(values))
    assert specs
    for name, spec in specs:
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, f"{name}: volume {volume}"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc.get("privileged", False) is False, name
            assert sc["runAsNonRoot"] is True, name
            assert "ALL" in sc["capabilities"]["drop"], name
            assert set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, name
            assert not any(p.get("hostPort") for p in c.get("ports", [])), name
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: /tmp must be a writable volume"


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_server_writable_paths_are_volumes(values: Path) -> None:
    docs = render(values)
    v = values_of(values)
    pool = server(docs)
    spec = pool["spec"]["template"]["spec"]
    volumes = {vol["name"]: vol for vol in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container(pool)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    model_mount = mounts[v["persistence"]["mountPath"]]
    model_volume = volumes[model_mount["name"]]
    claim = v["persistence"]["existingClaim"] or (v["persistence"]["enabled"] and f"{RELEASE}-tokenwire-models")
    if claim:
        assert model_volume["persistentVolumeClaim"]["claimName"] == claim
    else:
        assert "emptyDir" in model_volume
    assert model_mount["readOnly"] is v["persistence"]["readOnly"]
    env = one(docs, "ConfigMap", f"{RELEASE}-tokenwire-server")["data"]
    assert env["HOME"] == "/tmp"
    assert env["HF_HOME"].startswith(v["persistence"]["mountPath"].rstrip("/") + "/")
    assert (env.get("HF_HUB_OFFLINE") == "1") is v["model"]["offline"]
    assert container(pool)["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-tokenwire-server"}}]


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_gpu_limits_appear_only_when_asked(values: Path) -> None:
    docs = render(values)
    v = values_of(values)
    gpu = v["server"]["gpu"]
    c = container(server(docs))
    limits = c["resources"].get("limits", {})
    if gpu["enabled"]:
        assert limits[gpu["resourceName"]] == gpu["count"]
        assert c["image"].endswith("-cuda")
        assert flag(c, "device") == "cuda"
    else:
        assert not any("gpu" in key for key in limits), limits
        assert not c["image"].endswith("-cuda")
        assert flag(c, "device") == "cpu"
    for name, spec in pod_specs(docs):
        if name.endswith("-server"):
            continue
        for other in spec["containers"]:
            assert not any("gpu" in key for key in other["resources"].get("limits", {})), name
            assert not other["image"].endswith("-cuda"), name


def test_gpu_scheduling_knobs_render() -> None:
    v = values_of(CHART / "ci" / "gpu-values.yaml")
    spec = server(render(CHART / "ci" / "gpu-values.yaml"))["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == v["server"]["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == v["server"]["nodeSelector"]
    assert spec["tolerations"] == v["server"]["tolerations"]
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    default_spec = server(render(CHART / "ci" / "cpu-default-values.yaml"))["spec"]["template"]["spec"]
    assert not {"runtimeClassName", "nodeSelector", "tolerations"} & set(default_spec)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_grace_period_covers_prestop_drain_and_grace(values: Path, kube_version: str) -> None:
    for deployment in [server(render(values, kube_version)), *gateways(render(values, kube_version))]:
        spec = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        pre_stop = c["lifecycle"]["preStop"]
        if kube_version >= "1.30":
            sleep = pre_stop["sleep"]["seconds"]
        else:
            command = pre_stop["exec"]["command"]
            assert command[0] == "sleep"
            sleep = int(command[1])
        assert sleep > 0
        budget = spec["terminationGracePeriodSeconds"]
        if deployment["metadata"]["name"].endswith("-server"):
            drain = float(flag(c, "drain-seconds") or 0)
            grace = float(flag(c, "shutdown-grace") or 0)
            assert grace > 0
        else:
            drain, grace = 0.0, values_of(values)["gateway"]["shutdown"]["graceSeconds"]
        assert budget >= sleep + drain + grace, deployment["metadata"]["name"]


# ---------------------------------------------------------------------------------------------------------
# secrets, config, optional resources
# ---------------------------------------------------------------------------------------------------------


def test_existing_secret_is_referenced_not_rendered() -> None:
    values = CHART / "ci" / "existing-pvc-secret-values.yaml"
    docs = render(values)
    v = values_of(values)
    assert not find(docs, "Secret"), "an existingSecret must never be rendered"
    assert not find(docs, "PersistentVolumeClaim"), "an existingClaim must never be rendered"
    (gateway,) = gateways(docs)
    spec = gateway["spec"]["template"]["spec"]
    (keys_volume,) = [vol for vol in spec["volumes"] if "secret" in vol]
    assert keys_volume["secret"]["secretName"] == v["apiKeys"]["existingSecret"]
    assert keys_volume["secret"]["items"] == [{"key": v["apiKeys"]["existingSecretKey"], "path": "api-keys"}]
    mount = next(m for m in container(gateway)["volumeMounts"] if m["name"] == keys_volume["name"])
    assert mount["readOnly"] is True
    assert flag(container(gateway), "api-keys-file") == f"{mount['mountPath']}/api-keys"
    assert "checksum/api-keys" not in gateway["spec"]["template"]["metadata"]["annotations"]
    test_pod = one(docs, "Pod", f"{RELEASE}-tokenwire-test")
    assert any(
        vol.get("secret", {}).get("secretName") == v["apiKeys"]["existingSecret"] for vol in test_pod["spec"]["volumes"]
    )


def test_value_keys_go_to_a_secret_and_nowhere_else() -> None:
    values = CHART / "ci" / "hpa-servicemonitor-values.yaml"
    docs = render(values)
    keys = values_of(values)["apiKeys"]["keys"]
    (secret,) = find(docs, "Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode().splitlines() == keys
    for doc in docs:
        if doc is not secret:
            text = yaml.safe_dump(doc)
            assert not any(k in text for k in keys), f"an API key is inlined in {doc['kind']}"
    (gateway,) = gateways(docs)
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/api-keys" in annotations, "changing the keys must roll the gateway"


def test_no_secret_values_in_env() -> None:
    for values in CI_VALUES:
        for name, spec in pod_specs(render(values)):
            for c in spec["containers"]:
                for env in c.get("env", []):
                    assert not re.search(r"(?i)token|key|secret|password", env["name"]) or "valueFrom" in env, (
                        f"{name}: {env['name']} must come from a Secret"
                    )


def test_hub_token_comes_from_a_secret() -> None:
    values = CHART / "ci" / "gpu-values.yaml"
    c = container(server(render(values)))
    (token,) = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_model_args_follow_the_values(values: Path) -> None:
    v = values_of(values)
    c = container(server(render(values)))
    model = flag(c, "model")
    if v["model"]["path"]:
        assert model == f"{v['persistence']['mountPath'].rstrip('/')}/{v['model']['path']}"
    elif v["model"]["id"]:
        assert model == v["model"]["id"]
    else:
        assert model is None, "no --model: the embedded demo model"
    assert flag(c, "served-model-name") == (v["model"]["servedModelName"] or None)
    assert flag(c, "dtype") == v["model"]["dtype"]
    assert c["args"][:2] == [f"--log-level={v['server']['logLevel']}", "serve"]
    assert flag(c, "grpc-host") == "0.0.0.0"
    if v["model"]["chatTemplate"]:
        path = flag(c, "chat-template")
        assert path and any(path.startswith(m["mountPath"]) for m in c["volumeMounts"])


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_engine_flags_follow_the_values(values: Path) -> None:
    engine = values_of(values)["server"]["engine"]
    c = container(server(render(values)))
    assert flag(c, "kv-cache-tokens") == str(engine["kvCacheTokens"])
    assert flag(c, "max-batch-tokens") == str(engine["maxBatchTokens"])


def test_engine_flags_defaults_and_overrides() -> None:
    """The defaults are tokenwire serve's own; gpu-values overrides both (so the values really reach the args)."""
    c = container(server(render(CHART / "ci" / "cpu-default-values.yaml")))
    assert (flag(c, "kv-cache-tokens"), flag(c, "max-batch-tokens")) == ("16384", "1024")
    c = container(server(render(CHART / "ci" / "gpu-values.yaml")))
    assert (flag(c, "kv-cache-tokens"), flag(c, "max-batch-tokens")) == ("131072", "4096")


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_server_metrics_port_follows_the_values(values: Path) -> None:
    metrics = values_of(values)["server"]["metrics"]
    docs = render(values)
    c = container(server(docs))
    ports = {p["name"]: p for p in c["ports"]}
    headless = one(docs, "Service", f"{RELEASE}-tokenwire-grpc-headless")
    service_ports = {p["name"]: p for p in headless["spec"]["ports"]}
    if metrics["enabled"]:
        assert flag(c, "metrics-port") == str(metrics["port"])
        assert ports["metrics"] == {"name": "metrics", "containerPort": metrics["port"], "protocol": "TCP"}
        assert ports["metrics"]["containerPort"] != ports["grpc"]["containerPort"]
        # tokenwire serve binds /metrics on --grpc-host: it must listen on every interface to be scraped
        assert flag(c, "grpc-host") == "0.0.0.0"
        assert service_ports["metrics"]["port"] == metrics["port"]
        assert service_ports["metrics"]["targetPort"] == "metrics"
    else:
        assert flag(c, "metrics-port") is None
        assert "metrics" not in ports and "metrics" not in service_ports
    assert sum(a.startswith("--metrics-port") for a in c["args"]) == int(metrics["enabled"])


def test_server_metrics_are_on_by_default_and_follow_the_port() -> None:
    c = container(server(render(CHART / "ci" / "cpu-default-values.yaml")))
    assert flag(c, "metrics-port") == "9090"
    c = container(server(render(CHART / "ci" / "gpu-values.yaml")))
    assert flag(c, "metrics-port") == "9400"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == 9400
    c = container(server(render(CHART / "ci" / "everything-off-values.yaml")))
    assert flag(c, "metrics-port") is None


def test_servicemonitor_only_when_the_crd_exists() -> None:
    values = CHART / "ci" / "hpa-servicemonitor-values.yaml"
    assert not find(render(values, crd=False), "ServiceMonitor")
    docs = render(values)
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert scraped_services(docs, monitor) == {
        "http": f"{RELEASE}-tokenwire-gateway",
        "metrics": f"{RELEASE}-tokenwire-grpc-headless",
    }
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    assert not find(render(CHART / "ci" / "cpu-default-values.yaml"), "ServiceMonitor")


def scraped_services(docs: tuple[dict[str, Any], ...], monitor: dict[str, Any]) -> dict[str, str]:
    """{endpoint port: the one Service it scrapes}, as the Prometheus Operator matches them (selector, port name)."""
    selector = monitor["spec"]["selector"]
    out: dict[str, str] = {}
    for endpoint in monitor["spec"]["endpoints"]:
        matched = []
        for svc in find(docs, "Service"):
            labels = svc["metadata"]["labels"]
            if not selects(selector.get("matchLabels", {}), labels):
                continue
            if not all(
                labels.get(e["key"]) in e["values"]
                for e in selector.get("matchExpressions", [])
                if e["operator"] == "In"
            ):
                continue
            if endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}:
                matched.append(svc["metadata"]["name"])
        assert len(matched) == 1, f"endpoint {endpoint['port']} scrapes {matched}: each pod must be scraped once"
        out[endpoint["port"]] = matched[0]
    return out


def test_servicemonitor_endpoints_follow_the_components(tmp_path: Path) -> None:
    on = {"serviceMonitor": {"enabled": True}}
    docs = render_inline(tmp_path, {**on, "server": {"metrics": {"enabled": False}}}, "gateway-only.yaml")
    (monitor,) = find(docs, "ServiceMonitor")
    assert scraped_services(docs, monitor) == {"http": f"{RELEASE}-tokenwire-gateway"}
    docs = render_inline(tmp_path, {**on, "gateway": {"enabled": False}}, "server-only.yaml")
    (monitor,) = find(docs, "ServiceMonitor")
    assert scraped_services(docs, monitor) == {"metrics": f"{RELEASE}-tokenwire-grpc-headless"}
    off = {**on, "gateway": {"enabled": False}, "server": {"metrics": {"enabled": False}}}
    assert not find(render_inline(tmp_path, off, "nothing.yaml"), "ServiceMonitor")


def test_hpa_owns_replicas() -> None:
    values = CHART / "ci" / "hpa-servicemonitor-values.yaml"
    docs = render(values)
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {d["metadata"]["name"] for d in find(docs, "Deployment")}
    for deployment in find(docs, "Deployment"):
        assert "replicas" not in deployment["spec"], "the HPA owns replicas"
        assert hpas[deployment["metadata"]["name"]]["spec"]["metrics"]
    assert not find(render(CHART / "ci" / "cpu-default-values.yaml"), "HorizontalPodAutoscaler")


@pytest.mark.parametrize("values", CI_VALUES, ids=ids)
def test_pdbs_select_their_pods(values: Path) -> None:
    docs = render(values)
    v = values_of(values)
    pdbs = find(docs, "PodDisruptionBudget")
    expected = int(v["server"]["podDisruptionBudget"]["enabled"]) + int(
        v["gateway"]["enabled"] and v["gateway"]["podDisruptionBudget"]["enabled"]
    )
    assert len(pdbs) == expected
    for pdb in pdbs:
        matched = [
            d
            for d in find(docs, "Deployment")
            if selects(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])


def test_network_policies_admit_only_the_gateway_and_test_pod_to_grpc() -> None:
    values = CHART / "ci" / "hpa-servicemonitor-values.yaml"
    docs = render(values)
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-tokenwire-server")
    rule, metrics_rule = policy["spec"]["ingress"]
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]}
    assert components == {"gateway", "test"}
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    # metrics scrapes: the metrics port only, from networkPolicy.serverMetricsIngressFrom
    assert metrics_rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert metrics_rule["from"] == values_of(values)["networkPolicy"]["serverMetricsIngressFrom"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], server(docs)["spec"]["template"]["metadata"]["labels"])
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    test_pod = one(docs, "Pod", f"{RELEASE}-tokenwire-test")
    assert any(selects(peer["podSelector"]["matchLabels"], test_pod["metadata"]["labels"]) for peer in rule["from"])


def test_network_policy_metrics_rule_follows_the_values(tmp_path: Path) -> None:
    """Empty serverMetricsIngressFrom = any source (as the gateway's /metrics); metrics off = no rule at all."""
    docs = render_inline(tmp_path, {"networkPolicy": {"enabled": True}}, "open.yaml")
    rule, metrics_rule = one(docs, "NetworkPolicy", f"{RELEASE}-tokenwire-server")["spec"]["ingress"]
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}] and rule["from"]
    assert metrics_rule == {"ports": [{"port": 9090, "protocol": "TCP"}]}
    off = {"networkPolicy": {"enabled": True}, "server": {"metrics": {"enabled": False}}}
    policy = one(render_inline(tmp_path, off, "off.yaml"), "NetworkPolicy", f"{RELEASE}-tokenwire-server")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("server_values", "error"),
    [
        ({"engine": {"kvCacheTokens": -1}}, "/server/engine/kvCacheTokens': minimum"),
        ({"engine": {"kvCacheTokens": 0}}, "/server/engine/kvCacheTokens': minimum"),
        ({"engine": {"kvCacheTokens": 15}}, "/server/engine/kvCacheTokens': minimum"),
        ({"engine": {"kvCacheTokens": 1.5}}, "/server/engine/kvCacheTokens'"),
        ({"engine": {"kvCacheTokens": "16k"}}, "/server/engine/kvCacheTokens'"),
        ({"engine": {"kvCacheTokens": None}}, "kvCacheTokens"),
        ({"engine": {"maxBatchTokens": 0}}, "/server/engine/maxBatchTokens': minimum"),
        ({"engine": {"maxBatchTokens": -1024}}, "/server/engine/maxBatchTokens': minimum"),
        ({"engine": {"maxTokens": 1}}, "additional properties"),
        ({"metrics": {"enabled": "yes"}}, "/server/metrics/enabled'"),
        ({"metrics": {"port": 80}}, "/server/metrics/port': minimum"),
        ({"metrics": {"port": 70000}}, "/server/metrics/port': maximum"),
    ],
    ids=lambda v: re.sub(r"[^\w.-]+", "-", str(v)).strip("-") if isinstance(v, dict) else "refused",
)
def test_schema_refuses_bad_engine_and_metrics_values(
    tmp_path: Path, server_values: dict[str, Any], error: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"server": server_values}))
    result = run_helm("template", RELEASE, str(CHART), "-f", str(bad))
    assert result.returncode != 0, f"{server_values} was accepted"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    assert error in result.stderr, result.stderr


def test_schema_accepts_the_smallest_engine_values(tmp_path: Path) -> None:
    docs = render_inline(tmp_path, {"server": {"engine": {"kvCacheTokens": 16, "maxBatchTokens": 1}}})
    c = container(server(docs))
    assert (flag(c, "kv-cache-tokens"), flag(c, "max-batch-tokens")) == ("16", "1")


def test_everything_off_renders_only_the_grpc_service() -> None:
    docs = render(CHART / "ci" / "everything-off-values.yaml")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Service", "Service"]
    assert server(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "default"


def test_helm_test_hook_checks_grpc_health_and_models() -> None:
    docs = render(CHART / "ci" / "cpu-default-values.yaml")
    pod = one(docs, "Pod", f"{RELEASE}-tokenwire-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    c = pod["spec"]["containers"][0]
    script = c["args"][0]
    compile(script, "helm-test", "exec")  # the embedded Python at least parses
    assert "grpc_health" in script and "/v1/models" in script
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["GRPC_SERVICE"] == f"{RELEASE}-tokenwire-grpc:50051"
    assert env["GRPC_POOL"] == flag(container(gateways(docs)[0]), "upstream")
    assert env["GATEWAY_URL"] == f"http://{RELEASE}-tokenwire-gateway:80"


def test_configs_roll_the_pods() -> None:
    base = CHART / "ci" / "cpu-default-values.yaml"
    other = CHART / "ci" / "existing-pvc-secret-values.yaml"
    a = server(render(base))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = server(render(other))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert a != b


def test_values_table_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "helm/values_doc.py", "--check"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------
# the Dockerfile (no Docker engine here: hadolint runs in docker/check.sh; these read the file)
# ---------------------------------------------------------------------------------------------------------


def dockerfile_stages() -> tuple[dict[str, str], list[tuple[str, str, list[str]]]]:
    """(global ARG defaults, [(stage name, base image, instructions)]) with line continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction = line.split()[0].upper()
        if instruction == "FROM":
            m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
            assert m
            stages.append((m[2] or str(len(stages)), m[1], []))
        elif not stages and instruction == "ARG":
            name, _, default = line.split(None, 1)[1].partition("=")
            args[name] = default.strip('"')
        else:
            stages[-1][2].append(line)
    return args, stages


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)


def test_dockerfile_is_multi_stage_with_pinned_bases() -> None:
    args, stages = dockerfile_stages()
    assert len(stages) >= 2
    for name, base, _ in stages:
        image = resolve(base, args)
        if image in {s[0] for s in stages}:
            continue  # a previous stage
        _repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"stage {name}: pin {image} to a version"


def test_runtime_stage_is_slim_non_root_and_without_compilers() -> None:
    args, stages = dockerfile_stages()
    _name, base, lines = stages[-1]
    text = "\n".join(lines)
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid, so runAsNonRoot can verify it"
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|cargo|rustc|rustup|maturin|make)\b", text), text
    copies = [line for line in lines if line.upper().startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv"], "only the built venv enters the runtime image"
    assert re.search(r'ENTRYPOINT \["tokenwire"\]', text)
    assert "HOME=/tmp" in text and "HF_HOME=/models" in text
    assert resolve(base, args) == resolve(stages[1][1], args), "the venv runs on the Python it was built with"


def test_no_weights_enter_the_image() -> None:
    _, stages = dockerfile_stages()
    for _name, _, lines in stages:
        for line in lines:
            if line.upper().startswith(("COPY", "ADD")):
                assert not re.search(r"(?i)\.(safetensors|bin|gguf|pt|pth|ckpt)\b|models?/", line), line
            assert not re.search(r"(?i)huggingface-cli|hf download|snapshot_download", line), line
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", ".dockerignore must be an allow-list"
    for pattern in ("**/*.safetensors", "**/*.so", "sampler_rs/target/"):
        assert pattern in ignore


def test_image_install_steps_match_the_project() -> None:
    """The builder runs docker/install.sh (the script CI runs in a clean venv), with a torch pin pyproject allows."""
    from packaging.requirements import Requirement

    _args, stages = dockerfile_stages()
    builder = next(lines for name, _, lines in stages if name == "builder")
    runs = [line for line in builder if line.startswith("RUN") and "docker/install.sh" in line]
    assert len(runs) == 1 and "/opt/venv" in runs[0]
    arg_defaults = dict(
        line.split(None, 1)[1].split("=", 1) for line in builder if line.startswith("ARG") and "=" in line
    )
    script = (ROOT / "docker" / "install.sh").read_text()
    script_pin = re.search(r"TORCH_VERSION=\$\{TORCH_VERSION:-([^}]+)\}", script)
    assert script_pin and arg_defaults["TORCH_VERSION"] == script_pin[1]
    assert arg_defaults["TORCH_VARIANT"] == "cpu"
    assert "https://download.pytorch.org/whl/cpu" in script
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_req = Requirement(re.search(r'"(torch[^"]*)"', pyproject)[1])  # type: ignore[index]
    assert torch_req.specifier.contains(script_pin[1]), f"torch {script_pin[1]} vs pyproject {torch_req}"
    assert os.access(ROOT / "docker" / "install.sh", os.X_OK)
