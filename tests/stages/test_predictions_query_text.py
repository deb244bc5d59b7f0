"""Every grounding model's predictions.jsonl, written by `vmr evaluate`, carries each query's text
(Moment-DETR's {qid, query, vid, pred_relevant_windows}), and `vmr score` reads the file."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import yaml
from support.toy import TINY_MMN, write_toy_params  # noqa: E402
from typer.testing import CliRunner

from models import MODELS
from pipeline.cli import app
from pipeline.core.params import DatasetParams
from pipeline.text.annotations import load_dataset_split
from pipeline.text.sentence_features import query_key, write_query_features
from pipeline.text.vocab import write_glove_pkl

# Tiny configs on the toy data (6-d features "toy", about one row per second).
TINY = {
    "mmn": TINY_MMN,
    "mesm": dict(features=["toy"], text_encoder="glove_pkl", hidden_dim=16, nheads=2, dim_feedforward=32,
                 enc_layers=1, dec_layers=1, t2v_layers=1, num_recfw_layers=1, num_recss_layers=1, vocab_size=8,
                 max_video_l=64, clip_len=1.0, batch_size=4, eval_batch_size=4, epochs=1),
    "cnm": dict(feature="toy", hidden_size=16, num_heads=2, num_decoder_layers1=1, num_decoder_layers2=1,
                max_num_frames=8, epochs=1, batch_size=4, warmup_updates=2),
    "mrnet": dict(feature="toy", query_feature="query_toy", input_size=6, query_dim=8, num_pre_clips=8,
                  num_clips=4, pool_kernel=2, pooling_counts=[3], featpool_hidden=16, dim=16, heads=2, ffn_dim=32,
                  predictor_hidden=16, predictor_kernel=3, predictor_layers=2, trans_layers=1, batch_size=4,
                  eval_batch_size=4, epochs=1, milestones=[100], thresholds=[0.3, 0.5, 0.7]),
}


def test_every_grounding_model_is_covered():
    grounding = {name for name in MODELS.names() if MODELS.get(name).task == "grounding"}
    assert grounding == set(TINY)


def _queries(params_path, split):
    return list(load_dataset_split(DatasetParams(**yaml.safe_load(params_path.read_text())["dataset"]), split))


def _toy_inputs(root, params_path, model):
    """What the model reads besides features: glove.pkl (MESM, CNM), query features (MRNet)."""
    data = root / "data"
    sentences = [q.sentence for split in ("train", "test") for q in _queries(params_path, split)]
    words = sorted({w for s in sentences for w in s.lower().replace(".", " .").split()})
    rng = np.random.default_rng(0)
    write_glove_pkl(root / "vocab" / "glove.pkl", {
        "w2id": {"<PAD>": 0} | {w: i + 1 for i, w in enumerate(words)},
        "id2vec": [np.zeros(300, np.float32)] + [rng.normal(size=300).astype(np.float32) for _ in words],
        "counter": Counter({w: 100 - i for i, w in enumerate(words)}),
    })
    keys = sorted({query_key(s) for s in sentences})
    write_query_features(data / "features" / "query_toy.h5", keys, rng.normal(size=(len(keys), 8)).astype(np.float32))
    params = yaml.safe_load(params_path.read_text())
    params.update(models=[model], model={model: TINY[model]}, vocab={"out_dir": str(root / "vocab")})
    params_path.write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("model", sorted(TINY))
def test_evaluate_writes_the_query_text_with_every_prediction(tmp_path, model):
    params = write_toy_params(tmp_path, select_split="test")
    _toy_inputs(tmp_path, params, model)
    runner = CliRunner()
    for stage in ("train", "evaluate"):
        result = runner.invoke(app, [stage, "--model", model, "-p", str(params)])
        assert result.exit_code == 0, result.output
    predictions = tmp_path / "results" / model / "predictions" / "predictions.jsonl"
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    truth = {q.qid: q for q in _queries(params, "test")}
    assert len(lines) == len(truth) == 4
    for p in lines:
        assert list(p)[:4] == ["qid", "query", "vid", "pred_relevant_windows"]  # Moment-DETR's order
        assert p["query"] == truth[p["qid"]].sentence and p["vid"] == truth[p["qid"]].video_id

    # `vmr score` reads the new lines and the old ones (no "query") alike, to the same metrics
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "query"}) + "\n" for p in lines))
    scored = []
    for path in (predictions, old):
        out = tmp_path / f"{path.name}.metrics.json"
        result = runner.invoke(app, ["score", str(path), "--annotations", str(tmp_path / "data" / "test.txt"),
                                     "--dataset", "charades_sta", "--durations", str(tmp_path / "data" / "videos.csv"),
                                     "--cleaning", "mmn", "--out", str(out)])
        assert result.exit_code == 0, result.output
        scored.append({k: v for k, v in json.loads(out.read_text()).items() if k != "predictions"})
    assert scored[0] == scored[1]
