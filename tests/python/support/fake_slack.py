"""An HTTP server on loopback standing in for Slack's incoming webhook."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeSlack:
    """A webhook that records what it accepted; it can fail or hang on demand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: list[tuple[float, str]] = []   # (time, text) answered 200
        self.requests: list[float] = []               # every request's arrival
        self.fail_next = 0
        self.hang_next = 0
        self.hanging = threading.Event()              # set when a request is being held
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    fake.requests.append(time.monotonic())
                    hang, fail = fake.hang_next > 0, fake.hang_next == 0 and fake.fail_next > 0
                    if hang:
                        fake.hang_next -= 1
                    elif fail:
                        fake.fail_next -= 1
                if hang:
                    fake.hanging.set()
                    fake.release.wait(30)
                    self.close_connection = True
                    return   # no answer at all
                if fail:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"rate_limited")
                    return
                with fake.lock:
                    fake.accepted.append((time.monotonic(), json.loads(body)["text"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/services/T000/B000/XXXX"

    def delivered_ids(self) -> list[int]:
        with self.lock:
            return [int(i) for _, text in self.accepted for i in re.findall(r"alert #(\d+)", text)]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
