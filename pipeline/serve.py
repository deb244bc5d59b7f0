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
  POST /api/upload                multipart `file` -> the new video's entry
  POST /api/predict               {video: id, queries: [str] | str (one per line), top_k} -> records
  GET  /api/thumbnail?video=&t=   a JPEG frame at t seconds
  GET  /videos/{id}               the video file (Range requests answered: 206)

A video id is `<source>/<path>`: source `folder` is --video-dir (searched recursively), `upload` the
folder uploads are written to. Ids are checked to stay inside their folder: `..`, absolute paths
and links that leave it are refused (400), unknown ones are 404.
"""

from __future__ import annotations

import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from pipeline.core.atomic import TMP_PREFIX, atomic_path
from pipeline.core.errors import VmrError
from pipeline.media.decode import VIDEO_EXTENSIONS

PAGE = Path(__file__).with_name("static") / "serve.html"
# what a video id's first part names, in messages
PLACES = {"folder": "--video-dir", "upload": "the upload folder"}
MAX_QUERIES = 50
UPLOAD_CHUNK = 1 << 20


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


def create_app(predictor: Predicts, video_dir: Path | None = None, upload_dir: Path | None = None,
               checkpoint: str | None = None) -> FastAPI:
    """The web app around one loaded predictor. Without `upload_dir`, uploads go to a temporary
    folder that lives as long as the app."""
    if video_dir is not None and not video_dir.is_dir():
        raise VmrError(f"--video-dir {video_dir}: no such folder")
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
        dest = upload_dir / name
        size = 0
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            while chunk := file.file.read(UPLOAD_CHUNK):
                out.write(chunk)
                size += len(chunk)
            if size == 0:
                raise HTTPException(400, f"upload {file.filename!r}: the file is empty")
        return library.entry("upload", name, dest)

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
