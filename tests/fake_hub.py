"""A fake Hugging Face Hub on 127.0.0.1: folders served as Hub repos, answering the requests snapshot_download makes
(huggingface_hub 2.4.0): the revision look-up GET /api/models/{repo}/revision/{rev}, the listing GET
/api/models/{repo}/tree/{rev}, and HEAD/GET /{repo}/resolve/{rev}/{file} with X-Repo-Commit, ETag and
Content-Length; errors carry the X-Error-Code and X-Error-Message headers the library turns into its exceptions.
Used by tests/test_hub.py and by the notebook test (its Hub cell, with HF_ENDPOINT pointing here)."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROUTES = [("info", re.compile(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)")),
          ("tree", re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?")),
          ("file", re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)"))]


class FakeHub(http.server.ThreadingHTTPServer):
    """Folders served as Hub repos: repos[repo_id][revision] = (commit sha, folder), each commit also reachable by
    its sha; errors[repo_id] = (status, headers) answers every request about that repo; `seen` logs requests."""

    daemon_threads = True

    def __init__(self, repos: dict, errors: dict):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos = {repo: {**revs, **{sha: (sha, d) for sha, d in revs.values()}} for repo, revs in repos.items()}
        self.errors, self.seen = errors, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._answer(send_body=True)

    def do_HEAD(self):
        self._answer(send_body=False)

    def _answer(self, send_body: bool):
        hub, path = self.server, urlsplit(self.path).path
        hub.seen.append((self.command, unquote(path)))
        for kind, pattern in ROUTES:
            if match := pattern.fullmatch(path):
                break
        else:
            return self._send(404, {}, b"", send_body)
        repo, rev = unquote(match[1]), unquote(match[2])
        if repo in hub.errors:
            status, headers = hub.errors[repo]
            return self._send(status, headers, json.dumps({"error": headers["X-Error-Message"]}).encode(), send_body)
        if repo not in hub.repos:
            return self._send(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                              b"", send_body)
        if rev not in hub.repos[repo]:
            return self._send(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {rev}"},
                              b"", send_body)
        sha, folder = hub.repos[repo][rev]
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        json_type = {"Content-Type": "application/json"}
        if kind == "info":
            body = {"id": repo, "sha": sha, "private": False, "siblings": [{"rfilename": f} for f in files]}
            return self._send(200, json_type, json.dumps(body).encode(), send_body)
        if kind == "tree":
            body = [{"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": _git_oid(folder / f)}
                    for f in files]
            return self._send(200, json_type, json.dumps(body).encode(), send_body)
        name = unquote(match[3])
        if name not in files:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha,
                                    "X-Error-Message": "Entry not found"}, b"", send_body)
        data = (folder / name).read_bytes()
        self._send(200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                         "Content-Type": "application/octet-stream"}, data, send_body)

    def _send(self, status: int, headers: dict, body: bytes, send_body: bool):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _git_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
