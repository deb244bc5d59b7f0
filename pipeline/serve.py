"""`vmr serve`: a local web page to pick (or upload) a video, type queries and play the moments found.

FastAPI + one static page (pipeline/static/serve.html, plain JS), not Gradio: the page needs a
file list, a text box, a table and a <video>, which a small page does in a few hundred lines, while
Gradio brings a large front-end bundle, version churn and a component model around one predict
call. Starlette's FileResponse answers HTTP Range requests, so the <video> element can seek.

The page works offline: no script, font or style comes from another host.

Routes (JSON unless noted):
  GET  /                          the page
  GET  /api/info                  model, checkpoint, task
  GET  /api/videos                the videos to pick: [{id, name, source, size, url}]
  POST /api/upload                multipart `file` -> the stored video's entry, with `reused`
  POST /api/predict               {video: id, queries: [str] | str (one per line), top_k} -> records
  GET  /api/thumbnail?video=&t=   a JPEG frame at t seconds
  GET  /videos/{id}               the video file (Range requests answered: 206)

Safety (the page is for one user on one machine, but any web page that user opens can send it requests):
  - the Host header must name this machine (127.0.0.1, localhost, ::1) or --host / --allow-host:
    Starlette's TrustedHostMiddleware, against DNS rebinding;
  - an upload or prediction whose Origin header names another site is refused (403): another page's
    form or script cannot post a file or run the model;
  - an upload never replaces a file: the same bytes again reuse the stored file, other bytes under
    a taken name get a content-hash suffix; its size is capped (--max-upload-mb, 413), and a refused
    upload leaves nothing in the upload folder.

A video id is `<source>/<path>`: source `folder` is --video-dir (searched recursively), `upload` the
folder uploads are written to. Ids are checked to stay inside their folder: `..`, absolute paths
and links that leave it are refused (400), unknown ones are 404.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.core.atomic import TMP_PREFIX, temporary_prefix
from pipeline.core.errors import VmrError
from pipeline.media.decode import VIDEO_EXTENSIONS

PAGE = Path(__file__).with_name("static") / "serve.html"
# what a video id's first part names, in messages
PLACES = {"folder": "--video-dir", "upload": "the upload folder"}
MAX_QUERIES = 50
UPLOAD_CHUNK = 1 << 20
MAX_UPLOAD_MB = 2048
# the names of this machine a browser may put in the Host header
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Predicts(Protocol):
    """What the page needs of `pipeline.predict.Predictor`."""

    model_name: str
    checkpoint_sha256: str
    task: str

    def predict(self, video_path, queries: list[str], top_k: int = 5) -> list[dict]: ...

    def thumbnail(self, video_path, seconds: float, width: int = 160) -> bytes: ...


class PredictRequest(BaseModel):
    video: str = Field(description="a video id from /api/videos")
    queries: list[str] | str = Field(description="queries, or one text with one query per line")
    top_k: int = Field(5, ge=1, le=100)


@dataclass
class Library:
    """The videos the page offers: a folder to pick from (optional) and a folder for uploads."""

    video_dir: Path | None
    upload_dir: Path

    def roots(self) -> dict[str, Path]:
        roots = {"folder": self.video_dir} if self.video_dir is not None else {}
        return {**roots, "upload": self.upload_dir}

    def entries(self) -> list[dict]:
        out = []
        for source, root in self.roots().items():
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if is_video_name(path.name) and path.is_file() and not any(p.startswith(".") for p in rel.parts):
                    out.append(self.entry(source, rel.as_posix(), path))
        return out

    def entry(self, source: str, rel: str, path: Path) -> dict:
        vid = f"{source}/{rel}"
        return {"id": vid, "name": rel, "source": source, "size": path.stat().st_size,
                "url": "/videos/" + quote(vid)}

    def resolve(self, vid: str) -> Path:
        """The file of video id `vid`; HTTPException 400 for a path leaving its folder, 404 if unknown."""
        source, _, rel = vid.partition("/")
        roots = self.roots()
        if source not in roots:
            raise HTTPException(404, f"unknown video {vid!r}: ids start with one of "
                                     f"{', '.join(s + '/' for s in roots)} (see /api/videos)")
        outside = HTTPException(400, f"video {vid!r}: the name must be a path inside {PLACES[source]}")
        if not rel or rel.startswith("/") or "\\" in rel or ".." in PurePosixPath(rel).parts:
            raise outside
        root = roots[source].resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):  # a symbolic link that points out of the folder
            raise outside
        if not (path.is_file() and is_video_name(path.name)):
            raise HTTPException(404, f"unknown video {vid!r}: no such video in {PLACES[source]} (see /api/videos)")
        return path


def is_video_name(name: str) -> bool:
    """What the pipeline decodes. A browser plays fewer (the page says so); their moments are found anyway."""
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(TMP_PREFIX)


def upload_name(filename: str | None) -> str:
    """A safe file name for an upload: the base name, with characters other than [A-Za-z0-9._-] as _."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    if not is_video_name(safe):
        raise HTTPException(400, f"upload {filename!r}: not a video file name; expected one of "
                                 f"{', '.join(VIDEO_EXTENSIONS)}")
    return safe


