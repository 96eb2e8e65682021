"""A loopback stand-in for the Hugging Face Hub's file endpoints, for the real huggingface_hub.

It answers HEAD and GET on /OWNER/REPO/resolve/REVISION/FILE from a dict of files, with the
headers huggingface_hub reads (Content-Length, ETag, X-Repo-Commit), on 127.0.0.1 only, and
counts the GETs so that tests can tell a download from a cache hit. Files named in `corrupt` are
sent with one byte flipped (same length) under the headers of the intact file, as a download
damaged on the way would arrive.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, files: dict[str, Path], corrupt: frozenset[str] = frozenset()):
        """files: 'owner/repo/filename' -> local path to serve; corrupt: keys of files to damage."""
        self.files = files
        self.corrupt = corrupt
        self.gets = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _key(self) -> str:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return ""
                return "/".join(parts[:2] + parts[4:])

            def _find(self):
                return server.files.get(self._key())

            def _headers(self, path: Path) -> None:
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self):
                path = self._find()
                if path is None:
                    self.send_error(404)
                    return
                self._headers(path)

            def do_GET(self):
                path = self._find()
                if path is None:
                    self.send_error(404)
                    return
                server.gets += 1
                self._headers(path)
                data = bytearray(path.read_bytes())
                if self._key() in server.corrupt:
                    data[len(data) // 2] ^= 0x01
                self.wfile.write(bytes(data))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
