"""Fuzz every gRPC service with hypothesis: generated messages to real servers over real sockets.

Strategies are built from the protobuf descriptors (``message_strategy``: every field of every
type, oneofs, nested messages, unknown enum values, extreme integers and floats, NaN, odd
strings and bytes), mixed with *plausible* messages that get past the first checks: prompts of
in-vocabulary token ids with valid sampling parameters, and -- the deepest target -- ``PushKV``
streams for a live reservation (its real transfer token and fingerprint) whose chunks have
generated layer and block ranges, dtypes, shapes, sequence numbers and page bytes (sometimes of
exactly the right size).

Targets: RouterService (Generate, ListModels), PrefillService (Prefill, GetStats),
DecodeService (Generate, PushKV, GetStats, DescribeKV, ClaimKV, CompleteKV, RenewKV) and
KVStoreService (Lookup, PublishEvents, Heartbeat, Stats). Calls carry the cluster's credentials
(so the input reaches the handlers; the authentication tests cover calls without them) and a
deadline.

Checks, per call: no UNKNOWN or INTERNAL status (an unhandled exception in a handler), no unary
call past its deadline (a hang); at the end: every process alive, every pod back at its baseline
free KV blocks. Figures: ``fuzz-figures.json`` (see conftest.py); long mode:
``TANDEM_FUZZ_EXAMPLES=5000``.
"""

import json
import math
import random
import string

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.local_cluster import LocalCluster
from tandem.api import cluster_auth
from tandem.model_dir import load_model_config
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2, decode_pb2_grpc
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from tandem.proto.prefill.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

from .conftest import check_cluster, fuzz_examples, idle_free_blocks

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, pytest.mark.slow]

UNARY_DEADLINE_S = 10.0
STREAM_DEADLINE_S = 10.0
BLOCK_SIZE = 16
FAILING_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
"""What a handler's unhandled exception becomes (gRPC Python answers UNKNOWN)."""

# ---- strategies from descriptors ------------------------------------------------------------

_F = FieldDescriptor
_INT_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int_strategy(lo: int, hi: int):
    edges = [v for v in (lo, hi, 0, 1, -1, 2**31 - 1, 2**32 - 1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(0, min(hi, 5000)), st.integers(lo, hi))


def _scalar(field):
    t = field.type
    if t in _INT_RANGES:
        return _int_strategy(*_INT_RANGES[t])
    if t == _F.TYPE_BOOL:
        return st.booleans()
    if t == _F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == _F.TYPE_DOUBLE:
        return st.floats()
    if t == _F.TYPE_STRING:
        return st.text(max_size=40)
    if t == _F.TYPE_BYTES:
        return st.binary(max_size=256)
    if t == _F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 50))
    raise TypeError(f"unhandled field type {t} of {field.full_name}")


def message_strategy(cls, depth: int = 0):
    """Any message of ``cls``: each field set or not, oneofs with at most one member,
    nested messages up to 3 levels, repeated fields of up to 8 items."""
    desc = cls.DESCRIPTOR

    def field_value(field):
        if _is_map(field):  # map<K, V>: a dict of up to 8 entries
            key = field.message_type.fields_by_name["key"]
            value = field.message_type.fields_by_name["value"]
            return st.dictionaries(_scalar(key), field_value(value), max_size=8)
        if field.type == _F.TYPE_MESSAGE:
            sub = _message_class(cls, field)
            return message_strategy(sub, depth + 1) if depth < 3 else st.just(sub())
        return _scalar(field)

    members = {f.name for o in desc.oneofs for f in o.fields}
    plain = {}
    for field in desc.fields:
        if field.name in members:
            continue
        value = field_value(field)
        if _is_repeated(field) and not _is_map(field):
            value = st.lists(value, max_size=8)
        plain[field.name] = st.none() | value
    oneofs = [
        st.none()
        | st.sampled_from([f for f in o.fields]).flatmap(
            lambda f: field_value(f).map(lambda v, f=f: (f.name, v))
        )
        for o in desc.oneofs
        if not o.name.startswith("_")  # proto3 `optional` fields' synthetic oneofs
    ]

    def build(values, chosen):
        kwargs = {k: v for k, v in values.items() if v is not None}
        kwargs.update(dict(c for c in chosen if c is not None))
        return cls(**kwargs)

    return st.builds(build, st.fixed_dictionaries(plain), st.tuples(*oneofs))


