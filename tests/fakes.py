"""Fake OpenAI-compatible upstreams, for the tests whose subject is our handling of what an upstream answers or
how it fails: one base handler (JSON in and out, chat completions, quiet logs) and one way to serve a handler on
loopback for the length of a `with` block."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeUpstream(BaseHTTPRequestHandler):
    """Subclasses script `do_POST`; these are the parts every fake upstream shares."""

    def read_json(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def reply(self, status: int, payload: dict | None = None) -> None:
        """A JSON reply (an empty body without `payload`). A client that gave up first is no error of ours."""
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def completion(model: str, text: str, usage: dict | None = None) -> dict:
        """A chat completion answering `text` as `model`, reporting `usage` (one token each way by default)."""
        return {"id": "fake", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage or {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def log_message(self, *args):
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], port: int = 0) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (`port`, or any free one) in a background thread; yields the OpenAI base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()
