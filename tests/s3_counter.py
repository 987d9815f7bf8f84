"""The counting S3 proxy lives in ``embedjob.bench.s3_counter`` (the scale benchmark uses it);
the tests add ``FlakyProxy``.

``FlakyProxy`` fails a seeded fraction of the requests, before they reach the server: an S3
``503 SlowDown``, an S3 ``500 InternalError``, or a connection reset (TCP RST, no answer).
The choice per request is a hash of the seed, the request and how often that same request
came before, so a retry draws anew and a rerun with the same seed and the same requests
fails the same ones whatever the thread interleaving.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections import Counter
from http.server import BaseHTTPRequestHandler

from embedjob.bench.s3_counter import CountingProxy

__all__ = ["FAULTS", "CountingProxy", "FlakyProxy"]

RESET = "reset"
ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
          "internal": (500, "InternalError", "We encountered an internal error. Please try "
                                             "again.")}
FAULTS = ("slowdown", "internal", RESET)


class FlakyProxy(CountingProxy):
    """``CountingProxy`` that fails ``fraction`` of the requests (a third each of 503
    SlowDown, 500 InternalError and connection resets), seeded; ``injected`` counts them."""

    def __init__(self, upstream: str, *, seed: int, fraction: float) -> None:
        self.seed, self.fraction = seed, fraction
        self.injected: Counter = Counter()  # fault -> requests answered with it
        self._seen: Counter = Counter()  # request -> times seen
        super().__init__(upstream)

    def _fault(self, method: str, target: str) -> str | None:
        """The fault to answer this request with; None: forward it."""
        with self._lock:
            self._seen[(method, target)] += 1
            nth = self._seen[(method, target)]
            digest = hashlib.blake2b(f"{self.seed} {nth} {method} {target}".encode(),
                                     digest_size=8).digest()
            draw = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
            if draw >= self.fraction:
                return None
            fault = FAULTS[int(draw / self.fraction * len(FAULTS))]
            self.injected[fault] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy, forwarding = self, super()._handler()

        class Handler(forwarding):
            def _flaky(self) -> None:
                fault = proxy._fault(self.command, self.path)
                if fault is None:
                    return self._forward()
                proxy._record(self.command, self.path)  # a failed request is a request too
                self._body()
                if fault == RESET:
                    # SO_LINGER 0: the client reads a TCP RST, not an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return None
                self._error(*ERRORS[fault])
                return None

            def _error(self, status: int, code: str, message: str) -> None:
                data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>flaky</RequestId></Error>"
                        ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _flaky

        return Handler
