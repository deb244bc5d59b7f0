"""dvc.yaml is generated (`vmr dag`) from params.yaml and the code's imports; the committed file is current."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from extractors import EXTRACTORS
from models import MODELS
from pipeline.cli import app
from pipeline.core.codedeps import REPO_ROOT, stage_code
from pipeline.core.params import deep_merge, load_params, read_yaml
from pipeline.dag import build_dag, render

PARAMS = REPO_ROOT / "params.yaml"


def committed_dag() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def generated(params_path=PARAMS, overrides=()):
    params = load_params(params_path, list(overrides), registries=(EXTRACTORS, MODELS))
    return build_dag(params, read_yaml(params_path))


def test_committed_dvc_yaml_is_current():
    text = render(generated())
    assert (REPO_ROOT / "dvc.yaml").read_text() == text, "dvc.yaml is stale: run `vmr dag`"


def test_check_command(tmp_path):
    runner = CliRunner()
    out = tmp_path / "dvc.yaml"
    assert runner.invoke(app, ["dag", "--params", str(PARAMS), "--out", str(out), "--check"]).exit_code == 1
    assert runner.invoke(app, ["dag", "--params", str(PARAMS), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["dag", "--params", str(PARAMS), "--out", str(out), "--check"])
    assert result.exit_code == 0, result.output


def test_every_stage_depends_on_its_whole_code():
    stages = committed_dag()
    for name, stage in stages.items():
        kind, _, item = name.partition("-")
        members = []
        if kind in ("extract", "merge"):
            members = [EXTRACTORS.get(item)]
        elif kind in ("train", "evaluate", "query_features", "feature_pca"):
            members = [MODELS.get(item)]
        elif kind == "decode":
            members = [EXTRACTORS.get(f) for f in load_params(PARAMS).features]
        missing = set(stage_code(kind, members)) - set(stage["deps"])
        assert not missing, f"{name}: code deps missing from dvc.yaml: {sorted(missing)}"


def test_each_model_depends_on_exactly_its_inputs():
    stages = committed_dag()
    mmn, mrnet = stages["train-mmn"]["deps"], stages["train-mrnet"]["deps"]
    assert "features/clip.h5" in mmn and "features/query_distilbert.h5" not in mmn  # MRNet's queries only
    assert "features/query_distilbert.h5" in mrnet and "features" not in mmn
    assert "vocab/glove.pkl" in stages["train-cnm"]["deps"] and "vocab/glove.pkl" not in mmn
    assert "query_features-mrnet" in stages and not any(s.startswith("query_features-") and s != "query_features-mrnet"
                                                         for s in stages)


def test_models_that_read_frames_make_decode_keep_them(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    dag = generated(params, ["model.glscl.input=frames"])["stages"]
    assert "model.glscl" in dag["decode"]["params"] and "models/glscl" in " ".join(dag["decode"]["deps"])
    assert "work/frames" in dag["train-glscl"]["deps"] and "features/clip.h5" not in dag["train-glscl"]["deps"]


def test_null_optional_inputs_drop_out_and_dvc_reads_the_dag(tmp_path):
    """`vocab.glove_file: null` and `dataset.video_captions: null` once crashed `dvc status` with an
    AssertionError inside DVC (a null dependency path); they must simply not be dependencies."""
    raw = read_yaml(PARAMS)
    raw["vocab"]["glove_file"] = None
    raw["dataset"]["video_captions"] = None
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(tmp_path / "dvc.yaml")])
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    deps = [d for s in stages.values() for d in s["deps"]]
    assert all(d not in (None, "None", "null") for d in deps)
    assert not any("glove.synthetic" in d or "video_captions" in d for d in deps)
    status = _dvc_in(tmp_path, (tmp_path / "dvc.yaml").read_text())("status")
    assert "unexpected error" not in status


def _dvc_in(tmp_path, dvc_yaml: str):
    """A git + DVC repository in tmp_path holding dvc_yaml; returns a runner of `dvc` commands there."""
    (tmp_path / "dvc.yaml").write_text(dvc_yaml)
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    assert dvc, "dvc is a dependency of the project (pyproject.toml)"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)

    def run(*args: str) -> str:
        result = subprocess.run([dvc, *args], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout
    return run


def upstream(dvc, target: str) -> set[str]:
    """The stages `dvc repro TARGET` runs, as DVC itself reads the DAG (`dvc dag --dot TARGET`)."""
    return set(re.findall(r'"([^"]+)"', dvc("dag", "--dot", target)))


def test_evaluating_one_model_runs_only_its_own_stages(tmp_path):
    """`dvc repro evaluate@mmn` once ran MRNet's sentence-features stage too: in the generated DAG,
    one model's evaluation depends on the shared data stages and its own train stage only."""
    dvc = _dvc_in(tmp_path, (REPO_ROOT / "dvc.yaml").read_text())
    # MMN tokenizes its own queries: no vocab stage either
    assert upstream(dvc, "evaluate-mmn") == {"synth", "decode", "extract-clip", "merge-clip", "train-mmn",
                                             "evaluate-mmn"}
    assert "query_features-mrnet" in upstream(dvc, "evaluate-mrnet")


