"""The tandem CLI: model-gen writes a loadable directory; bad flags fail with a message."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # each test runs the CLI in a new process


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_model_gen_and_generate(tmp_path):
    out = tmp_path / "q3"
    r = run_cli(
        "model-gen", "--arch", "qwen3", "--out", str(out), "--layers", "1", "--vocab", "400"
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] <= 400
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors",
    ):
        assert (out / name).is_file()
    assert sum(f.stat().st_size for f in out.iterdir()) < 5_000_000
    r = run_cli("generate", "--model", str(out), "--max-tokens", "3", "--prompt", '["hello there"]')
    assert r.returncode == 0, r.stderr
    assert "3 tokens, finish_reason=length" in r.stdout


def test_bad_flag_value_is_reported(tmp_path):
    r = run_cli("model-gen", "--out", str(tmp_path / "x"), "--layers", "0")
    assert r.returncode != 0
    assert "layers" in r.stderr and "greater than 0" in r.stderr


def test_generate_without_model_uses_the_default_tiny_model(tmp_path):
    r = run_cli("generate", "--max-tokens", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "generated tiny random model" in r.stdout
    assert (tmp_path / ".tandem/models/tiny-llama/config.json").is_file()


def test_model_fetch_command(llama_dir, tmp_path):
    r = run_cli("model-fetch", "--uri", f"file://{llama_dir}", "--dest", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    r = run_cli(
        "model-fetch", "--uri", f"file://{tmp_path / 'nowhere'}", "--dest", str(tmp_path / "n")
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("tandem: ")
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
