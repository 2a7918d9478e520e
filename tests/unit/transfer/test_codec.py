"""The zero-copy PushKV codec is exactly protobuf's encoding, both ways."""

from hypothesis import given
from hypothesis import strategies as st

from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.transfer import codec

headers = st.builds(
    common_pb2.KVChunk,
    request_id=st.text(max_size=40),
    sequence_number=st.integers(0, 2**32 - 1),
    model_fingerprint=st.text(max_size=20),
    layer_start=st.integers(0, 2**32 - 1),
    layer_end=st.integers(0, 2**32 - 1),
    block_start=st.integers(0, 2**32 - 1),
    block_end=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([0, 1, 2, 3]),
    shape=st.lists(st.integers(0, 2**20), max_size=6),
)


@given(headers, st.binary(max_size=5000))
def test_encoded_chunks_parse_as_standard_protobuf(header, payload):
    raw = codec.encode_chunk(header, payload)
    std = decode_pb2.PushKVRequest.FromString(raw)
    expected = common_pb2.KVChunk()
    expected.CopyFrom(header)
    expected.data = payload
    assert std.chunk == expected
    assert raw == decode_pb2.PushKVRequest(chunk=expected).SerializeToString()


@given(headers, st.binary(max_size=5000))
def test_standard_protobuf_decodes_with_the_codec(header, payload):
    chunk = common_pb2.KVChunk()
    chunk.CopyFrom(header)
    chunk.data = payload
    raw = decode_pb2.PushKVRequest(chunk=chunk).SerializeToString()
    fast, ref = codec.decode(raw), codec.decode_standard(raw)
    assert fast.chunk == ref.chunk == header
    assert bytes(fast.data) == bytes(ref.data) == payload
    assert fast.end is None


def test_end_messages_and_passthrough():
    end = decode_pb2.PushKVRequest(
        end=common_pb2.KVTransferEnd(request_id="r", total_chunks=7, first_token_id=3)
    )
    raw = codec.encode(end)
    assert raw == end.SerializeToString()
    assert codec.encode(raw) is raw  # pre-encoded chunks pass through
    decoded = codec.decode(raw)
    assert decoded.end == end.end and decoded.chunk is None


def test_payload_is_a_view_not_a_copy():
    raw = codec.encode_chunk(common_pb2.KVChunk(request_id="r"), b"x" * 1000)
    data = codec.decode(raw).data
    assert isinstance(data, memoryview) and data.obj is raw
