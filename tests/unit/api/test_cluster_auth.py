"""Where the cluster secret comes from, and the refusal to run without one."""

import pytest

from tandem.api.cluster_auth import (
    METADATA_KEY,
    SECRET_ENV,
    ClusterAuth,
    ClusterAuthOptions,
    ClusterSecretMissing,
    generate_secret,
    resolve,
)


def test_the_file_wins_over_the_environment(tmp_path):
    f = tmp_path / "secret"
    f.write_text("from-the-file-0123456789\n")
    assert resolve(f, False, {SECRET_ENV: "from-the-env-0123456789"}).secret == (
        "from-the-file-0123456789"
    )
    assert resolve(None, False, {SECRET_ENV: "from-the-env-0123456789"}).secret == (
        "from-the-env-0123456789"
    )


def test_no_secret_refuses_to_start_unless_explicitly_allowed(tmp_path):
    with pytest.raises(ClusterSecretMissing, match="--allow-unauthenticated"):
        resolve(None, False, {})
    with pytest.raises(ClusterSecretMissing, match="cannot read"):
        resolve(tmp_path / "absent", True, {})
    with pytest.raises(ClusterSecretMissing, match="shorter"):
        resolve(None, True, {SECRET_ENV: "short"})
    assert resolve(None, True, {}) == ClusterAuth(None)
    assert ClusterAuthOptions(allow_unauthenticated=True).cluster_auth({}).secret is None
    with pytest.raises(ClusterSecretMissing):
        ClusterAuthOptions().cluster_auth({})


def test_check_accepts_only_the_exact_secret():
    auth = ClusterAuth("s" * 20)
    assert auth.check([(METADATA_KEY, "s" * 20)])
    assert auth.check([("other", "x"), (METADATA_KEY, ("s" * 20).encode())])
    assert not auth.check([(METADATA_KEY, "s" * 19)])
    assert not auth.check([(METADATA_KEY, "s" * 21)])
    assert not auth.check([("authorization", "s" * 20)])
    assert not auth.check(None)
    assert ClusterAuth(None).check(None)  # unauthenticated: nothing to check
    assert "s" * 20 not in repr(auth)


def test_generated_secrets_are_long_and_distinct():
    a, b = generate_secret(), generate_secret()
    assert a != b and len(a) >= 32
