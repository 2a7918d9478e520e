"""The Grafana dashboards: generated from scripts/gen_dashboards.py, well-formed, shipped by the
chart.

That every metric they query is exported by the services is checked against live services in
tests/e2e/test_metrics.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from helm_python.chart import Chart

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy/helm/tandem/files/dashboards"


def test_committed_dashboards_are_what_the_generator_writes():
    r = subprocess.run(
        [sys.executable, "scripts/gen_dashboards.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_dashboards_are_well_formed():
    for path in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        cells = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
            area = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not cells & area, f"{path.name}: {p['title']} overlaps another panel"
            cells |= area
            if p["type"] != "row":
                assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p[
                    "title"
                ]
                assert p["datasource"]["uid"] == "${datasource}"
        names = {v["name"] for v in d["templating"]["list"]}
        assert {"datasource", "namespace", "model"} <= names


def test_the_chart_ships_every_dashboard():
    out = Chart.load(ROOT / "deploy/helm/tandem").render(
        {"observability": {"grafanaDashboards": {"enabled": True}}}, name="tandem", namespace="ns"
    )
    [config_map] = [d for d in yaml.safe_load_all(out["tandem/templates/dashboards.yaml"]) if d]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config_map["data"]) == {p.name for p in DASHBOARDS.glob("*.json")}
    for name, text in config_map["data"].items():
        assert json.loads(text) == json.loads((DASHBOARDS / name).read_text())


def test_tempo_datasource_example_is_valid_provisioning():
    doc = yaml.safe_load((ROOT / "deploy/grafana/tempo-datasource.yaml").read_text())
    assert doc["apiVersion"] == 1
    (tempo,) = doc["datasources"]
    assert tempo["type"] == "tempo" and tempo["url"].startswith("http") and tempo["uid"]
    for query in tempo["jsonData"]["tracesToMetrics"]["queries"]:
        assert "vllm:" in query["query"] or "tandem_" in query["query"]
