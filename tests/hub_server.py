"""A small stand-in for the Hugging Face Hub, for tests that drive the real `huggingface_hub` client.

Stdlib only. `FakeHub` serves model repos from an in-memory ``{repo_id: {path: bytes}}`` over two
``ThreadingHTTPServer`` instances on 127.0.0.1 (port 0):

* the *Hub* (``hub.url``, what ``HF_ENDPOINT`` points at), with the endpoints that `hf_hub_download` and
  `snapshot_download(allow_patterns=...)` call (read from huggingface_hub 2.4):

  - ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: repo info, the
    ``sha`` field resolves the revision to a commit (snapshot_download's ``repo_info`` call);
  - ``GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...``: the tree listing, entries shaped
    like the Hub's (``type``, ``oid``, ``size``, ``path``, ``lfs: {oid, size, pointerSize}``), paginated
    with a ``Link: <...>; rel="next"`` header like the Hub's cursor pagination;
  - ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: for a regular (git) file, ``200`` with
    ``ETag: "<git blob sha1>"``, ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges`` and the bytes
    (``Range`` honoured); for an LFS file, ``302`` to the *CDN* with ``X-Linked-Etag: "<sha256>"``,
    ``X-Linked-Size``, ``X-Repo-Commit`` and ``ETag`` of the pointer file, as huggingface.co does.
    No ``X-Xet-Hash`` header, no ``Link: rel="xet-auth"``, no ``xetHash`` in the tree: the client
    therefore takes its plain-HTTP download path, even with ``hf_xet`` installed;
  - ``GET /api/agent-harnesses``: the registry huggingface_hub fetches for its user-agent string
    (unless ``HF_HUB_DISABLE_TELEMETRY`` is set), served empty;
  - errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client
    raises its own typed errors.

* the *CDN* (``hub.cdn_url``, another port hence another origin, so the client stops at the 302 and
  reads the file's metadata from it): ``HEAD``/``GET /repos/xx/yy/<sha256>?...`` serving LFS bytes, with
  ``Range`` (``206`` + ``Content-Range``; ``416`` when unsatisfiable).

Fault injection, per ``(repo_id, path)``, consumed one per GET of that file's body, in order:

* ``hub.add_fault(repo, path, "drop", at=n)``: that GET sends the headers (with the full
  ``Content-Length``), then ``n`` bytes of the body, then closes the socket: an interrupted transfer;
* ``hub.add_fault(repo, path, "stall", at=n)``: the same, but after ``n`` bytes it holds the connection
  open until the test releases it, so the test can interrupt or kill the client mid-transfer:
  ``release = hub.wait_stall(timeout)`` returns once a stall has begun, ``release.set()`` ends it
  (closing the server ends every stall).
* ``hub.before_body``: optional callable run with the `RequestRecord` just before a file's body is sent
  (for example to look at the client's download folder at the moment a resumed GET arrives).

Every request is recorded in ``hub.requests`` (`RequestRecord`). Use as a context manager::

    with FakeHub({"org/model": {"config.json": b"{}"}}) as hub:
        env["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".bin", ".ckpt", ".h5", ".msgpack", ".onnx", ".pt", ".pth", ".safetensors")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


@dataclass
class HubFile:
    repo_id: str
    path: str
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.content)

    @property
    def blob_id(self) -> str:
        """The git object id: of the file itself, or of its LFS pointer."""
        return git_blob_sha1(self.pointer if self.lfs else self.content)


@dataclass
class RequestRecord:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # URL path, unquoted
    query: dict
    headers: dict
    repo_id: str | None = None
    file: str | None = None  # path of the file in the repo, for file requests
    status: int | None = None
    body_bytes: int = 0  # body bytes actually written
    interrupted: bool = False
    time: float = field(default_factory=time.monotonic)  # when the request line arrived

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], *, tree_page_size: int = 1000,
                 lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES):
        self.tree_page_size = tree_page_size
        self.files: dict[str, dict[str, HubFile]] = {
            repo: {path: HubFile(repo, path, data, path.endswith(lfs_suffixes)) for path, data in contents.items()}
            for repo, contents in repos.items()}
        self.commits = {repo: hashlib.sha1(repr(sorted((p, f.blob_id) for p, f in files.items())).encode()).hexdigest()
                        for repo, files in self.files.items()}
        self.by_sha256 = {f.sha256: f for files in self.files.values() for f in files.values() if f.lfs}
        self.requests: list[RequestRecord] = []
        self.faults: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self._stalls: "queue.Queue[threading.Event]" = queue.Queue()
        self._closing = threading.Event()
        self.before_body: Callable[[RequestRecord], None] | None = None
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.fake_hub = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-hub-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url = "http://127.0.0.1:%d" % self._servers[0].server_address[1]
        self.cdn_url = "http://127.0.0.1:%d" % self._servers[1].server_address[1]
        return self

    def close(self) -> None:
        self._closing.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries for tests -------------------------------------------------------------------------

    def file_requests(self, repo_id: str | None = None, path: str | None = None, method: str | None = None,
                      server: str | None = None) -> list[RequestRecord]:
        with self._lock:
            records = list(self.requests)
        return [r for r in records if r.file is not None
                and (repo_id is None or r.repo_id == repo_id) and (path is None or r.file == path)
                and (method is None or r.method == method) and (server is None or r.server == server)]

    def cdn_url_for(self, f: HubFile) -> str:
        s = f.sha256
        disposition = f'attachment; filename="{f.path.rsplit("/", 1)[-1]}";'
        return f"{self.cdn_url}/repos/{s[:2]}/{s[2:4]}/{s}?" + urlencode(
            {"response-content-disposition": disposition, "Expires": "9999999999", "Signature": "fake"})

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def add_fault(self, repo_id: str, path: str, kind: str, at: int) -> None:
        """Queue a fault ("drop" or "stall" after `at` body bytes) for the next GET of the file's body."""
        if kind not in ("drop", "stall"):
            raise ValueError(kind)
        with self._lock:
            self.faults.setdefault((repo_id, path), []).append((kind, at))

    def wait_stall(self, timeout: float) -> threading.Event:
        """Wait until a "stall" fault holds a connection; set the returned event to let it go."""
        return self._stalls.get(timeout=timeout)

    def _next_fault(self, f: HubFile) -> tuple[str | None, int]:
        with self._lock:
            queued = self.faults.get((f.repo_id, f.path))
            return queued.pop(0) if queued else (None, 0)

    def _stall(self) -> None:
        release = threading.Event()
        self._stalls.put(release)
        while not release.wait(0.05) and not self._closing.is_set():
            pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response has a Content-Length
    server_version = "FakeHub/1.0"
    timeout = 30  # seconds a connection may sit idle before the handler thread gives up on it

    @property
    def hub(self) -> FakeHub:
        return self.server.fake_hub  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - quiet; requests are recorded in hub.requests
        pass

    # -- plumbing ----------------------------------------------------------------------------------

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def _dispatch(self):
        split = urlsplit(self.path)
        record = RequestRecord(server=self.server.role, method=self.command,  # type: ignore[attr-defined]
                               path=unquote(split.path), query=parse_qs(split.query),
                               headers={k.lower(): v for k, v in self.headers.items()})
        self.hub._record(record)
        try:
            if record.server == "cdn":
                self._cdn(record)
            else:
                self._hub(record, split.path)
        except (BrokenPipeError, ConnectionResetError):
            record.interrupted = True
            self.close_connection = True

    def _send(self, record: RequestRecord, status: int, headers: dict, body: bytes = b"") -> None:
        record.status = status
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            record.body_bytes = len(body)

    def _json(self, record: RequestRecord, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(record, status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                   json.dumps(payload).encode())

    def _error(self, record: RequestRecord, status: int, code: str, message: str, headers: dict | None = None):
        self._json(record, {"error": message}, status,
                   {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    # -- the Hub -----------------------------------------------------------------------------------

    def _repo_and_rest(self, parts: list[str]) -> tuple[str | None, list[str]]:
        for n in (2, 1):  # "namespace/name" or a legacy name without namespace
            repo_id = "/".join(parts[:n])
            if repo_id in self.hub.files:
                return repo_id, parts[n:]
        return None, parts

    def _check_revision(self, record: RequestRecord, repo_id: str, revision: str) -> bool:
        if revision in ("main", self.hub.commits[repo_id]):
            return True
        self._error(record, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    def _hub(self, record: RequestRecord, raw_path: str) -> None:
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        if parts == ["api", "agent-harnesses"]:
            # Fetched by huggingface_hub's user-agent code (utils/_detect_agent.py) unless
            # HF_HUB_DISABLE_TELEMETRY is set; an empty registry means "no agent detected".
            return self._json(record, {"standardEnvVars": [], "harnesses": {}})
        if parts[:2] == ["api", "models"]:
            repo_id, rest = self._repo_and_rest(parts[2:])
            if repo_id is None:
                return self._error(record, 404, "RepoNotFound", "Repository not found")
            record.repo_id = repo_id
            if not rest:
                return self._model_info(record, repo_id)
            if rest[0] == "revision" and len(rest) == 2:
                if self._check_revision(record, repo_id, rest[1]):
                    self._model_info(record, repo_id)
                return
            if rest[0] == "tree" and len(rest) >= 2:
                if self._check_revision(record, repo_id, rest[1]):
                    self._tree(record, repo_id, "/".join(rest[2:]))
                return
            return self._error(record, 404, "NotFound", "Unknown API route")
        repo_id, rest = self._repo_and_rest(parts)
        if repo_id is None:
            return self._error(record, 404, "RepoNotFound", "Repository not found")
        record.repo_id = repo_id
        if len(rest) >= 3 and rest[0] == "resolve":
            if self._check_revision(record, repo_id, rest[1]):
                self._resolve(record, repo_id, "/".join(rest[2:]))
            return
        return self._error(record, 404, "NotFound", "Unknown route")

    def _model_info(self, record: RequestRecord, repo_id: str) -> None:
        self._json(record, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": self.hub.commits[repo_id],
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2023-01-01T00:00:00.000Z",
            "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "library_name": "diffusers", "siblings": [{"rfilename": p} for p in sorted(self.hub.files[repo_id])],
        })

    def _tree(self, record: RequestRecord, repo_id: str, prefix: str) -> None:
        recursive = record.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        files = self.hub.files[repo_id]
        base = prefix.strip("/")
        if base and base in files:
            return self._error(record, 404, "EntryNotFound", f"{base} is a file, not a folder")
        entries: dict[str, dict] = {}
        for path in sorted(files):
            if base and not path.startswith(base + "/"):
                continue
            rel = path[len(base) + 1:] if base else path
            segments = rel.split("/")
            depth = len(segments) if recursive else 1
            for i in range(1, min(depth, len(segments)) + 1):
                sub = "/".join(([base] if base else []) + segments[:i])
                if i < len(segments):
                    entries.setdefault(sub, {"type": "directory", "oid": git_blob_sha1(sub.encode()),
                                             "size": 0, "path": sub})
                else:
                    f = files[path]
                    entry = {"type": "file", "oid": f.blob_id, "size": len(f.content), "path": path}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": len(f.pointer)}
                    entries[sub] = entry
        if base and not entries:
            return self._error(record, 404, "EntryNotFound", f"{base} does not exist")
        listing = sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))
        start = int(record.query.get("cursor", ["0"])[0])
        page = listing[start:start + self.hub.tree_page_size]
        headers = {}
        if start + self.hub.tree_page_size < len(listing):
            query = {k: v[0] for k, v in record.query.items()}
            query["cursor"] = str(start + self.hub.tree_page_size)
            next_url = f"{self.hub.url}{quote(record.path)}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(record, page, headers=headers)

    def _resolve(self, record: RequestRecord, repo_id: str, path: str) -> None:
        commit = self.hub.commits[repo_id]
        f = self.hub.files[repo_id].get(path)
        if f is None:
            return self._error(record, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        record.file = path
        if f.lfs:
            location = self.hub.cdn_url_for(f)
            return self._send(record, 302, {
                "Location": location, "X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(f.pointer)}"',
                "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.content)),
                "Content-Type": "text/plain; charset=utf-8"}, f"Found. Redirecting to {location}".encode())
        self._file_body(record, f, {"X-Repo-Commit": commit, "ETag": f'"{f.blob_id}"'})

    # -- the CDN -----------------------------------------------------------------------------------

    def _cdn(self, record: RequestRecord) -> None:
        sha = record.path.rstrip("/").rsplit("/", 1)[-1]
        f = self.hub.by_sha256.get(sha)
        if f is None:
            return self._send(record, 404, {"Content-Type": "text/plain"}, b"NoSuchKey")
        record.repo_id, record.file = f.repo_id, f.path
        disposition = record.query.get("response-content-disposition", [None])[0]
        self._file_body(record, f, {"ETag": f'"{hashlib.md5(f.content).hexdigest()}"',
                                    **({"Content-Disposition": disposition} if disposition else {})})

    # -- file bodies, with Range and faults --------------------------------------------------------

    def _file_body(self, record: RequestRecord, f: HubFile, headers: dict) -> None:
        data, size = f.content, len(f.content)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        start, end, status = 0, size - 1, 200
        if record.range is not None:
            m = _RANGE_RE.match(record.range.strip())
            first, last = (m.group(1), m.group(2)) if m else ("", "")
            if m and first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            elif m and last:  # suffix range: the last N bytes
                start, end = max(size - int(last), 0), size - 1
            if not m or (not first and not last) or start >= size or start > end:
                return self._send(record, 416, {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start:end + 1]
        if self.command == "HEAD":
            record.status = status
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            return

        fault, keep = self.hub._next_fault(f)
        if self.hub.before_body is not None:
            self.hub.before_body(record)
        record.status = status
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if fault is None:
            self.wfile.write(body)
            record.body_bytes = len(body)
            return
        keep = min(keep, len(body) - 1)
        self.wfile.write(body[:keep])
        self.wfile.flush()
        record.body_bytes = keep
        record.interrupted = True
        if fault == "stall":
            self.hub._stall()
        # Drop the connection half-way through the body, as a broken network would.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
