"""`vmr serve`'s HTTP API without a browser (FastAPI's TestClient): listing, upload, predict, Range
requests, and bad input answered 4xx with a message. The page in a real browser:
tests/pipeline/test_serve_browser.py.

Routes that must not run the model (files, listing, uploads, input checks) are tested fast, on an app
whose model refuses to be called. Prediction is tested on a real checkpoint (the tiny MMN trained
through the CLI by the `project` fixture, tests/support/trained.py) with the real Predictor; making it
takes a minute or more, so those tests are slow."""

from __future__ import annotations

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


def make_client(predictor, folder, uploads):
    client = TestClient(create_app(predictor, video_dir=folder, upload_dir=uploads, checkpoint="best.pt"))
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
    assert not [p.name for p in client.uploads.iterdir() if p.name.startswith(".tmp-")]
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
