"""A local, in-memory, Hub-compatible HTTP server for the tests (stdlib only).

It speaks just enough of the Hugging Face Hub protocol (huggingface_hub 2.4, see
/work/shared/reference/hf-integration.md §4) for `create_repo`, `create_commit` / `upload_folder`
with regular (base64, non-LFS) files, `hf_hub_download`, `snapshot_download`, `model_info` and
transformers' `from_pretrained(repo_id)`:

- the server answers "regular" to every preupload, so no LFS or Xet is ever involved;
- every repo is a list of commits, each commit a full `{path: bytes}` snapshot;
- every request (method, path, headers, body) is recorded, so tests can check what was sent;
- `fail_next(endpoint, mode)` makes the next request to one endpoint answer 500 or drop the
  connection halfway through reading the body, for the failure tests.

Why our own server: PyPI has no usable local Hub (see the reference notes), and mocking the HTTP
client would test our assumptions about the protocol instead of the real client.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "tester"
_REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    """The oid git gives a file's content; the client compares it with the local file to skip uploads."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Optional[Commit]:
        if revision in ("main", "HEAD"):
            return self.head
        for commit in self.commits:
            if commit.sha == revision or (len(revision) >= 7 and commit.sha.startswith(revision)):
                return commit
        return None


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class LocalHub:
    """The server's state plus its lifecycle: `start()` binds 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    # ---- test controls -------------------------------------------------------------------------
    def fail_next(self, endpoint: str, mode: str) -> None:
        """Make the next request to `endpoint` ("preupload", "commit", ...) fail: mode "500" or "drop"."""
        if mode not in ("500", "drop"):
            raise ValueError(f"mode must be '500' or 'drop', got {mode!r}")
        self._failures[endpoint] = mode

    def take_failure(self, endpoint: str) -> Optional[str]:
        with self._lock:
            return self._failures.pop(endpoint, None)

    def repo(self, repo_id: str, repo_type: str = "model") -> Optional[Repo]:
        return self.repos.get((repo_type, repo_id))

    # ---- state changes -------------------------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """False if it already exists. A new repo gets an initial commit, as on the Hub."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return False
            repo = Repo(repo_type, repo_id, private)
            files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.commits.append(Commit(_commit_sha("", "initial commit", files), "initial commit", files))
            self.repos[key] = repo
            return True

    def commit(self, repo: Repo, message: str, files: dict[str, bytes], deleted: list[str],
               deleted_folders: list[str]) -> Commit:
        with self._lock:
            snapshot = dict(repo.head.files)
            for path in deleted:
                snapshot.pop(path, None)
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                for path in [p for p in snapshot if p.startswith(prefix)]:
                    del snapshot[path]
            snapshot.update(files)
            commit = Commit(_commit_sha(repo.head.sha, message, snapshot), message, snapshot)
            repo.commits.append(commit)
            return commit


