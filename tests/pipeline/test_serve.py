"""`vmr serve`'s HTTP API without a browser (FastAPI's TestClient): listing, upload, predict, Range
requests, and bad input answered 4xx with a message. The page in a real browser:
tests/pipeline/test_serve_browser.py.

Routes that must not run the model (files, listing, uploads, input checks) are tested fast, on an app
whose model refuses to be called. Prediction is tested on a real checkpoint (the tiny MMN trained
through the CLI by the `project` fixture, tests/support/trained.py) with the real Predictor; making it
takes a minute or more, so those tests are slow."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket

import pytest
from fastapi.testclient import TestClient
from support.videos import write_video
from typer.testing import CliRunner

from pipeline.cli import app as cli
from pipeline.core.errors import VmrError
from pipeline.serve import create_app


class NoModel:
    """The app's model where a route must not touch it: any call fails the test."""

    model_name, checkpoint_sha256, task = "mmn", "0" * 64, "grounding"

    def predict(self, *args, **kwargs):
        raise AssertionError("this route must not run the model")

    thumbnail = predict


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The videos the page offers: two the model has not seen, one in a subfolder, and things to skip."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a.mp4", frames=90, fps=15)
    (root / "sub").mkdir()
    write_video(root / "sub" / "b.mp4", frames=60, fps=15)
    (root / "notes.txt").write_text("not a video")
    write_video(root / ".hidden.mp4", frames=10)
    return root


PAGE = "http://127.0.0.1:7860"  # the page's own origin, as a browser on this machine sends it


def make_client(predictor, folder, uploads, **options):
    client = TestClient(create_app(predictor, video_dir=folder, upload_dir=uploads, checkpoint="best.pt", **options),
                        base_url=PAGE)
    client.uploads = uploads
    return client


@pytest.fixture(scope="module")
def client(folder, tmp_path_factory):
    with make_client(NoModel(), folder, tmp_path_factory.mktemp("uploads")) as c:
        yield c


@pytest.fixture(scope="module")
def real(folder, tiny_predictor, tmp_path_factory):
    with make_client(tiny_predictor, folder, tmp_path_factory.mktemp("uploads")) as c:
        yield c


@pytest.mark.slow
def test_info_names_the_model_and_checkpoint(real, tiny_predictor):
    info = real.get("/api/info").json()
    assert info["model"] == tiny_predictor.model_name == "mmn"
    assert info["task"] == "grounding"
    assert info["checkpoint_sha256"] == tiny_predictor.checkpoint_sha256


def test_the_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # works offline: no script, style, font or image from another host
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page.text)
    for element_id in ("videos", "upload", "queries", "submit", "player", "results"):
        assert f'id="{element_id}"' in page.text


def test_lists_the_videos_of_the_folder(client):
    videos = client.get("/api/videos").json()
    assert [v["id"] for v in videos if v["source"] == "folder"] == ["folder/a.mp4", "folder/sub/b.mp4"]
    a = videos[[v["id"] for v in videos].index("folder/a.mp4")]
    assert a["url"] == "/videos/folder/a.mp4" and a["size"] > 0


