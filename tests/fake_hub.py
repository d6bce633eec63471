"""A small in-memory Hugging Face Hub, served at ``huggingface_hub``'s HTTP layer.

``FakeHub.install()`` swaps the ``httpx2`` client factory of ``huggingface_hub`` (the documented
``set_client_factory`` hook) for one whose transport is this server, so the real ``HfApi`` code runs
unmodified down to the request it would have sent. It answers the requests that ``push_to_hub`` makes:

* ``POST /api/repos/create``                          create a model repo (409 when it exists)
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``           only for files the repo lacks: 404 ``EntryNotFound``
* ``POST /api/validate-yaml``                         model card metadata check (always valid)
* ``POST /api/models/{repo}/preupload/{rev}``         upload mode per file: ``"lfs"`` or ``"regular"``
* ``POST /{repo}.git/info/lfs/objects/batch``         LFS batch API, basic transfer, with a verify action
* ``PUT  https://{storage}/{oid}``                    the "presigned" storage URL of that transfer
* ``POST /{repo}.git/info/lfs/objects/verify``        the verify action
* ``POST /api/models/{repo}/commit/{rev}``            NDJSON commit: ``file`` (base64) and ``lfsFile`` lines
* ``GET  /api/agent-harnesses``                       registry read by ``huggingface_hub``'s user agent code

Anything else is an unexpected request: it is recorded in ``unexpected`` and the transport raises, so the
test fails with the URL even where the calling code would swallow the error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx2
from huggingface_hub import constants
from huggingface_hub.utils import _http

STORAGE_HOST = "fake-lfs-storage.invalid"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class UnexpectedRequest(AssertionError):
    pass


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    oid: str
    files: dict[str, bytes]
    kinds: dict[str, str]  # path -> "file" (base64 inside the NDJSON) or "lfsFile" (pointer to uploaded blob)


@dataclass
class Repo:
    repo_id: str
    private: bool | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)


class FakeHub:
    """In-memory Hub. ``upload_mode``: ``"auto"`` (LFS for weight files, like the Hub's ``.gitattributes``),
    ``"regular"`` (every file base64 inside the commit) or ``"lfs"`` (every non-empty file through LFS)."""

    def __init__(self, token: str, upload_mode: str = "auto", endpoint: str | None = None):
        assert upload_mode in ("auto", "regular", "lfs")
        self.token = token
        self.upload_mode = upload_mode
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.host = urlsplit(self.endpoint).hostname
        self.repos: dict[str, Repo] = {}
        self.lfs_blobs: dict[str, bytes] = {}  # sha256 hex -> bytes, filled by the storage PUT
        self.lfs_verified: set[str] = set()
        self.log: list[tuple[str, str]] = []  # (method, url) of every request, in order
        self.unexpected: list[str] = []
        self.routes = [
            ("POST", self.host, r"/api/repos/create", self._create_repo),
            ("GET", self.host, r"/api/agent-harnesses", self._agent_harnesses),
            ("POST", self.host, r"/api/validate-yaml", self._validate_yaml),
            ("POST", self.host, rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", self.host, rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", self.host, rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", self.host, rf"/{_REPO}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("HEAD", self.host, rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ("GET", self.host, rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ("PUT", STORAGE_HOST, r"/(?P<oid>[0-9a-f]{64})", self._storage_put),
        ]

    # ------------------------------------------------------------------ wiring
    def install(self) -> "FakeHub":
        """Route every ``huggingface_hub`` request (sync and async clients) to this server; undo with
        :meth:`uninstall`."""

        def client_factory() -> httpx2.Client:
            # the same hooks as huggingface_hub's default client (offline check, request id), another transport
            return httpx2.Client(transport=httpx2.MockTransport(self.handle),
                                 event_hooks={"request": [_http.hf_request_event_hook]},
                                 follow_redirects=True, timeout=None)

        def async_client_factory() -> httpx2.AsyncClient:
            return httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle),
                                      event_hooks={"request": [_http.async_hf_request_event_hook]},
                                      follow_redirects=True, timeout=None)

        self._previous = (_http._GLOBAL_CLIENT_FACTORY, _http._GLOBAL_ASYNC_CLIENT_FACTORY)
        _http.set_client_factory(client_factory)  # also closes the shared client made by the previous one
        _http.set_async_client_factory(async_client_factory)
        return self

    def uninstall(self) -> None:
        sync_factory, async_factory = self._previous
        _http.set_client_factory(sync_factory)
        _http.set_async_client_factory(async_factory)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        url = str(request.url)
        self.log.append((request.method, url))
        for method, host, pattern, route in self.routes:
            if request.method != method or request.url.host != host:
                continue
            match = re.fullmatch(pattern, unquote(request.url.path))
            if match is None:
                continue
            if host == self.host and route != self._agent_harnesses:  # that one is sent without a token
                self._check_auth(request)
            elif host == STORAGE_HOST and "authorization" in request.headers:
                self._fail(request, "the Hub token was sent to the LFS storage host")
            return route(request, **match.groupdict())
        self._fail(request, "no route")

    def _fail(self, request: httpx2.Request, why: str):
        message = f"unexpected request to the fake Hub ({why}): {request.method} {request.url}"
        self.unexpected.append(message)
        raise UnexpectedRequest(message)

    def _check_auth(self, request: httpx2.Request) -> None:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            self._fail(request, f"bad Authorization header {request.headers.get('authorization')!r}")

    # ------------------------------------------------------------------ helpers
    def _repo(self, repo: str) -> Repo | None:
        return self.repos.get(repo)

    @staticmethod
    def _error(status: int, code: str | None, message: str) -> httpx2.Response:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return httpx2.Response(status, headers=headers, json={"error": message})

    def _upload_mode(self, path: str, size: int) -> str:
        if self.upload_mode == "regular" or size == 0:
            return "regular"
        if self.upload_mode == "lfs":
            return "lfs"
        return "lfs" if path.endswith(LFS_SUFFIXES) or size >= 10 * 2**20 else "regular"

    # ------------------------------------------------------------------ routes
    def _create_repo(self, request):
        body = json.loads(request.content)
        if body.get("type", "model") != "model":
            self._fail(request, f"only model repos are served, got type={body.get('type')!r}")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        if repo_id in self.repos:
            return httpx2.Response(409, json={"error": "You already created this model repo",
                                              "url": f"{self.endpoint}/{repo_id}"})
        self.repos[repo_id] = Repo(repo_id, private=None if "visibility" not in body else body["visibility"] == "private")
        return httpx2.Response(200, json={"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _agent_harnesses(self, request):
        return httpx2.Response(200, json={"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, request):
        body = json.loads(request.content)
        if not isinstance(body.get("content"), str) or body.get("repoType") != "model":
            return httpx2.Response(400, json={"errors": [{"message": "bad request"}], "warnings": []})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _resolve(self, request, repo, rev, path):
        if self._repo(repo) is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if path in self.repos[repo].files:
            self._fail(request, "serving existing files is not implemented")
        return self._error(404, "EntryNotFound", "Entry not found")

    def _preupload(self, request, repo, rev):
        if self._repo(repo) is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        body = json.loads(request.content)
        files = []
        for entry in body["files"]:
            sample = base64.b64decode(entry["sample"])
            assert len(sample) <= 512 and isinstance(entry["size"], int), entry["path"]
            files.append({"path": entry["path"], "uploadMode": self._upload_mode(entry["path"], entry["size"]),
                          "shouldIgnore": False, "oid": None})
        return httpx2.Response(200, json={"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, request, repo):
        if self._repo(repo) is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if "application/vnd.git-lfs+json" not in request.headers.get("accept", ""):
            self._fail(request, "LFS batch request without the git-lfs Accept header")
        body = json.loads(request.content)
        assert body["operation"] == "upload" and body["hash_algo"] == "sha256" and "basic" in body["transfers"]
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_blobs:  # already stored: no actions, the client skips the upload
                entry["actions"] = {
                    "upload": {"href": f"https://{STORAGE_HOST}/{oid}"},
                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify",
                               "header": {"Authorization": f"Bearer {self.token}"}},
                }
            objects.append(entry)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects},
                               headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _storage_put(self, request, oid):
        data = request.content
        if hashlib.sha256(data).hexdigest() != oid:
            return httpx2.Response(400, text="sha256 mismatch")
        self.lfs_blobs[oid] = data
        return httpx2.Response(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, request, repo):
        body = json.loads(request.content)
        blob = self.lfs_blobs.get(body["oid"])
        if blob is None or len(blob) != body["size"]:
            return httpx2.Response(422, json={"error": "object not found or wrong size"})
        self.lfs_verified.add(body["oid"])
        return httpx2.Response(200, json={"success": True})

    def _commit(self, request, repo, rev):
        target = self._repo(repo)
        if target is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if request.headers.get("content-type") != "application/x-ndjson":
            self._fail(request, f"commit with Content-Type {request.headers.get('content-type')!r}")
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return httpx2.Response(400, json={"error": "the first NDJSON line must be the header"})
        header = lines[0]["value"]
        files, kinds = {}, {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                assert value["encoding"] == "base64"
                files[path] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                assert value["algo"] == "sha256"
                blob = self.lfs_blobs.get(value["oid"])
                if blob is None or value["oid"] not in self.lfs_verified or len(blob) != value["size"]:
                    return httpx2.Response(422, json={"error": f"LFS object for {path} was not uploaded"})
                files[path] = blob
            else:
                self._fail(request, f"commit operation {key!r} is not implemented")
            kinds[path] = key
        digest = hashlib.sha1(request.content).hexdigest()
        commit = Commit(repo, unquote(rev), header["summary"], header.get("description", ""), digest, files, kinds)
        target.commits.append(commit)
        target.files.update(files)
        return httpx2.Response(200, json={"commitUrl": f"{self.endpoint}/{repo}/commit/{digest}",
                                          "commitOid": digest, "pullRequestUrl": None})

    # ------------------------------------------------------------------ summaries for tests
    def endpoints_seen(self) -> list[str]:
        """``METHOD path-pattern`` of the requests made, in first-seen order (repo and oids elided)."""
        seen = []
        for method, url in self.log:
            parts = urlsplit(url)
            path = re.sub(r"[0-9a-f]{64}", "{oid}", unquote(parts.path))
            for repo in self.repos:
                path = path.replace(repo, "{repo}")
            item = f"{method} {parts.hostname}{path}"
            if item not in seen:
                seen.append(item)
        return seen