def test_own_data_profile_drops_the_synthetic_inputs(tmp_path):
    """params.yaml with profiles/own_data.yaml merged in (README "Your own videos", as a DVC DAG): no
    synth stage, no file of the synthetic set, durations from decode's records, null inputs gone."""
    raw = deep_merge(read_yaml(PARAMS), read_yaml(REPO_ROOT / "profiles" / "own_data.yaml"))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(tmp_path / "dvc.yaml")])
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "synth" not in stages and "train-mesm" not in stages
    deps = [d for s in stages.values() for d in s["deps"]]
    assert not any("synth" in d for d in deps), [d for d in deps if "synth" in d]
    assert "data/own/videos" in stages["decode"]["deps"] and "dataset.video_dir" in stages["decode"]["params"]
    for name in ("vocab", "train-mmn", "evaluate-mmn"):
        assert "work/frames/durations.json" in stages[name]["deps"], name
        assert "data/own/train.txt" in stages[name]["deps"], name
    dvc = _dvc_in(tmp_path, (tmp_path / "dvc.yaml").read_text())
    # the durations file inside decode's output makes vocab and the model wait for decode
    assert upstream(dvc, "vocab") == {"decode", "vocab"}
    assert upstream(dvc, "evaluate-mmn") == {"decode", "extract-clip", "merge-clip", "train-mmn", "evaluate-mmn"}


