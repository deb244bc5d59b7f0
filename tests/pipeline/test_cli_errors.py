"""Bad input through the command a user types: every documented failure kind gives exit code 2, one
`error:` line naming the file, line or key, and no traceback (docs/failures.md lists them all).

Commands run in-process through the same Typer group as the `vmr` console script, so the error
reporting under test is the one users get.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
from support.toy import write_toy_params
from support.videos import write_video
from typer.testing import CliRunner

from models import MODELS
from pipeline.cli import app

REPO = Path(__file__).resolve().parents[2]


def vmr(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"vmr {' '.join(map(str, args))} -> {result.exit_code}:\n{result.output}"
    return result.output


def vmr_fails(*args: str, names: tuple[str, ...] = ()) -> str:
    """Run a command that must fail cleanly; return its error line."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 2, f"vmr {' '.join(map(str, args))} -> {result.exit_code}:\n{output}"
    assert "Traceback" not in output, output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    return errors[0]


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A params file for a tiny MMN on toy features (no video needed)."""
    return write_toy_params(tmp_path, select_split=None)


# -- params ----------------------------------------------------------------------------------------


def test_params_errors_name_the_file_or_key(tmp_path, toy):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    vmr_fails("train", "--model", "mmn", "-p", empty, names=(str(empty), "empty"))
    vmr_fails("train", "--model", "mmn", "-p", tmp_path / "nope.yaml", names=("nope.yaml", "not found"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 0  # caf\xe9\n".encode("latin-1"))
    vmr_fails("train", "--model", "mmn", "-p", latin1, names=(str(latin1), "UTF-8"))
    vmr_fails("train", "--model", "nosuch", "-p", toy, names=("nosuch", "mmn"))
    vmr_fails("train", "--model", "mmn", "-p", toy, "--set", "merge.dtype=[unclosed",
              names=("merge.dtype=[unclosed", "YAML"))
    vmr_fails("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.epochs=0", names=("model.mmn.epochs",))
    # a moved key names its new place
    vmr_fails("decode", "-p", toy, "--set", "decode.video_dir=videos", names=("decode.video_dir", "dataset.video_dir"))


@pytest.mark.parametrize("model", ["mmn", "mesm", "cnm", "mrnet", "glscl"])
@pytest.mark.parametrize("lr", [".inf", ".nan", "-1", "0"])
def test_a_learning_rate_outside_its_domain_is_refused_before_any_work(toy, model, lr):
    vmr_fails("train", "--model", model, "-p", toy, "--set", f"model.{model}.lr={lr}", names=(f"model.{model}.lr",))


# Numbers that may legitimately take any value: seeds, and sentinels checked by their own validator.
UNBOUNDED = {"seed", "clip_len", "length_ranges"}


@pytest.mark.parametrize("model", MODELS.names())
def test_every_numeric_hyper_parameter_has_a_domain(model):
    """A number with no range (a bare `float`) would accept -1 or 1e30 where it makes no sense."""
    def constrained(annotation) -> bool:
        text = str(annotation)
        return "Annotated" in text or "Field" in text or not any(t in text for t in ("int", "float"))

    cfg = MODELS.get(model).Config
    bare = [name for name, field in cfg.model_fields.items()
            if name not in UNBOUNDED and not field.metadata and not constrained(field.annotation)]
    assert bare == []
    with pytest.raises(ValueError, match="finite"):
        cfg.model_validate({"lr": math.inf})


# -- paths and videos ------------------------------------------------------------------------------


def _video_params(tmp_path: Path, videos: Path) -> Path:
    params = {
        "dataset": {"video_dir": str(videos)},
        "decode": {"out_dir": str(tmp_path / "frames"), "workers": 1,
                   "max_failure_share": 1.0},
        "merge": {"npy_dir": str(tmp_path / "npy"), "out_dir": str(tmp_path / "features")},
        "features": ["clip"],
        "extractors": {"clip": {"batch_size": 4}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_decode_reports_what_it_cannot_take_and_decodes_the_rest(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "good.mp4", frames=45, width=96, height=64)
    write_video(videos / ("L" * 240 + ".mp4"), frames=45, width=96, height=64)  # was: ENAMETOOLONG for all
    write_video(videos / ("M" * 251 + ".mp4"), frames=45, width=96, height=64)  # its <id>.json cannot exist
    write_video(videos / "one.mp4", frames=1, width=96, height=64)  # ffmpeg's fps filter keeps none
    (videos / "folder.mp4").mkdir()
    os.symlink("loop.mp4", videos / "loop.mp4")
    params = _video_params(tmp_path, videos)
    vmr("decode", "-p", params)
    failures = json.loads((tmp_path / "frames" / "failures.json").read_text())
    reasons = {f["file"]: f["reason"] for f in failures["failures"]}
    assert set(reasons) == {"M" * 251 + ".mp4", "one.mp4", "folder.mp4", "loop.mp4"}
    assert "255-byte" in reasons["M" * 251 + ".mp4"] and "keeps no frame" in reasons["one.mp4"]
    assert "directory" in reasons["folder.mp4"] and "symlink" in reasons["loop.mp4"]
    assert failures["total"] == 6
    manifest = json.loads((tmp_path / "frames" / "manifest.json").read_text())["videos"]
    assert manifest["good"]["status"] == "ok" and manifest["L" * 240]["status"] == "ok"
    assert not list((tmp_path / "frames").rglob(".tmp-*"))
    # and a re-run gives the same reports, byte for byte
    before = (tmp_path / "frames" / "failures.json").read_bytes()
    vmr("decode", "-p", params)
    assert (tmp_path / "frames" / "failures.json").read_bytes() == before


@pytest.fixture
def decoded(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "vidA.mp4", frames=45, width=96, height=64)
    params = _video_params(tmp_path, videos)
    vmr("decode", "-p", params)
    return params


def test_weights_errors_name_the_file(tmp_path, decoded):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    line = vmr_fails("extract", "--feature", "clip", "-p", decoded, "--set", f"extractors.clip.weights={garbage}",
                     names=(str(garbage),))
    assert len(line) < 300  # torch's page of advice is cut to the cause
    vmr_fails("extract", "--feature", "clip", "-p", decoded, "--set", f"extractors.clip.weights={garbage}",
              "--set", "extractors.clip.weights_sha256=" + "f" * 64, names=(str(garbage), "f" * 64, "sha256"))


def test_merge_removes_what_a_killed_merge_left(tmp_path, decoded):
    vmr("extract", "--feature", "clip", "-p", decoded)
    (tmp_path / "features").mkdir()
    leftover = tmp_path / "features" / ".tmp-clip.h5.k1ll3d"
    leftover.write_bytes(b"half an HDF5 file")
    vmr("merge", "--feature", "clip", "-p", decoded)
    assert not leftover.exists() and (tmp_path / "features" / "clip.h5").is_file()


needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or sys.platform != "linux",
                                reason="mounting a small or read-only tmpfs needs root on Linux")


def _mount(target: Path, options: str) -> None:
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)


@needs_root
def test_a_full_disk_and_a_read_only_folder_give_one_message(tmp_path, decoded):
    vmr("extract", "--feature", "clip", "-p", decoded)
    full, readonly = tmp_path / "full", tmp_path / "ro"
    _mount(full, "size=16k")
    _mount(readonly, "ro,size=64k")
    try:
        vmr_fails("merge", "--feature", "clip", "-p", decoded, "--set", f"merge.out_dir={full}",
                  names=(str(full), "free"))
        vmr_fails("merge", "--feature", "clip", "-p", decoded, "--set", f"merge.out_dir={readonly}/features",
                  names=(str(readonly), "Read-only"))
    finally:
        subprocess.run(["umount", str(full)], check=False)
        subprocess.run(["umount", str(readonly)], check=False)


# -- annotations -----------------------------------------------------------------------------------


def _edit_train_split(toy: Path, edit) -> Path:
    dataset = yaml.safe_load(toy.read_text())["dataset"]
    path = Path(dataset["splits"]["train"])
    path.write_bytes(edit(path.read_bytes()))
    return path


def test_non_utf8_annotation_bytes_name_the_line_and_skip_under_on_error_skip(toy):
    path = _edit_train_split(toy, lambda b: b.replace(b"person does thing 3.", b"person caf\xe9 thing 3."))
    vmr_fails("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.epochs=1", names=(f"{path}:4", "UTF-8"))
    vmr("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.epochs=1", "--set", "dataset.on_error=skip")


@pytest.mark.parametrize("alias", ["./TR000", "/TR000", "TR000/", ".."])
def test_video_ids_that_alias_another_are_refused(toy, alias):
    path = _edit_train_split(toy, lambda b: b.replace(b"TR001 ", alias.encode() + b" ", 1))
    vmr_fails("train", "--model", "mmn", "-p", toy, names=(f"{path}:2", "plain name"))


def test_a_video_without_features_is_named_up_front_or_skipped(toy, tmp_path):
    with h5py.File(tmp_path / "data" / "features" / "toy.h5", "a") as h5:
        del h5["TR005"]
    vmr_fails("train", "--model", "mmn", "-p", toy, names=("TR005", "toy.h5", "train"))
    assert not (tmp_path / "runs" / "mmn").exists()  # nothing started
    vmr("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.epochs=1", "--set", "dataset.on_error=skip")


def test_durations_from_decode_records_are_named_when_missing(toy, tmp_path):
    """`dataset.durations: []` (own videos) reads the durations decode measured: none measured yet, or
    a video decode did not measure, is one error naming the file or the video (skipped under skip)."""
    from pipeline.text.annotations import read_durations

    frames = tmp_path / "frames"
    run = ("train", "--model", "mmn", "-p", toy, "--set", "dataset.durations=[]", "--set", f"decode.out_dir={frames}",
           "--set", "model.mmn.epochs=1")
    vmr_fails(*run, names=(str(frames / "durations.json"), "dataset.durations"))
    measured = read_durations([tmp_path / "data" / "videos.csv"])
    del measured["TR005"]
    frames.mkdir()
    (frames / "durations.json").write_text(json.dumps(measured))
    vmr_fails(*run, names=("train.txt:6", "TR005", "decode"))
    vmr(*run, "--set", "dataset.on_error=skip")


# -- training and evaluation -----------------------------------------------------------------------


def test_training_that_diverges_stops_without_saving(toy, tmp_path):
    # finite and positive, so valid params; the weights blow up on the first step
    vmr_fails("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.lr=1e30", "--set", "model.mmn.grad_clip=null",
              names=("diverged", "epoch 1", "step"))
    assert not (tmp_path / "runs" / "mmn" / "best.pt").exists()
    assert not list((tmp_path / "runs" / "mmn" / "checkpoints").glob("*.pt"))


def test_evaluate_refuses_an_unfinished_run_unless_told(toy, tmp_path):
    vmr("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.epochs=1")
    best = tmp_path / "runs" / "mmn" / "best.pt"
    record = best.with_name("best.pt.prov.json")
    # a run killed after writing best.pt but before its record: the record is absent ...
    saved = record.read_bytes()
    record.unlink()
    vmr_fails("evaluate", "--model", "mmn", "-p", toy, names=(str(best), "did not finish", "--allow-unfinished"))
    # ... or, for a re-run killed later, names other bytes than the best.pt now there
    record.write_bytes(saved)
    best.write_bytes(best.read_bytes() + b"\0")
    vmr_fails("evaluate", "--model", "mmn", "-p", toy, names=(str(best), "did not finish"))
    vmr("train", "--model", "mmn", "-p", toy, "--set", "model.mmn.epochs=1", "--set", "trainer.resume=false")
    record.unlink()
    vmr("evaluate", "--model", "mmn", "-p", toy, "--allow-unfinished")
    metrics = json.loads((tmp_path / "results" / "mmn" / "metrics.json").read_text())
    assert "did not finish" in metrics["unfinished_training"]


# -- predictions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("problem, lines, named", [
    ("repeated qid", [{"qid": 0, "pred_relevant_windows": [[1, 5, 0.9]]}] * 2, ("qid 0", "repeated")),
    ("NaN", [{"qid": 0, "pred_relevant_windows": [[float("nan"), 5, 0.9]]}], ("qid 0", "finite")),
    ("reversed", [{"qid": 0, "pred_relevant_windows": [[50, 10, 0.9]]}], ("qid 0", "ends before")),
    ("empty", [{"qid": 0, "pred_relevant_windows": []}], ("qid 0", "non-empty")),
    ("unknown qid", [{"qid": 999, "pred_relevant_windows": [[1, 5, 0.9]]}], ("qid 999", "no such query")),
])
def test_score_refuses_bad_predictions(toy, tmp_path, problem, lines, named):
    dataset = yaml.safe_load(toy.read_text())["dataset"]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(line) + "\n" for line in lines))
    vmr_fails("score", preds, "--annotations", dataset["splits"]["test"], "--dataset", "charades_sta",
              "--durations", dataset["durations"][0], names=(str(preds), *named))
