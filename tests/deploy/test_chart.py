"""The Helm chart, through the real Helm engine (helm-python-sdk) and real Kubernetes schemas.

No cluster is needed: ``Chart.render`` runs Helm's template engine and schema validation,
``lint(strict=True)`` runs ``helm lint --strict``, and every rendered object of a core kind is
validated by ``kubernetes-validate`` against the OpenAPI schema of a current Kubernetes. The
operator CRDs (KEDA ScaledObject, Prometheus Operator ServiceMonitor/PodMonitor) have no schema
there and get field-by-field assertions instead. Every container's argument list is parsed by
the real ``tandem`` CLI, so a flag the chart passes cannot drift from the code.
"""

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmError

CHART = Path(__file__).resolve().parents[2] / "deploy/helm/tandem"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
KUBE_VERSION = kubernetes_validate.latest_version()
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor"}
GPU = "nvidia.com/gpu"
RELEASE, NAMESPACE = "tandem", "serving"


@pytest.fixture(scope="module")
def chart() -> Chart:
    return Chart.load(CHART)


def render(chart: Chart, values: dict | None = None) -> list[dict]:
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in out.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(objects: list[dict], kind: str, name_suffix: str | None = None) -> list[dict]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name_suffix is None or o["metadata"]["name"] == f"{RELEASE}-{name_suffix}")
    ]


def one(objects: list[dict], kind: str, name_suffix: str) -> dict:
    found = find(objects, kind, name_suffix)
    assert len(found) == 1, (
        f"{kind} {name_suffix}: {[o['metadata']['name'] for o in find(objects, kind)]}"
    )
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def example_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# KV transports that reach into the other pod's memory (docs/kubernetes.md, "KV transports").
KV_SAME_NODE = {
    "kvTransport": {"mode": "cuda-ipc", "strict": True, "hostIPC": True, "shareDevShm": True},
    "prefill": {"kv": {"checksum": True}},
    "decode": {"kvLeaseSeconds": 30.5, "kvTimeoutSeconds": 20, "kvWriteLeaseSeconds": 2.5},
}
KV_RDMA = {"kvTransport": {"mode": "nixl", "rdma": {"resources": {"rdma/hca": 1}, "ipcLock": True}}}

ALL_VALUE_SETS = (
    [pytest.param({}, id="defaults")]
    + [pytest.param(example_values(p), id=p.stem) for p in EXAMPLES]
    + [pytest.param(KV_SAME_NODE, id="kv-same-node"), pytest.param(KV_RDMA, id="kv-rdma")]
)