def _is_repeated(field) -> bool:
    return field.is_repeated


def _is_map(field) -> bool:
    return field.type == _F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _message_class(parent_cls, field):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(field.message_type)


# ---- plausible messages ---------------------------------------------------------------------


def sampling_params(vocab: int):
    """Mostly valid sampling parameters (so the request runs), sometimes wild ones."""
    valid = st.builds(
        common_pb2.SamplingParams,
        max_tokens=st.integers(1, 6),
        temperature=st.sampled_from([0.0, 0.7, 1.0]),
        top_p=st.sampled_from([1.0, 0.5]),
        top_k=st.sampled_from([1, 5, 50]),
        seed=st.integers(-(2**63), 2**63 - 1),
        stop=st.lists(st.text(max_size=5), max_size=3),
        stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=3),
        ignore_eos=st.booleans(),
        min_tokens=st.integers(0, 1),
        logprobs=st.sampled_from([0, 1, 5]),
    )
    wild = st.builds(
        common_pb2.SamplingParams,
        max_tokens=st.integers(0, 6),
        temperature=st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e30]),
        top_p=st.sampled_from([1.0, 0.0, 2.0, float("nan")]),
        top_k=st.sampled_from([0, -2, 2**31 - 1]),
        stop=st.lists(st.text(max_size=50), max_size=8),
        stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
        min_tokens=st.integers(0, 2**32 - 1),
        logprobs=st.sampled_from([0, 21, 10_000, 2**32 - 1]),
    )
    return valid | valid | wild


def request_ids():
    return st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=12) | st.text(
        max_size=12
    )


def prompts(vocab: int):
    return st.lists(st.integers(0, vocab - 1), min_size=0, max_size=80) | st.lists(
        st.integers(0, 2**32 - 1), max_size=10
    )


# ---- calling ---------------------------------------------------------------------------------


class Caller:
    """Sends a message, classifies the outcome, records it in the figures."""

    def __init__(self, figures, channels: dict[str, grpc.Channel]):
        self.figures = figures
        self.channels = channels

    def outcome(self, target: str, code: grpc.StatusCode, message, details: str = "") -> None:
        failure = None
        if code in FAILING_CODES:
            failure = {"rpc": target, "code": code.name, "details": details[:400]}
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and target.split(".")[-1] in UNARY:
            failure = {"rpc": target, "code": "hang", "details": details[:200]}
        if failure is not None:
            failure["message"] = _show(message)
        reason = details if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else ""
        self.figures.record(
            f"{target} {code.name}", failure, reason=f"{target}: {reason}" if reason else ""
        )

    def unary(self, target: str, fn, message) -> None:
        try:
            fn(message, timeout=UNARY_DEADLINE_S)
            self.outcome(target, grpc.StatusCode.OK, message)
        except grpc.RpcError as e:
            self.outcome(target, e.code(), message, e.details() or "")

    def server_stream(self, target: str, fn, message, read: int) -> None:
        """Read up to ``read`` responses, then cancel (the pod must free what it holds)."""
        call = fn(message, timeout=STREAM_DEADLINE_S)
        try:
            for i, _ in enumerate(call):
                if i + 1 >= read:
                    call.cancel()
                    break
            self.outcome(target, grpc.StatusCode.OK, message)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.CANCELLED and call.cancelled():
                code = grpc.StatusCode.OK  # our own cancel
            self.outcome(target, code, message, e.details() or "")


UNARY = {
    "ListModels",
    "Prefill",
    "GetStats",
    "DescribeKV",
    "ClaimKV",
    "CompleteKV",
    "RenewKV",
    "Lookup",
    "PublishEvents",
    "Heartbeat",
    "Stats",
}


def _show(message) -> str:
    if isinstance(message, list):
        return "[" + ", ".join(_show(m) for m in message[:4]) + "]"
    text = str(message).replace("\n", " ")
    return text if len(text) < 600 else text[:600] + "..."