def test_an_imported_feature_comes_from_its_import_stage_not_from_video(tmp_path):
    """`imports.clip` replaces decode/extract/merge of clip; the models reading features/clip.h5
    depend on the import stage's output, and DVC reads the DAG."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    raw = read_yaml(PARAMS)
    raw["imports"] = {"clip": {"path": "published/clip_features", "published": "qvhighlights_clip"},
                      "vgg": {"path": "published/vgg_rgb_features.hdf5", "published": "charades_vgg"}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(tmp_path / "dvc.yaml")])
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert not {"extract-clip", "merge-clip"} & set(stages)
    # glscl reads frames only when model.glscl.input is frames: nothing else needs decoding
    assert "decode" not in stages
    clip = stages["import_features-clip"]
    assert clip["cmd"] == "vmr import-features --name clip" and "published/clip_features" in clip["deps"]
    assert set(stage_code("import_features")) <= set(clip["deps"]) and "imports.clip" in clip["params"]
    assert clip["outs"] == ["features/clip.h5"] and stages["import_features-vgg"]["outs"] == ["features/vgg.h5"]
    for model in ("mmn", "mesm", "cnm", "mrnet", "glscl"):
        assert "features/clip.h5" in stages[f"train-{model}"]["deps"]
    producers = [n for n, s in stages.items() for o in s["outs"] if o == "features/clip.h5"]
    assert producers == ["import_features-clip"]

    # a feature still extracted next to an imported one keeps its own decode/extract/merge
    raw["features"] = ["clip", "vgg"]
    raw["imports"].pop("vgg")
    params_path.write_text(yaml.safe_dump(raw))
    stages = generated(params_path)["stages"]
    assert {"decode", "extract-vgg", "merge-vgg", "import_features-clip"} <= set(stages)
    assert not {"extract-clip", "merge-clip"} & set(stages) and "extractors.clip" not in stages["decode"]["params"]

    # DVC accepts the generated stages and sees the import as the producer of features/clip.h5
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    (tmp_path / "dvc.yaml").write_text(render(generated(params_path)))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    dag = subprocess.run([dvc, "dag", "--dot", "train-mmn"], cwd=tmp_path, capture_output=True, text=True)
    assert dag.returncode == 0, dag.stdout + dag.stderr
    assert '"import_features-clip" -> "train-mmn"' in dag.stdout and "merge-clip" not in dag.stdout


def test_an_import_whose_rows_have_no_time_fails_the_dag(tmp_path):
    raw = read_yaml(PARAMS)
    raw["imports"] = {"anet": {"path": "published/anet.h5", "published": "activitynet_c3d"}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(tmp_path / "dvc.yaml")])
    assert result.exit_code == 2 and "imports.anet.seconds_per_row" in result.output


def test_an_import_may_not_shadow_a_file_another_stage_makes(tmp_path):
    raw = read_yaml(PARAMS)
    raw["imports"] = {"query_distilbert": {"path": "published/x.h5", "layout": "hdf5_flat", "seconds_per_row": 1.0}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(tmp_path / "dvc.yaml")])
    assert result.exit_code == 2, result.output
    assert ("features/query_distilbert.h5 would be written by both stage 'import_features-query_distilbert' "
            "and stage 'query_features-mrnet'") in result.output


def test_imported_features_need_durations_from_a_file_not_decode(tmp_path, monkeypatch):
    """Own videos' annotations take their durations from decode's records, but with every feature
    imported and no model reading frames nothing is decoded: `vmr dag` and every stage that reads the
    durations refuse, naming `dataset.durations`, instead of a DAG whose durations.json has no maker."""
    raw = deep_merge(read_yaml(PARAMS), read_yaml(REPO_ROOT / "profiles" / "own_data.yaml"))
    raw["imports"] = {"clip": {"path": "published/clip.h5", "layout": "hdf5_flat", "seconds_per_row": 1.0}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "dvc.yaml"
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "key 'dataset.durations'" in result.output and "no video is decoded" in result.output
    assert not out.exists()
    monkeypatch.chdir(tmp_path)
    for command in (["vocab"], ["train", "--model", "mmn"], ["query-features", "--model", "mrnet"],
                    ["export", "exported", "--format", "mmn"]):  # evaluate: train's check, after best.pt
        result = CliRunner().invoke(app, [*command, "--params", str(params_path)])
        assert result.exit_code == 2 and "key 'dataset.durations'" in result.output, (command, result.output)
    assert not (tmp_path / "exported").exists()

    # durations from a csv: no decode stage, and nothing depends on decode's records
    raw["dataset"]["durations"] = ["data/own/durations.csv"]
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load(out.read_text())["stages"]
    assert set(stages) == {"import_features-clip", "vocab", "train-mmn", "evaluate-mmn"}
    for name in ("vocab", "train-mmn", "evaluate-mmn"):
        assert "data/own/durations.csv" in stages[name]["deps"] and "work/frames/durations.json" not in stages[name]["deps"]

    # a model that reads frames brings decode back, and with it the records
    raw["dataset"]["durations"] = []
    raw["models"] = ["mmn", "glscl"]
    raw["dataset"]["video_captions"] = "data/own/captions.json"
    raw["model"]["glscl"]["input"] = "frames"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["dag", "--params", str(params_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stages = yaml.safe_load(out.read_text())["stages"]
    assert "decode" in stages and "work/frames/durations.json" in stages["vocab"]["deps"]
