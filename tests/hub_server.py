"""A tiny local stand-in for the Hugging Face Hub, for end-to-end download tests.

It serves folders of files over real HTTP on 127.0.0.1, implementing just the endpoints that
`huggingface_hub` 2.4.0 calls from `snapshot_download` / `hf_hub_download` without Xet:

    GET  /api/models/{repo}[/revision/{rev}]   repo_info: commit `sha` and `siblings`
    GET  /api/models/{repo}/tree/{rev}[/...]   list_repo_tree (always the whole tree, one page)
    HEAD /{repo}/resolve/{rev}/{file}          metadata: X-Repo-Commit, ETag, X-Linked-Etag/-Size
    GET  /{repo}/resolve/{rev}/{file}          the bytes (honours `Range: bytes=N-` for resumes)

Failures carry the `X-Error-Code` header that `huggingface_hub` maps to its exception types:
RepoNotFound, RevisionNotFound, EntryNotFound (404) and GatedRepo (401). Like the real Hub, a gated
repo's metadata and file list are public and only file downloads need `Authorization: Bearer`.
Every request is recorded in `HubServer.requests` so tests can assert what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Suffixes the Hub stores in git-LFS: their HEAD reply links to the LFS object (sha256, size).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".model")

# The repo id is one or two segments (`gpt2`, `owner/name`); regex backtracking splits it correctly.
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_INFO = re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
_TREE = re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/.*)?")
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


class HubError(Exception):
    """An error reply: HTTP status plus the `X-Error-Code` huggingface_hub dispatches on."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class HubServer:
    """Serves `repos[repo_id][ref] = folder`; use as a context manager, point HF_ENDPOINT at `url`.

    Each distinct folder is one commit whose sha is derived from its contents, so the same folder
    under two refs is the same commit. `gated[repo_id] = token` makes downloads need that token.
    """

    def __init__(self, repos: dict[str, dict[str, Path]], gated: dict[str, str] | None = None):
        self.gated = gated or {}
        self.refs: dict[str, dict[str, str]] = {}  # repo -> ref -> commit sha
        self.commits: dict[str, dict[str, Path]] = {}  # repo -> commit sha -> folder
        for repo, folders in repos.items():
            self.refs[repo] = {ref: _commit_sha(Path(f)) for ref, f in folders.items()}
            self.commits[repo] = {self.refs[repo][ref]: Path(f) for ref, f in folders.items()}
        self.requests: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def downloaded(self) -> set[str]:
        """Repo file names whose bytes were requested (GET on /resolve/)."""
        return self._resolved({"GET"})

    def touched(self) -> set[str]:
        """Repo file names asked about at all (HEAD or GET on /resolve/)."""
        return self._resolved({"GET", "HEAD"})

    def _resolved(self, methods: set[str]) -> set[str]:
        names = set()
        for request in self.requests:
            method, _, path = request.partition(" ")
            if method in methods and (m := _RESOLVE.fullmatch(path)):
                names.add(unquote(m["file"]))
        return names

    # -- request handling, independent of the HTTP plumbing ------------------------------------

    def handle(self, method: str, target: str, headers) -> tuple[int, dict, bytes]:
        path = urlsplit(target).path
        self.requests.append(f"{method} {path}")  # as sent, still percent-encoded
        try:
            if m := _TREE.fullmatch(path):
                return self._tree(**_unquoted(m))
            if m := _INFO.fullmatch(path):
                return self._info(**_unquoted(m))
            if m := _RESOLVE.fullmatch(path):
                return self._resolve(**_unquoted(m), headers=headers)
            raise HubError(404, "", f"no route for {path}")
        except HubError as err:
            body = json.dumps({"error": str(err)}).encode()
            extra = {"X-Error-Code": err.code, "X-Error-Message": str(err)} if err.code else {}
            return err.status, {**extra, **err.headers, "Content-Type": "application/json"}, body

    def _lookup(self, repo: str, rev: str) -> tuple[str, Path]:
        if repo not in self.refs:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo}")
        sha = self.refs[repo].get(rev, rev)  # a branch/tag/PR ref, or already a commit sha
        if sha not in self.commits[repo]:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha, self.commits[repo][sha]

    def _info(self, repo: str, rev: str | None) -> tuple[int, dict, bytes]:
        sha, folder = self._lookup(repo, rev or "main")
        info = {
            "id": repo,
            "modelId": repo,
            "sha": sha,
            "private": False,
            "gated": "manual" if repo in self.gated else False,
            "siblings": [{"rfilename": name} for name in _files(folder)],
        }
        return _json(info)

    def _tree(self, repo: str, rev: str) -> tuple[int, dict, bytes]:
        _, folder = self._lookup(repo, rev)
        return _json([_tree_entry(name, (folder / name).read_bytes()) for name in _files(folder)])

    def _resolve(self, repo: str, rev: str, file: str, headers) -> tuple[int, dict, bytes]:
        sha, folder = self._lookup(repo, rev)
        token = self.gated.get(repo)
        if token is not None and headers.get("Authorization") != f"Bearer {token}":
            raise HubError(401, "GatedRepo", f"Access to model {repo} is restricted.")
        if file not in _files(folder):
            raise HubError(404, "EntryNotFound", f"{file} not found", {"X-Repo-Commit": sha})
        data = (folder / file).read_bytes()
        reply = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
        if file.endswith(LFS_SUFFIXES):
            # The real Hub redirects LFS files to a CDN and names the LFS object in these headers;
            # huggingface_hub prefers them to ETag/Content-Length: the cache blob is the sha256.
            reply["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            reply["X-Linked-Size"] = str(len(data))
        start = _range_start(headers.get("Range"))
        if start:
            reply["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, reply, data[start:]
        return 200, reply, data


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive like the Hub; every reply therefore carries a Content-Length.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._reply(send_body=True)

    def do_HEAD(self) -> None:
        self._reply(send_body=False)

    def _reply(self, send_body: bool) -> None:
        status, headers, body = self.server.hub.handle(self.command, self.path, self.headers)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are recorded in HubServer.requests; keep pytest output clean


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_sha(data)}
    if name.endswith(LFS_SUFFIXES):
        sha256 = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
    return entry


def _commit_sha(folder: Path) -> str:
    """A stable 40-hex "commit" for a folder: same files, same sha."""
    digest = hashlib.sha1()
    for name in _files(folder):
        digest.update(f"{name}\0{_git_blob_sha((folder / name).read_bytes())}\n".encode())
    return digest.hexdigest()


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match[1]) if match else 0


def _json(payload) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _unquoted(match: re.Match) -> dict:
    # Revisions arrive percent-encoded (`refs%2Fpr%2F1`); match first, then decode each part.
    return {key: unquote(value) if value else value for key, value in match.groupdict().items()}
