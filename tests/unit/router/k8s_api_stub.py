"""A local stand-in for the Kubernetes API's EndpointSlice list and watch endpoints.

Serves ``GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices`` with a label selector:
a list (with a resourceVersion), or with ``watch=true`` a chunked stream of JSON watch events
after that version -- what the ``kubernetes`` client's ``Watch`` consumes.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def endpoint_slice(
    name: str,
    service: str,
    port: int,
    endpoints: list[tuple[str, bool]],
    version: int,
    address_type: str = "IPv4",
) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": str(version),
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": address_type,
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints
        ],
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
    }


class FakeKubernetesAPI:
    def __init__(self) -> None:
        self.slices: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.version = 1
        self.cond = threading.Condition()
        self.faults: list[str] = []
        """Failures for the next requests, in order: "drop" (close the connection unanswered),
        "500" (an error status), "gone" (a watch answered with a 410 Gone ERROR event)."""
        self.requests = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                service = query.get("labelSelector", "").split("=", 1)[-1]
                watching = query.get("watch") in ("true", "True", "1")
                with api.cond:
                    api.requests += 1
                    fault = (
                        api.faults.pop(0)
                        if api.faults and (watching or api.faults[0] != "gone")
                        else None
                    )
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "500":
                    body = (
                        b'{"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500}'
                    )
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault == "gone":
                    api._gone(self)
                    return
                if watching:
                    api._watch(
                        self,
                        service,
                        int(query.get("resourceVersion", "0")),
                        float(query.get("timeoutSeconds", 5)),
                    )
                else:
                    api._list(self, service)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, slice_: dict) -> None:
        """Add or replace an EndpointSlice (emits ADDED or MODIFIED)."""
        with self.cond:
            self.version += 1
            slice_["metadata"]["resourceVersion"] = str(self.version)
            kind = "MODIFIED" if slice_["metadata"]["name"] in self.slices else "ADDED"
            self.slices[slice_["metadata"]["name"]] = slice_
            self.events.append((self.version, kind, slice_))
            self.cond.notify_all()

    def delete(self, name: str) -> None:
        with self.cond:
            self.version += 1
            slice_ = self.slices.pop(name)
            self.events.append((self.version, "DELETED", slice_))
            self.cond.notify_all()

    def close(self) -> None:
        self.server.shutdown()

    def _matches(self, slice_: dict, service: str) -> bool:
        return slice_["metadata"]["labels"]["kubernetes.io/service-name"] == service

    def _list(self, handler, service: str) -> None:
        with self.cond:
            body = json.dumps(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": [s for s in self.slices.values() if self._matches(s, service)],
                }
            ).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _gone(self, handler) -> None:
        """What the API does when a watch's resourceVersion is too old: an ERROR event, 410."""
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "Expired",
            "code": 410,
            "message": "too old resource version",
        }
        line = json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"
        handler.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n" + b"0\r\n\r\n")
        handler.wfile.flush()

    def _watch(self, handler, service: str, since: int, timeout_s: float) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                with self.cond:
                    pending = [e for e in self.events if e[0] > since]
                    if not pending:
                        self.cond.wait(timeout=0.1)
                        continue
                for version, kind, obj in pending:
                    since = version
                    if self._matches(obj, service):
                        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                        handler.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                        handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