def test_grpc_services_fuzz(fuzz_cluster: LocalCluster, fuzz_model, figures):
    cfg = load_model_config(fuzz_model)
    vocab = cfg.vocab_size
    baseline = idle_free_blocks(fuzz_cluster)
    secret = getattr(fuzz_cluster, "cluster_secret", None)
    auth = cluster_auth.ClusterAuth(secret) if secret else cluster_auth.process_auth()
    addr = {
        "router": fuzz_cluster.router_grpc,
        "prefill": fuzz_cluster.pods("prefill")[0].address,
        "decode": fuzz_cluster.pods("decode")[0].address,
        "kvstore": fuzz_cluster.by_name("kvstore").address,
    }
    ch = {k: cluster_auth.channel(v, [], auth) for k, v in addr.items()}
    router = router_pb2_grpc.RouterServiceStub(ch["router"])
    prefill = prefill_pb2_grpc.PrefillServiceStub(ch["prefill"])
    decode = decode_pb2_grpc.DecodeServiceStub(ch["decode"])
    kvstore = kvstore_pb2_grpc.KVStoreServiceStub(ch["kvstore"])
    caller = Caller(figures, ch)
    fingerprint = decode.GetStats(decode_pb2.GetStatsRequest(), timeout=10).stats.model_fingerprint

    def anything_or(plausible, cls):
        # plausible messages get two thirds of the draws: they reach past the first checks
        return st.one_of(plausible, plausible, message_strategy(cls))

    targets = {
        "router.Generate": (
            anything_or(
                st.builds(
                    router_pb2.GenerateRequest,
                    text=st.text(max_size=60),
                    sampling_params=sampling_params(vocab),
                    cache_salt=st.text(max_size=4),
                ),
                router_pb2.GenerateRequest,
            ),
            lambda m: caller.server_stream("router.Generate", router.Generate, m, read=3),
        ),
        "router.ListModels": (
            message_strategy(router_pb2.ListModelsRequest),
            lambda m: caller.unary("router.ListModels", router.ListModels, m),
        ),
        "prefill.Prefill": (
            anything_or(
                st.builds(
                    prefill_pb2.PrefillRequest,
                    request_id=request_ids(),
                    prompt_token_ids=prompts(vocab),
                    sampling_params=sampling_params(vocab),
                    decode_target=st.builds(
                        prefill_pb2.DecodeTarget,
                        address=st.sampled_from(
                            [addr["decode"], addr["prefill"], "127.0.0.1:1", "bad address", ""]
                        ),
                        request_id=request_ids(),
                        model_fingerprint=st.sampled_from([fingerprint, "", "0" * 16]),
                        transfer_token=st.text(max_size=8),
                        skip_blocks=st.integers(0, 2**32 - 1),
                        block_ids=st.lists(st.integers(0, 2**32 - 1), max_size=6),
                    ),
                ),
                prefill_pb2.PrefillRequest,
            ),
            lambda m: caller.unary("prefill.Prefill", prefill.Prefill, m),
        ),
        "prefill.GetStats": (
            message_strategy(prefill_pb2.GetStatsRequest),
            lambda m: caller.unary("prefill.GetStats", prefill.GetStats, m),
        ),
        "decode.Generate": (
            anything_or(
                st.builds(
                    decode_pb2.GenerateRequest,
                    request_id=request_ids(),
                    prompt_token_ids=prompts(vocab),
                    sampling_params=sampling_params(vocab),
                    prefill_mode=st.sampled_from([1, 2, 2, 0, 7]),
                    priority=st.integers(-(2**31), 2**31 - 1),
                ),
                decode_pb2.GenerateRequest,
            ),
            # a REMOTE reservation waits for KV that never comes: its admission is enough
            lambda m: caller.server_stream(
                "decode.Generate", decode.Generate, m, read=1 if m.prefill_mode == 1 else 3
            ),
        ),
        "decode.PushKV": (
            st.one_of(
                st.lists(message_strategy(decode_pb2.PushKVRequest), max_size=4),
                kv_streams(cfg, vocab),
            ),
            lambda msgs: push_kv(caller, decode, msgs, fingerprint),
        ),
        "decode.GetStats": (
            message_strategy(decode_pb2.GetStatsRequest),
            lambda m: caller.unary("decode.GetStats", decode.GetStats, m),
        ),
        "decode.DescribeKV": (
            message_strategy(decode_pb2.DescribeKVRequest),
            lambda m: caller.unary("decode.DescribeKV", decode.DescribeKV, m),
        ),
        "decode.ClaimKV": (
            message_strategy(decode_pb2.ClaimKVRequest),
            lambda m: caller.unary("decode.ClaimKV", decode.ClaimKV, m),
        ),
        "decode.CompleteKV": (
            message_strategy(decode_pb2.CompleteKVRequest),
            lambda m: caller.unary("decode.CompleteKV", decode.CompleteKV, m),
        ),
        "decode.RenewKV": (
            message_strategy(decode_pb2.RenewKVRequest),
            lambda m: caller.unary("decode.RenewKV", decode.RenewKV, m),
        ),
        "kvstore.Lookup": (
            anything_or(
                st.builds(
                    kvstore_pb2.LookupRequest,
                    model_fingerprint=st.sampled_from([fingerprint, ""]),
                    block_hashes=st.lists(st.binary(min_size=0, max_size=40), max_size=64),
                ),
                kvstore_pb2.LookupRequest,
            ),
            lambda m: caller.unary("kvstore.Lookup", kvstore.Lookup, m),
        ),
        "kvstore.PublishEvents": (
            message_strategy(kvstore_pb2.PublishEventsRequest),
            lambda m: caller.unary("kvstore.PublishEvents", kvstore.PublishEvents, m),
        ),
        "kvstore.Heartbeat": (
            message_strategy(kvstore_pb2.HeartbeatRequest),
            lambda m: caller.unary("kvstore.Heartbeat", kvstore.Heartbeat, m),
        ),
        "kvstore.Stats": (
            message_strategy(kvstore_pb2.StatsRequest),
            lambda m: caller.unary("kvstore.Stats", kvstore.Stats, m),
        ),
    }
    # The generating RPCs and PushKV get most of the budget; trivial requests a few each.
    weights = {name: (4 if name in HEAVY else 1) for name in targets}
    total = fuzz_examples()
    for name, (strategy, send) in targets.items():
        n = max(3, math.ceil(total * weights[name] / sum(weights.values())))
        fuzz(strategy, send, n)

    for channel in ch.values():
        channel.close()
    check_cluster(fuzz_cluster, baseline, figures)
    assert not figures.crashed, figures.crashed
    assert not figures.failures, json.dumps(figures.failures[:5], indent=1)
    assert not figures.leaked_blocks, figures.leaked_blocks