@pytest.mark.slow
def test_predict_returns_ranked_moments_inside_the_video(real, tiny_predictor, folder):
    response = real.post("/api/predict", json={"video": "folder/a.mp4",
                                                  "queries": "a person opens a door\n\n  someone sits down  \n",
                                                  "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"] == "/videos/folder/a.mp4"
    records = body["records"]
    assert [r["query"] for r in records] == ["a person opens a door", "someone sits down"]
    # the same answer as the Python API gives for that file
    assert records == tiny_predictor.predict(folder / "a.mp4", ["a person opens a door", "someone sits down"], top_k=3)
    for r in records:
        assert abs(r["duration"] - 6.0) < 0.2  # 90 frames at 15 fps
        assert 1 <= len(r["moments"]) <= 3
        for m in r["moments"]:
            assert 0 <= m["start"] < m["end"] <= r["duration"] + 1e-6
        scores = [m["score"] for m in r["moments"]]
        assert scores == sorted(scores, reverse=True)


def test_the_video_answers_range_requests(client, folder):
    data = (folder / "a.mp4").read_bytes()
    whole = client.get("/videos/folder/a.mp4")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    part = client.get("/videos/folder/a.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert part.content == data[100:200]
    tail = client.get("/videos/folder/sub/b.mp4", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == (folder / "sub" / "b.mp4").read_bytes()[-50:]
    past_the_end = client.get("/videos/folder/a.mp4", headers={"Range": f"bytes={len(data) + 10}-"})
    assert past_the_end.status_code == 416


@pytest.mark.slow
def test_thumbnail_is_a_jpeg(real):
    response = real.get("/api/thumbnail", params={"video": "folder/a.mp4", "t": 2.0})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content[:3] == b"\xff\xd8\xff"


def upload(client, folder) -> dict:
    data = (folder / "sub" / "b.mp4").read_bytes()
    response = client.post("/api/upload", files={"file": ("../../my clip.mp4", data, "video/mp4")})
    assert response.status_code == 200, response.text
    entry = response.json()
    # the name is reduced to a safe base name inside the upload folder
    assert entry["id"] == "upload/my_clip.mp4" and (client.uploads / "my_clip.mp4").read_bytes() == data
    assert not leftovers(client.uploads)
    assert entry["id"] in [v["id"] for v in client.get("/api/videos").json()]
    assert client.get(entry["url"]).content == data
    return entry


def test_upload_is_listed_and_served(client, folder):
    upload(client, folder)


@pytest.mark.slow
def test_upload_then_predict_on_it(real, folder):
    entry = upload(real, folder)
    records = real.post("/api/predict", json={"video": entry["id"], "queries": ["a person walks"]}).json()["records"]
    assert abs(records[0]["duration"] - 4.0) < 0.2 and records[0]["moments"]


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"hello", "not a video file name"),
    ("empty.mp4", b"", "the file is empty"),
])
def test_upload_refuses_what_is_not_a_video(client, name, content, message):
    response = client.post("/api/upload", files={"file": (name, content)})
    assert response.status_code == 400 and message in response.json()["detail"]
    assert not any(p.name.startswith(".tmp-") or p.name == name for p in client.uploads.iterdir())


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_an_upload_never_replaces_a_file(folder, tmp_path):
    first, other = (folder / "a.mp4").read_bytes(), (folder / "sub" / "b.mp4").read_bytes()
    uploads = tmp_path / "uploads"
    with make_client(NoModel(), folder, uploads) as client:
        def send(name, data):
            response = client.post("/api/upload", files={"file": (name, data, "video/mp4")})
            assert response.status_code == 200, response.text
            return response.json()

        assert send("a b.mp4", first) | {"size": 0} == {
            "id": "upload/a_b.mp4", "name": "a_b.mp4", "source": "upload", "size": 0,
            "url": "/videos/upload/a_b.mp4", "reused": False}
        # another file whose name cleans to the same one: stored beside it under a content-hash suffix
        clash = send("a_b.mp4", other)
        suffix = hashlib.sha256(other).hexdigest()[:8]
        assert clash["id"] == f"upload/a_b-{suffix}.mp4" and not clash["reused"]
        # the same bytes again, under either name: the stored file is reused, nothing new is written
        assert send("a_b.mp4", first)["id"] == "upload/a_b.mp4" and send("a_b.mp4", first)["reused"]
        assert send("a_b.mp4", other)["id"] == clash["id"]
        assert {p.name: p.read_bytes() for p in uploads.iterdir()} == {"a_b.mp4": first, f"a_b-{suffix}.mp4": other}
        assert client.get(clash["url"]).content == other


