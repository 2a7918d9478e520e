"""Decode pod settings: the leases on reserved KV blocks must nest (write lease <= lease, lease
> the wait for the pages)."""

import pytest
from pydantic import ValidationError

from services.decode.settings import DecodeSettings


def settings(**kw) -> DecodeSettings:
    return DecodeSettings(model="m", allow_unauthenticated=True, **kw)


def test_the_write_lease_defaults_short_and_within_the_lease():
    s = settings()
    assert s.kv_write_lease_s == 10.0 and s.kv_write_lease_s < s.kv_lease_s
    assert settings(kv_write_lease_s=1.5, kv_timeout_s=1.0, kv_lease_s=2.0).kv_write_lease_s == 1.5
    assert settings(kv_write_lease_s=70, kv_lease_s=70).kv_write_lease_s == 70


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"kv_write_lease_s": 20.0, "kv_timeout_s": 5.0, "kv_lease_s": 10.0}, "must not exceed"),
        ({"kv_write_lease_s": 0.5}, "greater than or equal to 1"),
        ({"kv_write_lease_s": 0}, "greater than or equal to 1"),
        ({"kv_lease_s": 30.0, "kv_timeout_s": 30.0}, "must exceed kv_timeout_s"),
    ],
)
def test_bad_leases_are_refused(kw, message):
    with pytest.raises(ValidationError, match=message):
        settings(**kw)


def test_the_write_lease_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_DECODE_KV_WRITE_LEASE_S", "2.5")
    assert settings().kv_write_lease_s == 2.5