def split_queries(queries: list[str] | str) -> list[str]:
    lines = queries.splitlines() if isinstance(queries, str) else queries
    cleaned = [q.strip() for q in lines if q.strip()]
    if not cleaned:
        raise HTTPException(422, "no query: type at least one (one per line)")
    if len(cleaned) > MAX_QUERIES:
        raise HTTPException(422, f"{len(cleaned)} queries: at most {MAX_QUERIES} per request")
    return cleaned


def check_upload_dir(video_dir: Path | None, upload_dir: Path | None) -> None:
    """Refuse an upload folder that is --video-dir or inside it: uploads would mix with (and be
    listed twice beside) the user's own videos."""
    if video_dir is None or upload_dir is None:
        return
    if upload_dir.resolve().is_relative_to(video_dir.resolve()):
        raise VmrError(f"--upload-dir {upload_dir} is inside --video-dir {video_dir}: uploads must not "
                       "mix with the videos offered; give an upload folder outside it")


def other_site(request: Request) -> str | None:
    """Why a request was sent by another site's page (its Origin header names that site), else None.
    Requests without Origin (curl, a same-origin GET) pass: browsers send it on every cross-site POST."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin is not None and origin.lower() != own.lower():
        return f"request from {origin} refused: only this page ({own}) may upload or find moments"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def store_upload(tmp: Path, folder: Path, name: str, sha256: str) -> tuple[str, bool]:
    """Give the finished upload `tmp` a name in `folder` without ever replacing a file; returns the
    name and whether it is a file already there (the caller then drops tmp).

    `name` if free; the file already there if it has the same bytes; otherwise
    `<stem>-<sha256 prefix><suffix>`, longer prefixes on the (unlikely) clash of a short one.
    os.link fails on an existing name, so two uploads at once cannot replace each other either."""
    stem, suffix = os.path.splitext(name)
    for candidate in [name] + [f"{stem}-{sha256[:n]}{suffix}" for n in (8, 16, 64)]:
        dest = folder / candidate
        try:
            os.link(tmp, dest)
            return candidate, False
        except FileExistsError:
            if dest.is_file() and file_sha256(dest) == sha256:
                return candidate, True
    raise HTTPException(409, f"upload {name!r}: every name for it is taken by other content")


class CapUploadBody:
    """ASGI middleware: stop reading an upload's body past `limit` bytes. A larger declared
    Content-Length is refused at once; a body without one is cut off while it streams (the
    HTTPException raised from `receive` reaches FastAPI's form parsing, which answers it)."""

    def __init__(self, app, limit: int, refusal: str):
        self.app, self.limit, self.refusal = app, limit, refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/api/upload":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": self.refusal}, status_code=413)(scope, receive, send)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.refusal)
            return message

        await self.app(scope, capped_receive, send)