def _commit_sha(parent: str, message: str, files: dict[str, bytes]) -> str:
    h = hashlib.sha1(parent.encode() + message.encode() + str(time.time_ns()).encode())
    for path in sorted(files):
        h.update(path.encode() + git_blob_sha1(files[path]).encode())
    return h.hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, extra: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class _Handler(BaseHTTPRequestHandler):
    state: LocalHub  # set by LocalHub.start
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (quiet: pytest shows failures)
        pass

    # ---- plumbing ------------------------------------------------------------------------------
    def _read_body(self, failure: Optional[str]) -> Optional[bytes]:
        length = int(self.headers.get("Content-Length") or 0)
        if failure == "drop":
            # Read part of the upload, then vanish without an answer: a connection lost mid-upload.
            self.rfile.read(min(length, 64))
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: Optional[dict[str, str]] = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: Optional[dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, err: _HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers=headers, head=head)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        endpoint = _endpoint_name(method, path)
        failure = self.state.take_failure(endpoint)
        body = self._read_body(failure) if method in ("POST", "PUT") else b""
        self.state.requests.append(RecordedRequest(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body or b""))
        if failure == "drop":
            return
        if failure == "500":
            self._error(_HubError(500, "Internal Error - injected by the test server"))
            return
        try:
            self._route(method, path, query, body)
        except _HubError as err:
            self._error(err, head=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # ---- routes --------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            return self._json({"type": "user", "name": DEFAULT_USER, "orgs": [], "auth": {"type": "access_token"}})
        m = re.fullmatch(rf"/api/{_REPO}/preupload/(?P<rev>.+)", path)
        if method == "POST" and m:
            return self._preupload(self._repo(m), m["rev"], json.loads(body))
        m = re.fullmatch(rf"/api/{_REPO}/commit/(?P<rev>.+)", path)
        if method == "POST" and m:
            return self._commit(self._repo(m), m["rev"], body)
        m = re.fullmatch(rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
        if method == "GET" and m:
            return self._tree(self._repo(m), m["rev"], m["sub"] or "")
        m = re.fullmatch(rf"/api/{_REPO}(?:/revision/(?P<rev>.+))?", path)
        if method == "GET" and m:
            return self._info(self._repo(m), m["rev"] or "main")
        m = re.fullmatch(r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)",
                         path)
        if method in ("GET", "HEAD") and m:
            return self._resolve(m, head=method == "HEAD")
        raise _HubError(404, f"no route for {method} {path}")

    def _repo(self, m: re.Match) -> Repo:
        repo = self.state.repo(m["repo"], m["type"] or "model")
        if repo is None:
            raise _HubError(404, f"Repository {m['repo']} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _create_repo(self, payload: dict) -> None:
        name = payload.get("name")
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise _HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{name}"
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        answer = {"url": f"{self.state.url}/{prefix}{repo_id}", "name": repo_id}
        # huggingface_hub sends {"private": true} or, in newer versions, {"visibility": "private"}
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        if not self.state.create_repo(repo_type, repo_id, private):
            # The Hub's 409 still carries the url: `create_repo(exist_ok=True)` reads it.
            raise _HubError(409, "You already created this model repo", extra=answer)
        self._json(answer)

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        head = self._revision(repo, revision)
        files = []
        for f in payload.get("files", []):
            existing = head.files.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": None if existing is None else git_blob_sha1(existing)})
        self._json({"files": files, "commitOid": head.sha})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        self._revision(repo, revision)
        message, files, deleted, deleted_folders = "", {}, [], []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            else:
                raise _HubError(400, f"this test server does not support {key!r} entries (LFS/Xet)")
        commit = self.state.commit(repo, message, files, deleted, deleted_folders)
        self._json({"commitUrl": f"{self.state.url}/{repo.repo_id}/commit/{commit.sha}", "commitOid": commit.sha})

    def _info(self, repo: Repo, revision: str) -> None:
        commit = self._revision(repo, revision)
        self._json({
            "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha, "private": repo.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _tree(self, repo: Repo, revision: str, sub: str) -> None:
        commit = self._revision(repo, revision)
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries = [{"type": "file", "path": p, "size": len(b), "oid": git_blob_sha1(b)}
                   for p, b in sorted(commit.files.items()) if p.startswith(prefix)]
        folders = sorted({p.rsplit("/", 1)[0] for p in commit.files if "/" in p and p.startswith(prefix)})
        entries += [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                    for d in folders]
        self._json(entries)

    def _resolve(self, m: re.Match, head: bool) -> None:
        repo = self._repo(m)
        commit = repo.resolve(unquote(m["rev"]))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {m['rev']}", "RevisionNotFound")
        data = commit.files.get(m["file"])
        if data is None:
            raise _HubError(404, f"Entry not found: {m['file']}", "EntryNotFound")
        self._send(200, data, content_type="application/octet-stream", head=head,
                   headers={"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha1(data)}"'})


def _endpoint_name(method: str, path: str) -> str:
    """A short name for failure injection: "create", "preupload", "commit", "resolve", "info", ..."""
    if path == "/api/repos/create":
        return "create"
    for name in ("preupload", "commit", "tree", "resolve"):
        if f"/{name}/" in path:
            return name
    return "info" if path.startswith("/api/") else "other"


if __name__ == "__main__":  # handy for trying the CLI by hand: HF_ENDPOINT=<printed url> sqlora push ...
    hub = LocalHub().start()
    print(hub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


# ---- pytest fixtures (imported by tests/test_hub.py and tests/test_cli.py) ----------------------
TEST_TOKEN = "hf_sqloraTestToken_0123456789abcdefXYZ"

try:
    import pytest
except ImportError:  # the server itself needs only the standard library
    pytest = None

if pytest is not None:

    @pytest.fixture
    def hub_env(monkeypatch, tmp_path):
        """A running LocalHub with the environment a user would set: HF_ENDPOINT, HF_TOKEN, HF_HOME.

        huggingface_hub froze HF_HUB_OFFLINE (which conftest sets) at import; the push code reads
        `is_offline_mode()` at call time, so the constant is switched off for the test.
        """
        from huggingface_hub import constants

        hub = LocalHub().start()
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        try:
            yield hub
        finally:
            hub.stop()
