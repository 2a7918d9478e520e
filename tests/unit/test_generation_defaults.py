"""The model's recommended sampling (generation_config.json) as the default of unset fields,
as vLLM serves with ``--generation-config auto``: in the router's OpenAI API and in ``LLM``."""

import json
import shutil

import pytest

from services.router.jobs import JobBuilder
from services.router.openai_protocol import CompletionRequest
from services.router.settings import RouterSettings
from tandem.api.errors import ModelLoadError
from tandem.engine import LLM, SamplingParams
from tandem.model_dir import generation_defaults
from tandem.tokenizer import Tokenizer


@pytest.fixture
def model_with(llama_dir, tmp_path):
    """A copy of the tiny model whose generation_config.json carries ``fields`` too."""

    def make(**fields):
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(llama_dir, path)
        config = json.loads((path / "generation_config.json").read_text())
        (path / "generation_config.json").write_text(json.dumps({**config, **fields}))
        return path

    return make


def test_the_sampling_fields_are_read_and_the_rest_ignored(model_with):
    path = model_with(
        temperature=0.6,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        do_sample=True,
        max_new_tokens=77,
    )
    assert generation_defaults(path) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    assert generation_defaults(model_with(top_k=0)) == {}  # 0 (or -1) means no top-k
    with pytest.raises(ModelLoadError, match="temperature must be a number"):
        generation_defaults(model_with(temperature="hot"))


def test_without_the_file_there_are_no_defaults(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").unlink()
    assert generation_defaults(tmp_path / "m") == {}


def router_jobs(path) -> JobBuilder:
    """The router's job builder over the model at ``path`` (defaults as ``tandem router``)."""
    return JobBuilder(
        Tokenizer(path),
        model_name="m",
        vocab_size=1024,
        max_model_len=lambda: 512,
        sampling_defaults=RouterSettings(model=path).sampling_defaults(),
    )


def test_the_router_fills_only_what_a_request_leaves_unset(model_with):
    jobs = router_jobs(model_with(temperature=0.6, top_p=0.9, top_k=20))
    plain = jobs.job("r", [1, 2], CompletionRequest(prompt="x", max_tokens=4).sampling_fields())
    assert (plain.params.temperature, plain.params.top_p, plain.params.top_k) == (0.6, 0.9, 20)
    request = CompletionRequest(prompt="x", max_tokens=4, temperature=0, top_k=-1)
    own = jobs.job("r", [1, 2], request.sampling_fields()).params
    # top_k -1: off, whatever the default
    assert (own.temperature, own.top_p, own.top_k) == (0.0, 0.9, None)


def test_generation_config_vllm_ignores_the_file_and_bad_values_fail_the_start(model_with):
    assert (
        RouterSettings(
            model=model_with(temperature=0.6), generation_config="vllm"
        ).sampling_defaults()
        == {}
    )
    with pytest.raises(ModelLoadError, match="generation_config.json.*top_p"):
        RouterSettings(model=model_with(top_p=1.5)).sampling_defaults()


def test_llm_without_sampling_params_uses_the_models_defaults(model_with):
    llm = LLM(model_with(temperature=0.0, repetition_penalty=1.3), num_kv_blocks=64)
    assert llm.get_default_sampling_params() == SamplingParams(
        temperature=0.0, repetition_penalty=1.3
    )
    prompt = list(range(3, 20))
    out = llm.generate([prompt])[0].outputs[0].token_ids
    assert (
        out
        == llm.generate([prompt], SamplingParams(temperature=0.0, repetition_penalty=1.3))[0]
        .outputs[0]
        .token_ids
    )


def test_the_sdk_sends_only_the_sampling_fields_it_was_given():
    from tandem.sdk.client import _request

    sent = _request("hi", "", 0, None, None, {"max_tokens": 3, "top_p": 0.5}).sampling_params
    assert (
        sent.HasField("top_p") and not sent.HasField("temperature") and not sent.HasField("top_k")
    )


def test_the_grpc_api_fills_the_same_defaults_as_http(model_with):
    from services.router.grpc_api import RouterServicer
    from services.router.metrics import RouterMetrics
    from tandem.sdk.client import _request

    jobs = router_jobs(model_with(temperature=0.6, top_p=0.9))
    servicer = RouterServicer(jobs, dispatcher=None, metrics=RouterMetrics())
    job = servicer._job(_request("hi", "", 0, None, None, {"max_tokens": 3}))
    assert (job.params.temperature, job.params.top_p) == (0.6, 0.9)
    own = servicer._job(_request("hi", "", 0, None, None, {"max_tokens": 3, "temperature": 0.0}))
    assert (own.params.temperature, own.params.top_p) == (0.0, 0.9)
