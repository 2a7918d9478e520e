"""Zero-copy (de)serialization of ``PushKVRequest`` for the KV page path.

The encoding is exactly protobuf's for ``tandem.decode.v1.PushKVRequest`` -- any protobuf
client or server interoperates -- but the page bytes never pass through protobuf objects:

- encoding writes the small chunk header with protobuf and joins the payload (a buffer over
  the staged pages) behind it: one copy instead of the four that building, nesting and
  serializing a message with a 4 MiB bytes field cost;
- decoding parses the header with protobuf and returns the payload as a ``memoryview`` into
  the received message, which the receiver reads straight into the KV pool.
"""

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tandem.api.errors import KVTransferError
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2

_LEN = 2
_CHUNK_FIELD = 1  # PushKVRequest.chunk
_END_FIELD = 2  # PushKVRequest.end
_DATA_FIELD = 10  # KVChunk.data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise KVTransferError("malformed PushKV message: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, start of the field, start of its value, end) of each field."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, end = _read_varint(buf, pos)
            value = pos
        elif wire == 1:
            value, end = pos, pos + 8
        elif wire == _LEN:
            length, value = _read_varint(buf, pos)
            end = value + length
        elif wire == 5:
            value, end = pos, pos + 4
        else:
            raise KVTransferError(f"malformed PushKV message: wire type {wire}")
        if end > len(buf):
            raise KVTransferError("malformed PushKV message: a field runs past the end")
        yield number, wire, start, value, end
        pos = end


def encode_chunk(header: common_pb2.KVChunk, payload) -> bytes:
    """A serialized PushKVRequest{chunk: header + data=payload}; ``payload`` is any buffer."""
    head = header.SerializeToString()
    payload = memoryview(payload).cast("B")
    # proto3 leaves an empty bytes field out; so do we, to match protobuf byte for byte.
    data_field = _varint(_DATA_FIELD << 3 | _LEN) + _varint(len(payload)) if len(payload) else b""
    inner = len(head) + len(data_field) + len(payload)
    return b"".join((_varint(_CHUNK_FIELD << 3 | _LEN), _varint(inner), head, data_field, payload))


def encode(message) -> bytes:
    """Request serializer of the PushKV stream: pre-encoded chunks pass through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(slots=True)
class PushKV:
    """A decoded PushKVRequest: a chunk header and its payload view, or an end message.

    ``error`` is set instead for a malformed message: a deserializer must not raise (gRPC would
    end the call before the handler could fail the request it belongs to).
    """

    chunk: common_pb2.KVChunk | None = None
    data: memoryview | None = None
    end: common_pb2.KVTransferEnd | None = None
    error: KVTransferError | None = None


def decode(raw: bytes) -> PushKV:
    """Request deserializer of the PushKV stream (the payload is not copied)."""
    buf = memoryview(raw)
    msg = PushKV()
    try:
        for number, wire, _, value, end in _fields(buf):
            if number == _CHUNK_FIELD and wire == _LEN:
                msg.chunk, msg.data = _decode_chunk(buf[value:end])
            elif number == _END_FIELD and wire == _LEN:
                msg.end = common_pb2.KVTransferEnd.FromString(buf[value:end].tobytes())
    except KVTransferError as e:
        return PushKV(error=e)
    except DecodeError as e:
        return PushKV(error=KVTransferError(f"malformed PushKV message: {e}"))
    return msg


def _decode_chunk(buf: memoryview) -> tuple[common_pb2.KVChunk, memoryview]:
    header_parts, data = [], memoryview(b"")
    for number, wire, start, value, end in _fields(buf):
        if number == _DATA_FIELD and wire == _LEN:
            data = buf[value:end]
        else:
            header_parts.append(buf[start:end])
    header = common_pb2.KVChunk.FromString(b"".join(header_parts))
    return header, data


def decode_standard(raw: bytes) -> PushKV:
    """Same result via plain protobuf parsing (the reference the codec is tested against)."""
    req = decode_pb2.PushKVRequest.FromString(raw)
    if req.WhichOneof("item") == "chunk":
        header = common_pb2.KVChunk()
        header.CopyFrom(req.chunk)
        header.ClearField("data")
        return PushKV(chunk=header, data=memoryview(req.chunk.data))
    if req.WhichOneof("item") == "end":
        return PushKV(end=req.end)
    return PushKV()