@pytest.mark.parametrize("inside", ["", "sub", "sub/deeper"])
def test_an_upload_dir_inside_the_video_dir_is_refused(folder, inside, some_file):
    uploads = folder / inside if inside else folder
    with pytest.raises(VmrError, match="is inside --video-dir"):
        create_app(NoModel(), video_dir=folder, upload_dir=uploads)
    result = CliRunner().invoke(cli, ["serve", "--model", "mmn", "--checkpoint", str(some_file),
                                      "--video-dir", str(folder), "--upload-dir", str(uploads)])
    assert result.exit_code == 2, result.output
    assert f"--upload-dir {uploads} is inside --video-dir {folder}" in " ".join(result.output.split())
    assert not (folder / "sub" / "deeper").exists()


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:7860", True), ("localhost:7860", True), ("[::1]:7860", True), ("LOCALHOST", True),
    ("evil.example.com", False), ("evil.example.com:7860", False), ("127.0.0.1.evil.example.com", False),
    ("studio.lan:7860", True),  # --allow-host
    ("192.168.1.5:7860", True),  # --host
])
def test_only_this_machines_host_names_are_answered(folder, tmp_path, host, allowed):
    with make_client(NoModel(), folder, tmp_path, host="192.168.1.5", allow_hosts=("studio.lan",)) as client:
        response = client.get("/api/videos", headers={"Host": host})
    assert response.status_code == (200 if allowed else 400), response.text
    if not allowed:
        assert "Invalid host header" in response.text


def test_another_sites_page_cannot_upload_or_run_the_model(client, folder):
    data = (folder / "a.mp4").read_bytes()
    before = sorted(p.name for p in client.uploads.iterdir())
    for origin in ("http://evil.example.com", "null", "http://127.0.0.1:9999", "https://127.0.0.1:7860"):
        response = client.post("/api/upload", files={"file": ("cross.mp4", data)}, headers={"Origin": origin})
        assert response.status_code == 403, origin
        assert f"request from {origin} refused" in response.json()["detail"]
        response = client.post("/api/predict", json={"video": "folder/a.mp4", "queries": "x"}, headers={"Origin": origin})
        assert response.status_code == 403, origin  # and NoModel was not called
    assert sorted(p.name for p in client.uploads.iterdir()) == before
    # refused before the body is read
    sent = []

    def body():
        sent.append(1)
        yield multipart("cross.mp4", data)

    response = client.post("/api/upload", content=body(), headers={
        "Origin": "http://evil.example.com", "Content-Type": "multipart/form-data; boundary=vmrboundary"})
    assert response.status_code == 403 and sent == []
    # the page's own origin is fine
    response = client.post("/api/upload", files={"file": ("own.mp4", data)}, headers={"Origin": PAGE})
    assert response.status_code == 200 and response.json()["id"] == "upload/own.mp4"


def multipart(name: str, data: bytes, boundary: str = "vmrboundary") -> bytes:
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


async def post_in_pieces(app, path: str, headers: dict, pieces) -> tuple[int, dict]:
    """POST to an ASGI app a body without Content-Length, one `http.request` message per piece."""
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
             "root_path": "", "scheme": "http", "query_string": b"", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 7860),
             "headers": [(b"host", b"127.0.0.1:7860"), *((k.lower().encode(), v.encode()) for k, v in headers.items())]}
    pieces, replies = iter(pieces), []

    async def receive():
        piece = next(pieces, None)
        return {"type": "http.request", "body": piece or b"", "more_body": piece is not None}

    async def send(message):
        replies.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body")
    return replies[0]["status"], json.loads(body)


def test_an_upload_over_the_cap_is_refused_and_leaves_nothing(folder, tmp_path):
    uploads = tmp_path / "uploads"
    cap_mb = 0.01  # 10,485 bytes
    with make_client(NoModel(), folder, uploads, max_upload_mb=cap_mb) as client:
        def refused(response=None, status=None, body=None):
            status, body = (response.status_code, response.json()) if response is not None else (status, body)
            assert status == 413, body
            assert "larger than 0.01 MB (--max-upload-mb)" in body["detail"]
            assert list(uploads.iterdir()) == []

        # a file just over the cap, in a body small enough to be read: refused while it is copied
        refused(client.post("/api/upload", files={"file": ("big.mp4", b"x" * 10_486)}))
        body = multipart("huge.mp4", b"x" * (3 << 20))
        sent = []

        def stream():  # the body in 64 KiB pieces, counting what the server pulled
            for i in range(0, len(body), 65536):
                sent.append(i)
                yield body[i:i + 65536]

        form = {"Content-Type": "multipart/form-data; boundary=vmrboundary"}
        # a body declared larger than the cap: refused before it is read
        refused(client.post("/api/upload", content=stream(), headers={**form, "Content-Length": str(len(body))}))
        assert len(sent) <= 1
        assert sent == []  # (TestClient reads a body whole on the first receive: nothing was asked)
        # a streamed body with no declared length: cut off once past the cap (+ 1 MiB for the multipart
        # headers). TestClient hands the app a body whole, so the app is driven as a server does, in pieces.
        status, reply = asyncio.run(post_in_pieces(client.app, "/api/upload", form, stream()))
        refused(status=status, body=reply)
        assert 16 < len(sent) < 20  # 1.01 MiB in 64 KiB pieces, of 49
        exact = client.post("/api/upload", files={"file": ("fits.mp4", b"x" * 10_485)})
        assert exact.status_code == 200 and (uploads / "fits.mp4").stat().st_size == 10_485
    assert not leftovers(uploads)


