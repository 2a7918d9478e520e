"""The protobuf <-> dataclass translator: field lists derived, round trips exact."""

import pytest

from tandem.api import proto_convert
from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import SAMPLING_FIELDS, SamplingParams
from tandem.proto.common.v1 import common_pb2


def test_the_message_carries_exactly_the_dataclass_fields():
    """Adding a sampling field to one and not the other fails here, not in production."""
    names = [f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields]
    assert names == list(SAMPLING_FIELDS)


def test_sampling_params_round_trip_exactly():
    sp = SamplingParams(
        max_tokens=7,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        min_p=0.05,
        seed=-(2**40),
        presence_penalty=0.1,
        frequency_penalty=-0.3,
        repetition_penalty=1.1,
        stop=("a", "bc"),
        stop_token_ids=(3, 4),
        include_stop_str_in_output=True,
        ignore_eos=True,
        min_tokens=2,
        logprobs=3,
        skip_special_tokens=False,
    )
    assert (
        proto_convert.sampling_params_from_proto(proto_convert.sampling_params_to_proto(sp)) == sp
    )
    plain = SamplingParams()
    assert (
        proto_convert.sampling_params_from_proto(proto_convert.sampling_params_to_proto(plain))
        == plain
    )


def test_only_the_fields_a_message_sets_come_back():
    pb = common_pb2.SamplingParams(temperature=0.7, top_k=0, stop=["x"], ignore_eos=False)
    # float32 0.7 comes back as the 0.7 the sender wrote; top_k 0 is set (it means "off").
    assert proto_convert.sampling_fields_from_proto(pb) == {
        "temperature": 0.7,
        "top_k": 0,
        "stop": ("x",),
    }
    assert proto_convert.sampling_fields_from_proto(common_pb2.SamplingParams()) == {}


def test_fields_to_proto_sets_exactly_the_given_fields():
    pb = proto_convert.sampling_fields_to_proto({"top_k": -1, "stop": "end", "seed": None})
    assert pb.HasField("top_k") and pb.top_k == -1
    assert list(pb.stop) == ["end"] and not pb.HasField("seed") and not pb.HasField("temperature")


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"temperatur": 1.0}, "temperatur"),
    ],
)
def test_values_a_message_cannot_carry_are_invalid_requests(fields, param):
    with pytest.raises(InvalidRequest) as e:
        proto_convert.sampling_fields_to_proto(fields)
    assert e.value.param == param
