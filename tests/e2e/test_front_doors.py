"""The router's two front doors agree: the same request over the OpenAI HTTP API and over gRPC
(RouterService, sent raw, not through the SDK's own checks) is accepted by both, with the same
text, or refused by both naming the same field (HTTP 400 / INVALID_ARGUMENT or OUT_OF_RANGE)."""

import grpc
import httpx
import pytest

from tandem.api.grpc_status import PARAM_KEY
from tandem.model_dir import load_model_config
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

from .conftest import start_cluster

pytestmark = pytest.mark.integration

PROMPT = "the prefill pod computes"
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def doors(e2e_model):
    cluster = start_cluster(e2e_model, prefill=1, decode=1)
    with grpc.insecure_channel(cluster.router_grpc) as channel:
        yield cluster, router_pb2_grpc.RouterServiceStub(channel)
    cluster.stop()


def vocab(model) -> int:
    return load_model_config(model).vocab_size


# (request fields, expected: None for accepted, else the field the refusal names). Accepted rows
# are seeded, so both doors must produce the same text.
def cases(vocab_size: int):
    ok = [
        {},
        {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1},
        {"top_k": 0},
        {"top_k": -1},
        {"stop": ["zz"], "stop_token_ids": [vocab_size - 1], "include_stop_str_in_output": True},
        {"presence_penalty": 1.0, "frequency_penalty": -1.0, "repetition_penalty": 1.2},
        {"ignore_eos": True, "min_tokens": 2},
        {"logprobs": 2},
        {"skip_special_tokens": False},
    ]
    bad = [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": MAX_TOKENS + 1}, "min_tokens"),
        ({"stop_token_ids": [vocab_size]}, "stop_token_ids"),
        ({"stop_token_ids": [vocab_size + 1000]}, "stop_token_ids"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
    ]
    return [({"seed": 7, **fields}, None) for fields in ok] + bad


def over_http(url: str, fields: dict):
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, **fields}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    if r.status_code == 200:
        return "accepted", r.json()["choices"][0]["text"]
    assert r.status_code == 400, r.text
    return "refused", r.json()["error"]["param"]


def over_grpc(stub, fields: dict):
    sampling = common_pb2.SamplingParams(**{"max_tokens": MAX_TOKENS, **fields})
    request = router_pb2.GenerateRequest(text=PROMPT, sampling_params=sampling)
    try:
        text = "".join(r.chunk.text for r in stub.Generate(request, timeout=60))
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE), e
        params = [v for k, v in e.trailing_metadata() or () if k == PARAM_KEY]
        return "refused", params[0] if params else None
    return "accepted", text


def test_http_and_grpc_accept_and_refuse_alike(doors, e2e_model):
    cluster, stub = doors
    for fields, refused_param in cases(vocab(e2e_model)):
        http = over_http(cluster.router_url, fields)
        rpc = over_grpc(stub, fields)
        assert http == rpc, fields
        if refused_param is None:
            assert http[0] == "accepted", fields
        else:
            assert http == ("refused", refused_param), fields