def create_app(predictor: Predicts, video_dir: Path | None = None, upload_dir: Path | None = None,
               checkpoint: str | None = None, host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = (),
               max_upload_mb: float = MAX_UPLOAD_MB) -> FastAPI:
    """The web app around one loaded predictor. Without `upload_dir`, uploads go to a temporary
    folder that lives as long as the app. Requests must name this machine, `host` or one of
    `allow_hosts` in their Host header."""
    if video_dir is not None and not video_dir.is_dir():
        raise VmrError(f"--video-dir {video_dir}: no such folder")
    check_upload_dir(video_dir, upload_dir)
    if max_upload_mb <= 0:
        raise VmrError(f"--max-upload-mb {max_upload_mb}: must be positive")
    max_upload_bytes = int(max_upload_mb * (1 << 20))
    if predictor.task != "grounding":
        raise VmrError(f"model '{predictor.model_name}' ranks whole videos ({predictor.task}); the page shows "
                       "moments of a grounding model")
    keep_alive: list[Any] = []
    if upload_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vmr-serve-uploads-")
        keep_alive.append(tmp)
        upload_dir = Path(tmp.name)
    upload_dir.mkdir(parents=True, exist_ok=True)
    library = Library(video_dir, upload_dir)
    # One prediction at a time: a model on one device gains nothing from parallel calls, and the
    # predictor's feature cache is not written by two threads at once.
    predict_lock = threading.Lock()

    app = FastAPI(title="vmr serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.library, app.state.keep_alive = library, keep_alive
    too_large = f"upload refused: larger than {max_upload_mb:g} MB (--max-upload-mb)"
    # the multipart headers around the file get one chunk of room; the file itself is capped exactly below
    app.add_middleware(CapUploadBody, limit=max_upload_bytes + UPLOAD_CHUNK, refusal=too_large)

    @app.middleware("http")  # outside the cap: another site's upload is refused before its body is read
    async def refuse_other_sites(request: Request, call_next):
        """Another site's form or script must not store a file or run the model."""
        if request.method == "POST" and request.url.path in ("/api/upload", "/api/predict"):
            if refusal := other_site(request):
                return JSONResponse({"detail": refusal}, status_code=403)
        return await call_next(request)

    # added last, so it runs first: a request for another host name is refused before anything else
    # an IPv6 address arrives in brackets ([::1]:7860); a name or IPv4 address as given
    hosts = {f"[{h}]" if ":" in h else h for h in (h.strip("[]").lower() for h in (*LOCAL_HOSTS, host, *allow_hosts))}
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted(hosts))

    @app.exception_handler(VmrError)
    def bad_input(request, exc: VmrError):  # a video the predictor cannot read, a query it refuses
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/info")
    def info():
        return {"model": predictor.model_name, "task": predictor.task, "checkpoint": checkpoint,
                "checkpoint_sha256": predictor.checkpoint_sha256,
                "video_dir": str(video_dir) if video_dir is not None else None}

    @app.get("/api/videos")
    def videos():
        return library.entries()

    @app.post("/api/upload")
    def upload(file: UploadFile = File(...)):
        name = upload_name(file.filename)
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(name), dir=upload_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := file.file.read(UPLOAD_CHUNK):
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise HTTPException(413, too_large)
                    out.write(chunk)
                    digest.update(chunk)
                os.fsync(out.fileno())
            if size == 0:
                raise HTTPException(400, f"upload {file.filename!r}: the file is empty")
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the user's other files can read theirs
            stored, reused = store_upload(tmp, upload_dir, name, digest.hexdigest())
        finally:
            tmp.unlink(missing_ok=True)  # linked under its name, or not wanted
        return {**library.entry("upload", stored, upload_dir / stored), "reused": reused}

    @app.post("/api/predict")
    def predict(req: PredictRequest):
        path = library.resolve(req.video)
        queries = split_queries(req.queries)
        with predict_lock:
            records = predictor.predict(path, queries, top_k=req.top_k)
        return {"video": req.video, "url": "/videos/" + quote(req.video), "records": records}

    @app.get("/api/thumbnail")
    def thumbnail(video: str, t: float = Query(ge=0)):
        path = library.resolve(video)
        with predict_lock:
            jpeg = predictor.thumbnail(path, t)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/videos/{vid:path}")
    def video_file(vid: str):
        return FileResponse(library.resolve(vid))  # answers Range requests (206) for seeking

    return app
