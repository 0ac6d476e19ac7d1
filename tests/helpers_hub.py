"""A stand-in for the Hugging Face hub's upload API on 127.0.0.1, enough for ``create_repo`` and ``upload_folder``:
repositories are created, every file is answered "regular" (uploaded inside the commit, base64) and a commit's files
are kept in memory, so a test can compare what arrived with the folder it pushed. Runs in a thread; stops with the
context manager."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str]] = []
        self.cards: list[dict] = []  # the front matter of every README.md validated
        self.endpoint = ""


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            hub.requests.append(("POST", self.path))
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
                hub.repos.setdefault(repo_id, {"private": bool(data.get("private")), "files": {}, "commits": []})
                return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":  # the hub checks a README's front matter before the upload
                return self._validate_card(json.loads(body)["content"])
            parts = path.split("/")
            # /api/models/ORG/NAME/preupload/REV and /api/models/ORG/NAME/commit/REV
            if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                if repo_id not in hub.repos:
                    return self._send(404, {"error": f"Repository {repo_id} not found"})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if action == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    for item in lines:
                        if item["key"] == "file":
                            hub.repos[repo_id]["files"][item["value"]["path"]] = base64.b64decode(
                                item["value"]["content"])
                    hub.repos[repo_id]["commits"].append(header.get("summary"))
                    return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'0' * 40}",
                                            "commitOid": "0" * 40, "pullRequestUrl": None})
            return self._send(404, {"error": f"not served here: POST {path}"})

        def _validate_card(self, content: str) -> None:
            import yaml

            if not content.startswith("---\n") or "\n---\n" not in content[4:]:
                return self._send(400, {"errors": [{"message": "no YAML front matter"}]})
            try:
                meta = yaml.safe_load(content[4:content.index("\n---\n", 4)])
            except yaml.YAMLError as exc:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
            if not isinstance(meta, dict) or not isinstance(meta.get("tags", []), list):
                return self._send(400, {"errors": [{"message": "metadata must be a mapping with a list of tags"}]})
            hub.cards.append(meta)
            return self._send(200, {"warnings": []})

        def do_GET(self) -> None:  # noqa: N802
            hub.requests.append(("GET", self.path))
            self._send(404, {"error": f"not served here: GET {self.path}"})

    return Handler


@contextlib.contextmanager
def hub_stand_in() -> Iterator[HubStandIn]:
    hub = HubStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