@pytest.mark.parametrize("request_json, status, message", [
    ({"video": "folder/a.mp4", "queries": "  \n \n"}, 422, "no query"),
    ({"video": "folder/a.mp4", "queries": []}, 422, "no query"),
    ({"video": "folder/missing.mp4", "queries": "x"}, 404, "unknown video 'folder/missing.mp4'"),
    ({"video": "elsewhere/a.mp4", "queries": "x"}, 404, "ids start with one of"),
    ({"video": "folder/../../etc/passwd", "queries": "x"}, 400, "must be a path inside --video-dir"),
    ({"video": "folder//etc/passwd", "queries": "x"}, 400, "must be a path inside"),
    ({"video": "folder/notes.txt", "queries": "x"}, 404, "no such video"),
    ({"video": "folder/a.mp4", "queries": "x", "top_k": 0}, 422, "top_k"),
])
def test_predict_refuses_bad_input_with_a_message(client, request_json, status, message):
    response = client.post("/api/predict", json=request_json)
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])


def test_video_files_stay_inside_their_folder(client, folder, tmp_path):
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"not yours")
    (folder / "link.mp4").symlink_to(secret)
    try:
        for url in ("/videos/folder/..%2F..%2Fetc%2Fpasswd", "/videos/folder/%2E%2E/%2E%2E/etc/passwd",
                    "/videos/folder/link.mp4"):
            response = client.get(url)
            assert response.status_code == 400, url
            assert "must be a path inside --video-dir" in response.json()["detail"]
        assert client.get("/videos/folder/missing.mp4").status_code == 404
    finally:
        (folder / "link.mp4").unlink()


@pytest.mark.slow
def test_a_video_the_predictor_cannot_read_is_a_400(real, folder):
    (folder / "broken.mp4").write_bytes(b"\x00" * 1000)
    try:
        response = real.post("/api/predict", json={"video": "folder/broken.mp4", "queries": "x"})
        assert response.status_code == 400, response.text
        assert "broken.mp4" in response.json()["detail"]
    finally:
        (folder / "broken.mp4").unlink()


# -- the command ------------------------------------------------------------------------------------


def test_a_retrieval_model_is_refused(folder):
    retrieval = NoModel()
    retrieval.model_name, retrieval.task = "glscl", "retrieval"
    with pytest.raises(VmrError, match="'glscl' ranks whole videos"):
        create_app(retrieval, video_dir=folder)


# The command checks its input and binds the port before it loads the model: no trained one needed.


@pytest.fixture
def some_file(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"never loaded")
    return path


def test_serve_without_a_checkpoint_is_one_error_line(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--model", "mmn", "--checkpoint", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2
    assert "nope.pt" in result.output and "not found" in result.output


def test_serve_on_a_busy_port_is_one_error_line(some_file):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--model", "mmn", "--checkpoint", str(some_file),
                                          "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_serve_refuses_a_missing_video_dir(tmp_path, some_file):
    result = CliRunner().invoke(cli, ["serve", "--model", "mmn", "--checkpoint", str(some_file),
                                      "--video-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "--video-dir" in result.output and "no such folder" in result.output
