"""Tracing is configured by the standard OTEL_* variables only, and costs nothing when off."""

import pytest

from tandem import telemetry


@pytest.mark.parametrize(
    "env, on",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                "OTEL_TRACES_EXPORTER": "none",
            },
            False,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_tracing_is_on_only_with_an_otlp_endpoint(env, on):
    assert telemetry.tracing_configured(env) is on


def test_off_by_default_everything_is_a_no_op(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert telemetry.setup_tracing("prefill") is False
    assert not telemetry.tracing_enabled()
    assert telemetry.server_interceptors() == []
    assert telemetry.outgoing_metadata((("k", "v"),)) == (
        ("k", "v"),
    )  # nothing added, nothing lost
    with telemetry.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()