# -- Lint, render, schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("values", ALL_VALUE_SETS)
def test_lint_is_clean_in_strict_mode(values):
    result = lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=KUBE_VERSION)
    assert result["errors"] == []
    # Severity 1 is INFO (only "icon is recommended": we publish no icon); warnings are 2+.
    assert [m for m in result["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", ALL_VALUE_SETS)
def test_every_rendered_object_validates_against_kubernetes_schemas(chart, values):
    objects = render(chart, values)
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue  # checked field by field below
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_examples_cover_the_common_shapes(chart):
    assert {p.stem for p in EXAMPLES} == {
        "values-1p1d",
        "values-xpyd",
        "values-colocated",
        "values-tp4-colocated",
    }
    by_name = {p.stem: render(chart, example_values(p)) for p in EXAMPLES}
    colocated = by_name["values-colocated"]
    assert not find(colocated, "Deployment", "prefill") and not find(
        colocated, "Deployment", "kvstore"
    )
    assert not find(colocated, "StatefulSet")
    assert one(colocated, "Deployment", "decode")["spec"]["replicas"] == 2
    one_one = by_name["values-1p1d"]
    for role in ("prefill", "decode"):
        assert one(one_one, "Deployment", role)["spec"]["replicas"] == 1
        assert pod_spec(one(one_one, "Deployment", role))["nodeSelector"] == {
            "kubernetes.io/hostname": "gpu-node-1"
        }
    xpyd = by_name["values-xpyd"]
    assert "replicas" not in one(xpyd, "Deployment", "prefill")["spec"]  # the autoscaler owns it
    assert {o["metadata"]["name"] for o in find(xpyd, "ScaledObject")} == {
        "tandem-prefill",
        "tandem-decode",
    }
    tp4 = by_name["values-tp4-colocated"]
    assert not find(tp4, "Deployment", "prefill") and not find(tp4, "StatefulSet")
    decode = container_of(tp4, "decode")
    assert parse_cli(decode["args"]).tensor_parallel_size == 4
    assert decode["resources"]["requests"][GPU] == decode["resources"]["limits"][GPU] == "4"


# -- What the CLI receives ---------------------------------------------------------------------


def parse_cli(args: list[str]):
    """Parse a container's args with the real ``tandem`` CLI (no command runs)."""
    from services.cli import parse

    concrete = [re.sub(r"\$\((POD_IP|POD_NAME)\)", "10.0.0.7", a) for a in args]
    return parse(concrete)[1]


@pytest.mark.parametrize("values", ALL_VALUE_SETS)
def test_every_container_command_is_a_valid_tandem_command(chart, values):
    for obj in workloads(render(chart, values)):
        spec = pod_spec(obj)
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == "redis":
                continue
            settings = parse_cli(container["args"])
            assert settings is not None, container["args"]


def test_pods_are_wired_to_each_other(chart):
    objects = render(chart)
    router = parse_cli(pod_spec(one(objects, "Deployment", "router"))["containers"][0]["args"])
    assert router.discovery == "kubernetes" and router.namespace == NAMESPACE
    assert (router.prefill_service, router.decode_service) == ("tandem-prefill", "tandem-decode")
    assert router.kvstore == "tandem-kvstore:50060"
    prefill = parse_cli(pod_spec(one(objects, "Deployment", "prefill"))["containers"][0]["args"])
    decode = parse_cli(pod_spec(one(objects, "Deployment", "decode"))["containers"][0]["args"])
    kvstore = parse_cli(pod_spec(one(objects, "Deployment", "kvstore"))["containers"][0]["args"])
    assert prefill.kvstore == router.kvstore and prefill.device == decode.device == "cuda"
    assert (
        prefill.advertise_address == "10.0.0.7:50051"
        and decode.advertise_address == "10.0.0.7:50052"
    )
    assert prefill.block_size == decode.block_size == kvstore.block_size
    assert kvstore.redis_url == "redis://tandem-redis:6379/0" and kvstore.key_prefix == "tandem"
    # The Services' named ports are what discovery and probes use.
    for role, port in (("prefill", 50051), ("decode", 50052)):
        service = one(objects, "Service", role)
        assert service["spec"]["clusterIP"] == "None"  # headless: pods are addressed one by one
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == port
    dns = parse_cli(
        pod_spec(one(render(chart, {"router": {"discovery": "dns"}}), "Deployment", "router"))[
            "containers"
        ][0]["args"]
    )
    assert dns.decode_service == f"tandem-decode.{NAMESPACE}.svc" and dns.decode_port == 50052


# -- GPUs, probes, security ----------------------------------------------------------------------


def container_of(objects, role: str) -> dict:
    return pod_spec(one(objects, "Deployment", role))["containers"][0]


def test_gpus_are_requested_by_prefill_and_decode_only_with_requests_equal_to_limits(chart):
    objects = render(chart, {"prefill": {"gpus": 2}})
    for role, count in (("prefill", "2"), ("decode", "1")):
        resources = container_of(objects, role)["resources"]
        assert resources["requests"][GPU] == resources["limits"][GPU] == count
    for obj in workloads(objects):
        if obj["metadata"]["name"] in ("tandem-prefill", "tandem-decode"):
            continue
        for c in pod_spec(obj)["containers"]:
            assert not any("gpu" in k for part in c.get("resources", {}).values() for k in part), (
                obj["metadata"]["name"]
            )
    custom = render(chart, {"global": {"gpuResourceName": "amd.com/gpu"}})
    assert container_of(custom, "decode")["resources"]["limits"]["amd.com/gpu"] == "1"
    assert GPU not in container_of(custom, "decode")["resources"]["limits"]
    with pytest.raises(HelmError, match="set decode.gpus instead"):
        render(chart, {"decode": {"resources": {"limits": {GPU: 1}}}})


TP4 = {"prefill": {"enabled": False}, "decode": {"engine": {"tensorParallelSize": 4}}}


def with_decode(values: dict, **decode) -> dict:
    return {**values, "decode": {**values["decode"], **decode}}


def test_tensor_parallel_decode_pods_get_one_gpu_per_rank(chart):
    objects = render(chart, TP4)
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    decode = container_of(objects, "decode")
    args = decode["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert parse_cli(args).tensor_parallel_size == 4  # the real CLI takes the flag
    assert decode["resources"]["requests"][GPU] == decode["resources"]["limits"][GPU] == "4"
    assert lint(CHART, TP4, strict=True, namespace=NAMESPACE)["errors"] == []
    # Default: one rank, no flag, one GPU (as before tensor parallelism).
    default = container_of(render(chart), "decode")
    assert "--tensor-parallel-size" not in default["args"]
    assert parse_cli(default["args"]).tensor_parallel_size == 1
    assert default["resources"]["requests"][GPU] == default["resources"]["limits"][GPU] == "1"
    prefill = container_of(render(chart), "prefill")
    assert "--tensor-parallel-size" not in prefill["args"]
    assert prefill["resources"]["requests"][GPU] == prefill["resources"]["limits"][GPU] == "1"
    # An explicit count wins when it covers every rank (the extra GPUs idle).
    more = container_of(render(chart, with_decode(TP4, gpus=8)), "decode")["resources"]
    assert more["requests"][GPU] == more["limits"][GPU] == "8"
    one_rank = container_of(render(chart, {"decode": {"gpus": 3}}), "decode")["resources"]
    assert one_rank["requests"][GPU] == "3"
    # 0 keeps meaning CPU pods, whatever the rank count (ranks on gloo).
    cpu = with_decode(TP4, gpus=0, extraArgs=["--device", "cpu"])
    c = container_of(render(chart, cpu), "decode")
    assert not any("gpu" in k for part in c["resources"].values() for k in part)
    assert parse_cli(c["args"]).device == "cpu" and parse_cli(c["args"]).tensor_parallel_size == 4


def test_tensor_parallel_prefill_pods_get_one_gpu_per_rank(chart):
    """A tensor-parallel prefill pod pushes its KV over gRPC, to decode pods of any rank count."""
    values = {"prefill": {"engine": {"tensorParallelSize": 2}}}
    assert lint(CHART, values, strict=True, namespace=NAMESPACE)["errors"] == []
    objects = render(chart, values)
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    prefill = container_of(objects, "prefill")
    args = prefill["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert parse_cli(args).tensor_parallel_size == 2  # the real CLI takes the flag
    assert prefill["resources"]["requests"][GPU] == prefill["resources"]["limits"][GPU] == "2"
    decode = container_of(objects, "decode")
    assert "--tensor-parallel-size" not in decode["args"]
    assert decode["resources"]["limits"][GPU] == "1"
    more = container_of(render(chart, {"prefill": {**values["prefill"], "gpus": 4}}), "prefill")
    assert more["resources"]["requests"][GPU] == more["resources"]["limits"][GPU] == "4"
    # 0: CPU pods, as for decode.
    cpu = {"prefill": {**values["prefill"], "gpus": 0, "extraArgs": ["--device", "cpu"]}}
    c = container_of(render(chart, cpu), "prefill")
    assert not any("gpu" in k for part in c["resources"].values() for k in part)
    assert parse_cli(c["args"]).device == "cpu" and parse_cli(c["args"]).tensor_parallel_size == 2


def test_tensor_parallel_decode_pods_on_cpus_take_pushed_kv(chart):
    cpu = {"gpus": 0, "extraArgs": ["--device", "cpu"]}
    values = {
        "prefill": {**cpu, "engine": {"tensorParallelSize": 2}},
        "decode": {**cpu, "engine": {"tensorParallelSize": 4}},
    }
    assert lint(CHART, values, strict=True, namespace=NAMESPACE)["errors"] == []
    objects = render(chart, values)
    for role, tp in (("prefill", 2), ("decode", 4)):
        settings = parse_cli(container_of(objects, role)["args"])
        assert settings.device == "cpu" and settings.tensor_parallel_size == tp
    # One rank on each side, or the decode side alone, is fine too.
    render(chart, {"prefill": cpu, "decode": {**cpu, "engine": {"tensorParallelSize": 2}}})
    render(chart, {"decode": {**cpu, "engine": {"tensorParallelSize": 2}}})


def test_tensor_parallel_values_that_cannot_run_are_refused(chart):
    with pytest.raises(
        HelmError,
        match=r"decode.gpus \(2\) is fewer than decode.engine.tensorParallelSize \(4\)",
    ):
        render(chart, with_decode(TP4, gpus=2))
    with pytest.raises(
        HelmError,
        match=r"prefill.gpus \(1\) is fewer than prefill.engine.tensorParallelSize \(2\)",
    ):
        render(chart, {"prefill": {"gpus": 1, "engine": {"tensorParallelSize": 2}}})
    # No prefill pods: their values do not matter.
    render(chart, {"prefill": {"enabled": False, "gpus": 1, "engine": {"tensorParallelSize": 2}}})
    # A tensor-parallel decode pod on GPUs beside prefill pods: pushed KV splits between ranks.
    decode = container_of(
        render(chart, {"decode": {"engine": {"tensorParallelSize": 4}}}), "decode"
    )
    assert decode["args"][decode["args"].index("--tensor-parallel-size") + 1] == "4"
    render(chart, {"prefill": {"engine": {"tensorParallelSize": 1}}})  # one rank: fine


@pytest.mark.parametrize("mode", ["shm", "cuda-ipc", "nixl"])
def test_memory_kv_transports_are_refused_with_tensor_parallel_pods(chart, mode):
    kvt = {"mode": mode, "hostIPC": True, "shareDevShm": True}
    cpu = {"gpus": 0, "extraArgs": ["--device", "cpu"]}
    with pytest.raises(
        HelmError, match=f"kvTransport.mode {mode} with prefill.engine.tensorParallelSize 2"
    ):
        render(chart, {"kvTransport": kvt, "prefill": {"engine": {"tensorParallelSize": 2}}})
    with pytest.raises(
        HelmError, match=f"kvTransport.mode {mode} with decode.engine.tensorParallelSize 2"
    ):
        render(chart, {"kvTransport": kvt, "decode": {**cpu, "engine": {"tensorParallelSize": 2}}})
    render(chart, {"kvTransport": kvt})  # one rank each: fine
    # No prefill pods, no transfers.
    render(chart, {"kvTransport": kvt, **with_decode(TP4)})


@pytest.mark.parametrize("mode", ["auto", "grpc"])
def test_grpc_capable_kv_transports_work_with_tensor_parallel_pods(chart, mode):
    values = {"kvTransport": {"mode": mode}, "prefill": {"engine": {"tensorParallelSize": 2}}}
    prefill = container_of(render(chart, values), "prefill")
    assert parse_cli(prefill["args"]).tensor_parallel_size == 2
    assert kv_env(render(chart, values), "prefill")["TANDEM_PREFILL_KV_TRANSPORT"] == mode


def test_probes(chart):
    objects = render(chart)
    for role in ("prefill", "decode", "kvstore"):
        c = container_of(objects, role)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == next(
                p["containerPort"] for p in c["ports"] if p["name"] == "grpc"
            )
    for role in ("prefill", "decode"):  # model load: at least 10 minutes before the pod is killed
        startup = container_of(objects, role)["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 600
    router = container_of(objects, "router")
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "startupProbe" in router and "livenessProbe" in router


def test_shutdown_drains_within_the_termination_grace(chart):
    objects = render(chart)
    for role in ("router", "prefill", "decode"):
        spec = pod_spec(one(objects, "Deployment", role))
        container = spec["containers"][0]
        assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
        settings = parse_cli(container["args"])
        drains = settings.shutdown_grace_s * (
            2 if role == "router" else 1
        )  # router: HTTP, then gRPC
        assert spec["terminationGracePeriodSeconds"] >= 5 + drains + 5


def test_every_pod_runs_restricted(chart):
    values = {
        "model": {"source": {"type": "init", "init": {"uri": "https://example.com/m.tar.gz"}}}
    }
    for obj in workloads(render(chart, values)):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        containers = spec.get("initContainers", []) + spec["containers"]
        for c in containers:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            # A read-only root needs writable emptyDirs where the process writes.
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            writable = "/data" if c["name"] == "redis" else "/tmp"
            volume = next(v for v in spec["volumes"] if v["name"] == mounts[writable])
            assert "emptyDir" in volume or obj["kind"] == "StatefulSet"
        if obj["metadata"]["name"] in ("tandem-prefill", "tandem-decode"):
            shm = next(v for v in spec["volumes"] if v["name"] == "shm")
            assert shm["emptyDir"]["medium"] == "Memory"
            assert {"name": "shm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
            assert spec["initContainers"][0]["args"][:2] == ["model-fetch", "--uri"]


def test_the_image_user_matches_the_pods_user(chart):
    dockerfile = (CHART.parents[1] / "docker/Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).group(1))
    assert (
        pod_spec(one(render(chart), "Deployment", "router"))["securityContext"]["runAsUser"] == uid
    )


# -- Discovery RBAC ------------------------------------------------------------------------------


def test_discovery_rbac_is_limited_to_endpointslices(chart):
    objects = render(chart)
    role = one(objects, "Role", "discovery")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = one(objects, "RoleBinding", "discovery")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tandem", "namespace": NAMESPACE}
    ]
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    [account] = find(objects, "ServiceAccount")
    assert (
        account["metadata"]["name"] == "tandem" and account["automountServiceAccountToken"] is False
    )
    for obj in workloads(objects):  # only the router and prefill pods get an API token
        assert pod_spec(obj)["automountServiceAccountToken"] is (
            obj["metadata"]["name"] in ("tandem-router", "tandem-prefill")
        )
    dns = render(chart, {"router": {"discovery": "dns"}})
    assert not find(dns, "Role")
    for obj in workloads(dns):
        assert pod_spec(obj)["automountServiceAccountToken"] is False


def test_prefill_pods_discover_the_decode_pods_they_may_push_kv_to(chart):
    """Least authority: a prefill pod accepts only decode targets its discovery lists, so it must
    find the decode pods exactly as the router does (the router names them by that address)."""
    for discovery in ("kubernetes", "dns"):
        objects = render(chart, {"router": {"discovery": discovery}})
        router = parse_cli(container_of(objects, "router")["args"])
        prefill = parse_cli(container_of(objects, "prefill")["args"])
        assert prefill.discovery == router.discovery == discovery
        assert prefill.decode_service == router.decode_service
        assert prefill.decode == [] and prefill.decode_port == router.decode_port == 50052
        if discovery == "kubernetes":
            assert prefill.namespace == router.namespace == NAMESPACE
        # Built from the same settings, both look up the same decode Service.
        assert prefill.make_discovery().services == {"decode": router.decode_service}


# -- NetworkPolicy -------------------------------------------------------------------------------


def allowed_sources(objects, target: str, port: str) -> list:
    policy = one(objects, "NetworkPolicy", target)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == target
    peers = []
    for rule in policy["spec"]["ingress"]:
        if any(p["port"] == port for p in rule["ports"]):
            for peer in rule.get("from", [{"anyone": True}]):
                if "podSelector" in peer:
                    peers.append(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
                elif "namespaceSelector" in peer:
                    peers.append(
                        ("namespace", json.dumps(peer["namespaceSelector"], sort_keys=True))
                    )
                else:
                    peers.append("anyone")
    return peers


def test_network_policy_rules(chart):
    objects = render(chart)
    monitoring = (
        "namespace",
        json.dumps({"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, sort_keys=True),
    )
    assert allowed_sources(objects, "router", "http") == ["anyone"]
    assert allowed_sources(objects, "prefill", "grpc") == ["router"]
    assert allowed_sources(objects, "decode", "grpc") == ["router", "prefill"]
    assert allowed_sources(objects, "kvstore", "grpc") == ["router", "prefill"]
    assert allowed_sources(objects, "redis", "redis") == ["kvstore"]
    for role in ("prefill", "decode", "kvstore"):
        assert allowed_sources(objects, role, "metrics") == [monitoring]
    clients = [{"namespaceSelector": {"matchLabels": {"team": "chat"}}}]
    restricted = render(chart, {"networkPolicy": {"clients": clients}})
    assert allowed_sources(restricted, "router", "http") == [
        ("namespace", json.dumps({"matchLabels": {"team": "chat"}}, sort_keys=True)),
        monitoring,
    ]
    colocated = render(chart, {"prefill": {"enabled": False}})
    assert allowed_sources(colocated, "decode", "grpc") == ["router"]
    assert not find(colocated, "NetworkPolicy", "kvstore") and not find(
        colocated, "NetworkPolicy", "redis"
    )
    assert not find(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


# -- PDB, autoscaling ----------------------------------------------------------------------------


def test_pod_disruption_budgets(chart):
    objects = render(chart)
    assert one(objects, "PodDisruptionBudget", "router")["spec"]["minAvailable"] == 1
    assert one(objects, "PodDisruptionBudget", "decode")["spec"]["maxUnavailable"] == 1
    assert not find(objects, "PodDisruptionBudget", "kvstore")  # off by default
    off = render(
        chart,
        {
            "decode": {"podDisruptionBudget": {"enabled": False}},
            "kvstore": {"podDisruptionBudget": {"enabled": True}},
        },
    )
    assert not find(off, "PodDisruptionBudget", "decode") and find(
        off, "PodDisruptionBudget", "kvstore"
    )
    pdb = one(objects, "PodDisruptionBudget", "prefill")
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == one(objects, "Deployment", "prefill")["spec"]["selector"]["matchLabels"]
    )


def test_autoscaling_toggles(chart):
    objects = render(chart)
    assert not find(objects, "HorizontalPodAutoscaler") and not find(objects, "ScaledObject")
    assert one(objects, "Deployment", "router")["spec"]["replicas"] == 2
    on = {"enabled": True}
    scaled = render(
        chart,
        {
            "router": {"autoscaling": on},
            "kvstore": {"autoscaling": on},
            "prefill": {"autoscaling": on},
            "decode": {"autoscaling": {"enabled": True, "type": "hpa"}},
        },
    )
    for role in ("router", "kvstore"):
        hpa = one(scaled, "HorizontalPodAutoscaler", role)
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"tandem-{role}"
        assert "replicas" not in one(scaled, "Deployment", role)["spec"]
    keda = one(scaled, "ScaledObject", "prefill")
    assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["spec"]["scaleTargetRef"] == {
        "name": "tandem-prefill"
    }
    behavior = keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    trigger = keda["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "8"
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",pod=~"tandem-prefill-.*",role="prefill"}})'
    )
    hpa = one(scaled, "HorizontalPodAutoscaler", "decode")
    assert hpa["spec"]["metrics"][0]["type"] == "Pods"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert not find(scaled, "ScaledObject", "decode")


# -- Redis, kvstore, model source ----------------------------------------------------------------


def test_redis_bundled_or_external(chart):
    bundled = render(chart)
    redis = one(bundled, "StatefulSet", "redis")
    assert "volumeClaimTemplates" not in redis["spec"]  # persistence is off by default
    assert "--maxmemory-policy" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert one(bundled, "Service", "redis")["spec"]["ports"][0]["port"] == 6379
    persistent = one(
        render(chart, {"redis": {"persistence": {"enabled": True, "size": "20Gi"}}}),
        "StatefulSet",
        "redis",
    )
    assert (
        persistent["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        == "20Gi"
    )

    external = render(chart, {"redis": {"external": {"url": "redis://redis.infra:6379/2"}}})
    assert not find(external, "StatefulSet") and not find(external, "Service", "redis")
    assert not find(external, "NetworkPolicy", "redis")
    assert (
        parse_cli(container_of(external, "kvstore")["args"]).redis_url
        == "redis://redis.infra:6379/2"
    )

    secret = render(chart, {"redis": {"external": {"urlSecret": {"name": "creds"}}}})
    kvstore = container_of(secret, "kvstore")
    assert "--redis-url" not in kvstore["args"] and not find(secret, "StatefulSet")
    env = {e["name"]: e for e in kvstore["env"]}
    assert env["TANDEM_KVSTORE_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "creds", "key": "url"}
    }

    with pytest.raises(HelmError, match="kvstore needs a Redis"):
        render(chart, {"redis": {"enabled": False}})
    no_kvstore = render(chart, {"kvstore": {"enabled": False}})
    assert not find(no_kvstore, "Deployment", "kvstore") and not find(no_kvstore, "StatefulSet")
    assert "--kvstore" not in container_of(no_kvstore, "router")["args"]
    assert "--kvstore" not in container_of(no_kvstore, "prefill")["args"]


def model_volume(objects, role: str) -> dict:
    return next(
        v for v in pod_spec(one(objects, "Deployment", role))["volumes"] if v["name"] == "model"
    )


def test_model_sources(chart):
    pvc = render(
        chart, {"model": {"source": {"pvc": {"claimName": "weights", "subPath": "llama"}}}}
    )
    assert model_volume(pvc, "decode")["persistentVolumeClaim"] == {
        "claimName": "weights",
        "readOnly": True,
    }
    mount = next(m for m in container_of(pvc, "decode")["volumeMounts"] if m["name"] == "model")
    assert mount == {
        "name": "model",
        "mountPath": "/models/model",
        "readOnly": True,
        "subPath": "llama",
    }
    host = render(
        chart, {"model": {"source": {"type": "hostPath", "hostPath": {"path": "/mnt/m"}}}}
    )
    assert model_volume(host, "prefill")["hostPath"] == {"path": "/mnt/m", "type": "Directory"}
    digest = "ab" * 32
    init = render(
        chart,
        {
            "model": {
                "name": "m1",
                "source": {"type": "init", "init": {"uri": "https://x/m.tar.gz", "sha256": digest}},
            }
        },
    )
    for role in ("router", "prefill", "decode"):
        assert "emptyDir" in model_volume(init, role)
        fetch = parse_cli(pod_spec(one(init, "Deployment", role))["initContainers"][0]["args"])
        assert (fetch.uri, str(fetch.dest), fetch.sha256) == (
            "https://x/m.tar.gz",
            "/models/model",
            digest,
        )
        assert fetch.metadata_only is (
            role == "router"
        )  # the router reads only config and tokenizer
        assert parse_cli(container_of(init, role)["args"]).served_model_name == "m1"
    with pytest.raises(HelmError, match=r"model.source.init.uri \(or uriSecret.name\) is required"):
        render(chart, {"model": {"source": {"type": "init"}}})
    secret = render(
        chart, {"model": {"source": {"type": "init", "init": {"uriSecret": {"name": "presigned"}}}}}
    )
    fetch = pod_spec(one(secret, "Deployment", "decode"))["initContainers"][0]
    assert "--uri" not in fetch["args"]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["TANDEM_MODEL_FETCH_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "presigned", "key": "uri"}
    }
    with pytest.raises(HelmError, match="claimName is required"):
        render(chart, {"model": {"source": {"pvc": {"claimName": ""}}}})


def test_observability_toggles(chart):
    objects = render(chart)
    assert (
        not find(objects, "ServiceMonitor")
        and not find(objects, "PodMonitor")
        and not find(objects, "ConfigMap")
    )
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in {
        e["name"] for e in container_of(objects, "router")["env"]
    }
    on = render(
        chart,
        {
            "observability": {
                "otlpEndpoint": "http://collector:4317",
                "serviceMonitor": {"enabled": True},
                "podMonitor": {"enabled": True},
                "grafanaDashboards": {"enabled": True},
                "tracesSampler": "parentbased_traceidratio",
                "tracesSamplerArg": "0.25",
            }
        },
    )
    for role in ("router", "prefill", "decode", "kvstore"):
        env = {e["name"]: e.get("value") for e in container_of(on, role)["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
        assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == (
            "parentbased_traceidratio",
            "0.25",
        )
    with pytest.raises(Exception, match="tracesSampler"):
        render(
            chart,
            {
                "observability": {
                    "otlpEndpoint": "http://collector:4317",
                    "tracesSampler": "sometimes",
                }
            },
        )
    monitor = one(on, "ServiceMonitor", "router")
    assert (
        monitor["spec"]["endpoints"][0]["port"] == "http"
        and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    )
    pods = one(on, "PodMonitor", "pods")
    assert pods["spec"]["selector"]["matchExpressions"][0]["values"] == [
        "prefill",
        "decode",
        "kvstore",
    ]
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboards = one(on, "ConfigMap", "dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"


# -- Values: schema, cross-checks, documentation -------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"prefill": {"engine": {"dtype": "int4"}}}, "/prefill/engine/dtype"),
        ({"decode": {"replicaCount": 0}}, "/decode/replicaCount"),
        ({"router": {"discovery": "consul"}}, "/router/discovery"),
        ({"router": {"replicas": 3}}, "replicas"),  # a typo of replicaCount is not silently ignored
        ({"prefill": {"kv": {"chunkBytes": 1024}}}, "/prefill/kv/chunkBytes"),
        (
            {"decode": {"engine": {"gpuMemoryUtilization": 1.5}}},
            "/decode/engine/gpuMemoryUtilization",
        ),
        ({"router": {"podDisruptionBudget": {"maxUnavailable": 1}}}, "/router/podDisruptionBudget"),
        ({"model": {"source": {"type": "s3"}}}, "/model/source/type"),
        ({"redis": {"external": {"url": "localhost:6379"}}}, "/redis/external/url"),
        ({"model": {"source": {"init": {"sha256": "abc"}}}}, "/model/source/init/sha256"),
        ({"prefill": {"autoscaling": {"minReplicas": 0}}}, "/prefill/autoscaling/minReplicas"),
        ({"kvTransport": {"mode": "rdma"}}, "/kvTransport/mode"),
        ({"kvTransport": {"hostIpc": True}}, "hostIpc"),
        (
            {"kvTransport": {"rdma": {"resources": {"rdma/hca": "one"}}}},
            "/kvTransport/rdma/resources",
        ),
        ({"decode": {"kvLeaseSeconds": 0}}, "/decode/kvLeaseSeconds"),
        ({"decode": {"kvWriteLeaseSeconds": 0.5}}, "/decode/kvWriteLeaseSeconds"),
        ({"prefill": {"kv": {"checksum": "yes"}}}, "/prefill/kv/checksum"),
        ({"decode": {"engine": {"tensorParallelSize": 0}}}, "/decode/engine/tensorParallelSize"),
        ({"decode": {"engine": {"tensorParallelSize": 1.5}}}, "/decode/engine/tensorParallelSize"),
        ({"decode": {"gpus": -1}}, "/decode/gpus"),
        ({"decode": {"gpus": "two"}}, "/decode/gpus"),
        ({"prefill": {"gpus": -1}}, "/prefill/gpus"),
        ({"prefill": {"engine": {"tensorParallelSize": 0}}}, "/prefill/engine/tensorParallelSize"),
    ],
)
def test_values_schema_rejects_bad_values(chart, values, message):
    with pytest.raises(HelmError, match="values don't meet the specifications") as e:
        render(chart, values)
    assert message in str(e.value)
    assert lint(CHART, values, strict=True)["errors"]


# -- KV transport ------------------------------------------------------------------------------


def kv_env(objects, role: str) -> dict[str, str]:
    return {
        e["name"]: e["value"]
        for e in container_of(objects, role)["env"]
        if e["name"].startswith(f"TANDEM_{role.upper()}_KV_")
    }


def test_kv_transport_defaults_are_safe(chart):
    """auto, nothing shared with the node: pods on different nodes (or without hostIPC) use gRPC."""
    objects = render(chart)
    assert kv_env(objects, "prefill") == {
        "TANDEM_PREFILL_KV_TRANSPORT": "auto",
        "TANDEM_PREFILL_KV_TRANSPORT_STRICT": "false",
        "TANDEM_PREFILL_KV_CHECKSUM": "false",
    }
    assert kv_env(objects, "decode") == {
        "TANDEM_DECODE_KV_TRANSPORT": "auto",
        "TANDEM_DECODE_KV_TRANSPORT_STRICT": "false",
        "TANDEM_DECODE_KV_LEASE_S": "150",
        "TANDEM_DECODE_KV_WRITE_LEASE_S": "10",
    }
    for obj in workloads(objects):
        spec = pod_spec(obj)
        assert "hostIPC" not in spec and not any("hostPath" in v for v in spec["volumes"])
        for c in spec["containers"]:
            assert "add" not in c["securityContext"]["capabilities"]
            assert not any("rdma" in k for part in c.get("resources", {}).values() for k in part)


def test_kv_transport_same_node_shares_ipc_and_dev_shm(chart):
    objects = render(chart, KV_SAME_NODE)
    for role in ("prefill", "decode"):
        spec = pod_spec(one(objects, "Deployment", role))
        assert spec["hostIPC"] is True
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm == {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}
        assert {"name": "shm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
        assert "add" not in spec["containers"][0]["securityContext"]["capabilities"]
    assert kv_env(objects, "prefill") == {
        "TANDEM_PREFILL_KV_TRANSPORT": "cuda-ipc",
        "TANDEM_PREFILL_KV_TRANSPORT_STRICT": "true",
        "TANDEM_PREFILL_KV_CHECKSUM": "true",
    }
    assert kv_env(objects, "decode") == {
        "TANDEM_DECODE_KV_TRANSPORT": "cuda-ipc",
        "TANDEM_DECODE_KV_TRANSPORT_STRICT": "true",
        "TANDEM_DECODE_KV_LEASE_S": "30.5",
        "TANDEM_DECODE_KV_WRITE_LEASE_S": "2.5",
    }
    for role in ("router", "kvstore"):  # only the pods that move KV pages share the node's IPC
        assert "hostIPC" not in pod_spec(one(objects, "Deployment", role))
    assert "hostIPC" not in pod_spec(one(objects, "StatefulSet", "redis"))


def test_kv_transport_rdma_resources_and_ipc_lock(chart):
    objects = render(chart, KV_RDMA)
    for role in ("prefill", "decode"):
        c = container_of(objects, role)
        assert c["resources"]["requests"]["rdma/hca"] == c["resources"]["limits"]["rdma/hca"] == "1"
        assert c["resources"]["requests"][GPU] == c["resources"]["limits"][GPU] == "1"
        assert c["resources"]["requests"]["cpu"] == "4"  # the role's own resources stay
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert kv_env(objects, role)[f"TANDEM_{role.upper()}_KV_TRANSPORT"] == "nixl"
        assert "hostIPC" not in pod_spec(one(objects, "Deployment", role))
    for role in ("router", "kvstore"):
        c = container_of(objects, role)
        assert "add" not in c["securityContext"]["capabilities"]
        assert not any("rdma" in k for part in c["resources"].values() for k in part)
    with pytest.raises(HelmError, match="kvTransport.rdma.resources must not name nvidia.com/gpu"):
        render(chart, {"kvTransport": {"rdma": {"resources": {GPU: 1}}}})


def test_kv_transport_memory_modes_need_the_node_shared(chart):
    for mode in ("shm", "cuda-ipc"):
        for shared in ({}, {"hostIPC": True}, {"shareDevShm": True}):
            with pytest.raises(
                HelmError, match=f"kvTransport.mode {mode} needs kvTransport.hostIPC"
            ):
                render(chart, {"kvTransport": {"mode": mode, **shared}})
    render(chart, {"kvTransport": {"mode": "shm", "hostIPC": True, "shareDevShm": True}})
    render(chart, {"kvTransport": {"mode": "grpc", "strict": True}})
    render(chart, {"prefill": {"enabled": False}, "kvTransport": {"mode": "shm"}})  # no transfers


def test_kv_transport_shapes_in_the_kubernetes_guide(chart):
    """docs/kubernetes.md's same-node shapes: CPU-only pods on shm, prefill pods next to decode."""
    cpu = {"gpus": 0, "extraArgs": ["--device", "cpu"]}
    shapes = [
        {
            "kvTransport": {"mode": "shm", "hostIPC": True, "shareDevShm": True},
            "prefill": cpu,
            "decode": cpu,
        },
        {
            "kvTransport": {"hostIPC": True, "shareDevShm": True},
            "prefill": {
                "affinity": {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "labelSelector": {
                                    "matchLabels": {
                                        "app.kubernetes.io/instance": RELEASE,
                                        "app.kubernetes.io/component": "decode",
                                    }
                                },
                                "topologyKey": "kubernetes.io/hostname",
                            }
                        ]
                    }
                }
            },
        },
    ]
    for values in shapes:
        assert lint(CHART, values, strict=True, namespace=NAMESPACE)["errors"] == []
        objects = render(chart, values)
        for obj in objects:
            if obj["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    cpu_only, next_to_decode = (render(chart, v) for v in shapes)
    for role in ("prefill", "decode"):
        c = container_of(cpu_only, role)
        assert parse_cli(c["args"]).device == "cpu"  # the later flag wins
        assert not any("gpu" in k for part in c["resources"].values() for k in part)
    affinity = pod_spec(one(next_to_decode, "Deployment", "prefill"))["affinity"]["podAffinity"]
    [term] = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    decode_labels = one(next_to_decode, "Deployment", "decode")["spec"]["template"]["metadata"]
    assert term["labelSelector"]["matchLabels"].items() <= decode_labels["labels"].items()


def test_kv_transport_settings_reach_the_tandem_cli(chart, monkeypatch):
    """The pods read the variables as ``tandem`` does, and every TANDEM_<ROLE>_* variable the
    chart sets is a setting of that role (a misspelt one would be silently ignored)."""
    from services.decode.settings import DecodeSettings
    from services.prefill.settings import PrefillSettings

    classes = {"prefill": PrefillSettings, "decode": DecodeSettings}
    if "kv_transport" not in PrefillSettings.model_fields:  # from then on, every name must match
        pytest.skip("the KV transport settings are not in services/prefill/settings.py yet")
    objects = render(chart, KV_SAME_NODE)
    parsed = {}
    for role, cls in classes.items():
        container = container_of(objects, role)
        prefix = f"TANDEM_{role.upper()}_"
        with monkeypatch.context() as env:
            for e in container["env"]:
                if e["name"].startswith(prefix):
                    assert e["name"][len(prefix) :].lower() in cls.model_fields, e["name"]
                    if "value" in e:
                        env.setenv(e["name"], e["value"])
            parsed[role] = parse_cli(container["args"])

    def plain(v):
        return getattr(v, "value", v)

    for role in ("prefill", "decode"):
        assert plain(parsed[role].kv_transport) == "cuda-ipc"
        assert parsed[role].kv_transport_strict is True
    assert parsed["prefill"].kv_checksum is True and parsed["decode"].kv_lease_s == 30.5
    assert parsed["decode"].kv_write_lease_s == 2.5


def test_notes_warn_when_memory_transports_run_without_network_policy(chart):
    def notes(values):
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return next(text for path, text in out.items() if path.endswith("NOTES.txt"))

    assert "KV transport: auto." in notes({}) and "DescribeKV" not in notes({})
    assert "WARNING: networkPolicy.enabled is false" in notes({"networkPolicy": {"enabled": False}})
    assert "DescribeKV" not in notes(
        {"networkPolicy": {"enabled": False}, "kvTransport": {"mode": "grpc"}}
    )
    assert "KV transport" not in notes({"prefill": {"enabled": False}})


def test_values_that_must_agree_are_checked(chart):
    with pytest.raises(
        HelmError, match="prefill.engine.blockSize and decode.engine.blockSize must be equal"
    ):
        render(chart, {"decode": {"engine": {"blockSize": 32}}})
    with pytest.raises(HelmError, match="dtype must be equal"):
        render(chart, {"decode": {"engine": {"dtype": "float16"}}})
    with pytest.raises(HelmError, match="kvLeaseSeconds .90. must exceed decode.kvTimeoutSeconds"):
        render(chart, {"decode": {"kvLeaseSeconds": 90}})  # the default wait is 120 s
    with pytest.raises(
        HelmError, match="kvWriteLeaseSeconds .200. must not exceed decode.kvLeaseSeconds .150."
    ):
        render(chart, {"decode": {"kvWriteLeaseSeconds": 200}})
    render(
        chart, {"prefill": {"enabled": False}, "decode": {"engine": {"blockSize": 32}}}
    )  # no prefill: no constraint


def leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and not path.endswith(("Selector", "labels", "annotations", "resources"))
        ):
            paths += leaf_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def test_every_value_is_documented_in_the_chart_readme():
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in leaf_paths(defaults) if p not in documented]
    assert missing == []
    stale = [p for p in documented if p not in leaf_paths(defaults)]
    assert stale == []


def test_every_default_has_a_schema_entry():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node):
        return schema["$defs"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    def walk(values, node, path):
        node = resolve(node)
        assert node.get("additionalProperties") is False or "properties" not in node, path
        for key, value in values.items():
            props = node.get("properties")
            if props is None:
                continue  # free-form maps (labels, selectors, resources)
            assert key in props, f"{path}{key} has no schema entry"
            if isinstance(value, dict):
                walk(value, props[key], f"{path}{key}.")

    walk(defaults, schema, "")