HEAVY = {"router.Generate", "prefill.Prefill", "decode.Generate", "decode.PushKV"}


def fuzz(strategy, send, examples: int) -> None:
    """Send ``examples`` messages drawn from ``strategy`` (deterministic, no shrinking: every
    outcome is recorded, failures included, rather than raised)."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(message=strategy)
    def run(message):
        send(message)

    run()


# ---- PushKV against a live reservation -------------------------------------------------------


def kv_streams(cfg, vocab: int):
    """A plan for a PushKV stream against a reservation opened at call time: the chunks'
    generated headers and data, and how the stream ends."""
    layers = cfg.num_layers
    page = 2 * BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * 4  # one layer's block, float32
    chunk = st.fixed_dictionaries(
        {
            "layers": st.tuples(st.integers(-1, layers + 2), st.integers(-1, layers + 2))
            | st.just((0, layers)),
            "blocks": st.tuples(st.integers(-1, 6), st.integers(-1, 6)) | st.just((0, 3)),
            "seq": st.integers(0, 3) | st.just(None),
            "dtype": st.sampled_from([1, 1, 1, 0, 2, 3, 99]),
            "shape": st.none() | st.lists(st.integers(0, 2**32 - 1), max_size=7),
            "size": st.sampled_from(["exact", "exact", "short", "long", "empty"]),
            "token": st.sampled_from(["live", "live", "live", "wrong", "none"]),
            "request": st.sampled_from(["live", "live", "live", "other"]),
        }
    )
    end = st.none() | st.fixed_dictionaries(
        {
            "total": st.integers(0, 5),
            "first_token": st.integers(0, vocab + 5) | st.just(2**32 - 1),
            "token": st.sampled_from(["live", "live", "wrong"]),
            "aborted": st.booleans(),
        }
    )
    return st.fixed_dictionaries(
        {
            "prompt": st.integers(1, 60),
            "chunks": st.lists(chunk, max_size=4),
            "end": end,
            "page": st.just(page),
            "layers_total": st.just(layers),
        }
    )


def push_kv(caller: Caller, decode, plan, fingerprint: str) -> None:
    if isinstance(plan, list):  # raw generated messages, no reservation
        try:
            decode.PushKV(iter(plan), timeout=STREAM_DEADLINE_S)
            caller.outcome("decode.PushKV", grpc.StatusCode.OK, plan)
        except grpc.RpcError as e:
            caller.outcome("decode.PushKV", e.code(), plan, e.details() or "")
        return
    rng = random.Random(repr(plan))
    rid = f"fuzz-kv-{rng.getrandbits(48):x}"
    reservation = decode.Generate(
        decode_pb2.GenerateRequest(
            request_id=rid,
            prompt_token_ids=[rng.randrange(3, 500) for _ in range(plan["prompt"])],
            sampling_params=common_pb2.SamplingParams(max_tokens=2, temperature=0),
            prefill_mode=decode_pb2.PREFILL_MODE_REMOTE,
        ),
        timeout=STREAM_DEADLINE_S,
    )
    try:
        admitted = next(reservation).admitted
    except grpc.RpcError as e:
        caller.outcome("decode.PushKV(reserve)", e.code(), plan, e.details() or "")
        return
    messages = []
    for i, c in enumerate(plan["chunks"]):
        (l0, l1), (b0, b1) = c["layers"], c["blocks"]
        n = max(0, l1 - l0) * max(0, b1 - b0) * plan["page"]
        size = {"exact": n, "short": max(0, n - 7), "long": n + 16, "empty": 0}[c["size"]]
        messages.append(
            decode_pb2.PushKVRequest(
                chunk=common_pb2.KVChunk(
                    request_id=rid if c["request"] == "live" else rid + "x",
                    sequence_number=i if c["seq"] is None else c["seq"],
                    model_fingerprint=fingerprint,
                    layer_start=max(0, l0),
                    layer_end=max(0, l1),
                    block_start=max(0, b0),
                    block_end=max(0, b1),
                    dtype=c["dtype"],
                    shape=c["shape"] or [],
                    data=rng.randbytes(min(size, 8 << 20)),
                    transfer_token={
                        "live": admitted.transfer_token,
                        "wrong": "not-the-token",
                        "none": "",
                    }[c["token"]],
                )
            )
        )
    if plan["end"] is not None:
        e = plan["end"]
        messages.append(
            decode_pb2.PushKVRequest(
                end=common_pb2.KVTransferEnd(
                    request_id=rid,
                    model_fingerprint=fingerprint,
                    total_chunks=e["total"],
                    first_token_id=e["first_token"],
                    transfer_token=admitted.transfer_token if e["token"] == "live" else "wrong",
                    transport="grpc",
                    aborted=e["aborted"],
                )
            )
        )
    try:
        decode.PushKV(iter(messages), timeout=STREAM_DEADLINE_S)
        caller.outcome("decode.PushKV", grpc.StatusCode.OK, messages)
    except grpc.RpcError as e:
        caller.outcome("decode.PushKV", e.code(), messages, e.details() or "")
    if plan["end"] is None:  # never ended: it would wait for its pages; hang up instead
        reservation.cancel()
        return
    # the reservation's stream: tokens (a complete transfer) or an error; then it is freed
    try:
        for _ in reservation:
            pass
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    caller.outcome("decode.Generate(after PushKV)", code, messages, details)
    reservation.cancel()
