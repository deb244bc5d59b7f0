"""MRNet: the maskable retention against hand computations, the encoder's structure, the model."""

from __future__ import annotations

import math

import pytest
import torch
from support.profiles import effective  # noqa: E402

from models.mrnet import (
    MaskableRetention,
    TransRet,
    XPos,
    decay_matrix,
    gate_matrix,
    joint_mask,
    sine_positions,
    sparsity_loss,
)

# -- the mask -------------------------------------------------------------------------------------


def test_decay_matrix_by_hand():
    # gamma^|i-j| off the diagonal; the official bidirectional sum D + D^T puts 2 on the diagonal.
    expected = torch.tensor([[2.0, 0.5, 0.25], [0.5, 2.0, 0.5], [0.25, 0.5, 2.0]])
    assert torch.allclose(decay_matrix(3, 0.5), expected)
    one_way = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 0.5, 1.0]])
    assert torch.allclose(decay_matrix(3, 0.5, bidirectional=False), one_way)


def test_gate_and_sparsity_by_hand():
    w = torch.tensor([[0.0, math.log(3.0)], [-math.log(3.0), 5.0]])  # sigmoid: 0.5, 0.75, 0.25
    gate, off = gate_matrix(w)
    assert torch.allclose(gate, torch.tensor([[1.0, 0.75], [0.25, 1.0]]))  # diagonal forced to 1
    assert torch.allclose(sparsity_loss(off), torch.tensor((0.75 + 0.25) / 4))  # mean over all N^2


def test_retention_mask_values_and_text_unmasked():
    layer = MaskableRetention(16, num_clips=3, heads=2, gamma=0.5)
    with torch.no_grad():
        layer.gate_logits.zero_()  # sigmoid(0) = 0.5 off the diagonal
    video, loss = layer.video_mask()
    expected = torch.tensor([[2.0, 0.25, 0.125], [0.25, 2.0, 0.25], [0.125, 0.25, 2.0]])
    assert torch.allclose(video, expected)
    assert torch.allclose(loss, torch.tensor(6 * 0.5 / 9))
    full = joint_mask(video, num_text=2)
    assert full.shape == (5, 5)
    assert torch.all(full[:2, :] == 1) and torch.all(full[:, :2] == 1)
    assert torch.equal(full[2:, 2:], expected)


@pytest.mark.parametrize("mode,loss_expected", [("no", False), ("ret", False), ("sparse", True), ("both", True)])
def test_mask_modes(mode, loss_expected):
    layer = MaskableRetention(16, num_clips=4, heads=2, gamma=0.9, mask_mode=mode)
    video, loss = layer.video_mask()
    gate, off = gate_matrix(layer.gate_logits)
    want = {"no": None, "ret": layer.decay, "sparse": gate, "both": layer.decay * gate}[mode]
    assert (video is None) if want is None else torch.allclose(video, want)
    assert (loss.item() > 0) == loss_expected


def test_text_rows_do_not_depend_on_the_video_mask():
    """Language-related regions get unlimited attention: changing the video gate moves only video rows."""
    torch.manual_seed(0)
    layer = MaskableRetention(16, num_clips=6, heads=2, gamma=0.9).eval()
    x = torch.randn(3 + 6, 16)
    before, _ = layer(x, num_text=3)
    with torch.no_grad():
        layer.gate_logits.add_(torch.randn(6, 6) * 3)
    after, _ = layer(x, num_text=3)
    assert torch.allclose(before[:3], after[:3], atol=1e-6)
    assert not torch.allclose(before[3:], after[3:], atol=1e-4)


def test_charades_softmax_off_zeroes_attention():
    """Official ret_model.py with ATT_SOFTMAX false: the attention output is the output-layer bias."""
    torch.manual_seed(0)
    layer = MaskableRetention(16, num_clips=4, heads=2, att_mode="v", att_softmax=False).eval()
    x = torch.randn(2 + 4, 16)
    out, _ = layer(x, num_text=2)
    assert torch.allclose(out[2:], layer.out_proj.bias.expand(4, 16))
    assert torch.allclose(out[:2], x[:2] @ layer.W_txt_V)  # 'v' mode: text is only V-projected
    layer.no_softmax_weights = "logits"  # the TACoS model file's behaviour
    out, _ = layer(x, num_text=2)
    assert not torch.allclose(out[2:], layer.out_proj.bias.expand(4, 16))


def test_sparsity_loss_gets_gradient_and_sums_over_layers():
    enc = TransRet(16, layers=3, ffn_dim=32, num_clips=5, heads=2)
    _, _, loss = enc(torch.randn(2, 16), torch.randn(5, 16))
    expected = sum(sparsity_loss(gate_matrix(layer.retention.gate_logits)[1]) for layer in enc.layers)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(layer.retention.gate_logits.grad.abs().sum() > 0 for layer in enc.layers)


# -- positions ------------------------------------------------------------------------------------


def test_xpos_position_zero_is_identity_and_scores_are_relative():
    torch.manual_seed(0)
    xpos = XPos(8)
    x = torch.randn(5, 8)
    assert torch.allclose(xpos(x)[0], x[0]) and torch.allclose(xpos(x, downscale=True)[0], x[0])
    # The same q and k at every position: q_m . k_n depends only on m - n (a Toeplitz matrix).
    q, k = torch.randn(1, 8).expand(6, 8), torch.randn(1, 8).expand(6, 8)
    scores = xpos(q) @ xpos(k, downscale=True).T
    for offset in range(-5, 6):
        diag = torch.diagonal(scores, offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)


def test_xpos_hand_computed_pair():
    # dim 2: one pair, zeta = 0.4*2/2.8, angle = pos; position 1 rotates by 1 rad, scales by zeta^(1/512).
    xpos = XPos(2)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    scale = (0.8 / 2.8) ** (1 / 512)
    expected = torch.tensor([math.cos(1.0), math.sin(1.0)]) * scale
    assert torch.allclose(xpos(x)[1], expected, atol=1e-6)
    assert torch.allclose(xpos(x, downscale=True)[1], expected / scale**2, atol=1e-6)


def test_sine_positions_by_hand():
    pe = sine_positions(2, 4)
    # positions 1/2 and 2/2 of 2pi; channels (sin f0, cos f0, sin f1, cos f1), f1 = 1/100.
    p = torch.tensor([math.pi, 2 * math.pi])
    expected = torch.stack([p.sin(), p.cos(), (p / 100).sin(), (p / 100).cos()], dim=1)
    assert torch.allclose(pe, expected, atol=1e-5)  # the official +1e-6 in the normaliser


def test_transret_layer_parameter_count():
    # Official RetLayer + FFN + 2 LN at d=256, N=64: 6*256^2 + Linear(256,256) + 64^2 + FFN(1024) + 2 LN.
    enc = TransRet(256, layers=1, num_clips=64)
    per_layer = 6 * 256 * 256 + (256 * 256 + 256) + 64 * 64 + (256 * 1024 + 1024 + 1024 * 256 + 256) + 2 * 512
    assert sum(p.numel() for p in enc.parameters()) == per_layer + 512


# -- the model ------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from models.mrnet import MRNet, query_order, total_loss  # noqa: E402
from pipeline.core.params import DatasetParams  # noqa: E402
from pipeline.text.sentence_features import write_query_features  # noqa: E402
from pipeline.training.trainer import DataContext, StepContext  # noqa: E402

KINDS = ["the red circle moves left", "a square grows", "the triangle turns blue", "the star disappears"]
TINY = dict(
    seed=0, input_size=32, query_dim=24, num_pre_clips=16, num_clips=8, pool_kernel=2, pooling_counts=[7],
    featpool_hidden=32, dim=32, heads=4, ffn_dim=64, predictor_hidden=32, predictor_kernel=3, predictor_layers=2,
    trans_layers=1, batch_size=4, eval_batch_size=4, epochs=1, lr=1e-3, milestones=[100], only_iou=100,
    thresholds=[0.3, 0.5, 0.7], loss_ratio=0.0,
)


def make_tiny_dataset(root: Path, num_train: int = 12, num_test: int = 4, seed: int = 0) -> DataContext:
    """Videos of 16 one-second features; each event kind paints its own pattern on its segment and
    its sentence has its own query vector, so a working model can learn to ground."""
    import h5py

    rng = np.random.default_rng(seed)
    patterns, query_vecs = rng.standard_normal((4, 32)) * 2, rng.standard_normal((4, 24))
    (root / "features").mkdir(parents=True)
    lines = {"train": [], "test": []}
    rows = ["id,length"]
    with h5py.File(root / "features" / "toy.h5", "w") as f:
        for i in range(num_train + num_test):
            split = "train" if i < num_train else "test"
            vid = f"V{i:03d}"
            feats = rng.standard_normal((16, 32)).astype(np.float32) * 0.5
            kinds = rng.choice(4, size=int(rng.integers(2, 4)), replace=False)
            bounds = np.sort(rng.choice(np.arange(1, 16), size=len(kinds) * 2, replace=False)).reshape(-1, 2)
            for k, (s, e) in zip(kinds, bounds, strict=True):
                feats[s:e] += patterns[k]
                lines[split].append(f"{vid} {s:.1f} {e:.1f}##{KINDS[k]}")
            f.create_dataset(vid, data=feats)
            rows.append(f"{vid},16.0")
    write_query_features(root / "features" / "query_toy.h5", KINDS, query_vecs.astype(np.float32))
    for split, ls in lines.items():
        (root / f"{split}.txt").write_text("\n".join(ls) + "\n")
    (root / "lengths.csv").write_text("\n".join(rows) + "\n")
    dataset = DatasetParams(name="toy", splits={s: str(root / f"{s}.txt") for s in lines},
                            durations=[str(root / "lengths.csv")], video_captions=None)
    return DataContext(dataset=dataset, features_dir=root / "features", vocab_dir=root, frames_dir=root,
                       run_dir=root / "run", seed=seed)


@pytest.fixture()
def tiny(tmp_path):
    return make_tiny_dataset(tmp_path)


def tiny_model(data, **overrides) -> MRNet:
    torch.manual_seed(0)
    return MRNet(MRNet.Config(**{**TINY, "feature": "toy", "query_feature": "query_toy", **overrides}), data)


def test_query_order_modes():
    moments, sentences = [(5.0, 6.0), (1.0, 2.0), (3.0, 4.0)], ["b", "c", "a"]
    assert query_order(moments, sentences, "gt_start") == [1, 2, 0]
    assert query_order(moments, sentences, "text") == [2, 0, 1]


def test_training_step_and_prediction(tiny):
    model = tiny_model(tiny)
    ds = model.build_dataset("train", tiny, train=True)
    item = ds[0]
    assert item["feats"].shape == (16, 32) and item["queries"].shape[1] == 24
    assert item["iou2d"].shape == (len(item["qids"]), 8, 8)
    assert torch.all(item["moments"][1:, 0] >= item["moments"][:-1, 0])  # sorted by GT start
    batch = model.collate([ds[i] for i in range(4)])
    out = model.training_step(batch, StepContext(epoch=1, step=0, world_size=1, optimizer_step=None))
    assert set(out) == {"loss", "loss_iou", "loss_vid", "loss_sent", "loss_sp"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.transret.layers[0].retention.gate_logits.grad.abs().sum() > 0
    assert model.query_proj_unused.weight.grad is None  # unused, as in the official model
    model.eval()
    test = model.build_dataset("test", tiny, train=False)
    preds = model.predict_step(model.collate([test[i] for i in range(len(test))]))
    queries = tiny.queries("test")
    assert sorted(p["qid"] for p in preds) == sorted(q.qid for q in queries)
    for p in preds:
        scores = [w[2] for w in p["pred_relevant_windows"]]
        assert 1 <= len(scores) <= 5 and scores == sorted(scores, reverse=True)
        assert all(0 <= w[0] < w[1] <= 16.0 for w in p["pred_relevant_windows"])
    metrics = model.metrics(preds, queries)
    assert {"R@1,IoU@0.5", "R@5,IoU@0.7", "mIoU", "Best_R1", "text_order/R@1,IoU@0.5"} <= set(metrics)
    # the honest order's windows come from a second pass with the queries sorted by sentence
    assert all(len(p["pred_relevant_windows_text_order"]) >= 1 for p in preds)
    single = [i for i in range(len(test)) if len(test[i]["qids"]) > 1]
    assert any(p["pred_relevant_windows"] != p["pred_relevant_windows_text_order"] for p in preds) or not single


def test_honest_test_order_changes_nothing_about_training(tiny):
    official, honest = tiny_model(tiny), tiny_model(tiny, test_query_order="text")
    assert all(torch.equal(a, b) for a, b in zip(official.state_dict().values(), honest.state_dict().values(), strict=True))
    train_a, train_b = (m.build_dataset("train", tiny, train=True) for m in (official, honest))
    for i in range(len(train_a)):
        a, b = train_a[i], train_b[i]
        assert a["qids"] == b["qids"] and torch.equal(a["queries"], b["queries"])
    ctx = StepContext(epoch=1, step=0, world_size=1, optimizer_step=None)
    losses = []
    for model, ds in ((official, train_a), (honest, train_b)):
        torch.manual_seed(1)  # same dropout masks
        losses.append(model.training_step(model.collate([ds[i] for i in range(4)]), ctx)["loss"])
    assert torch.equal(losses[0], losses[1])
    # ... while the test sequences differ: GT-start order vs sentence order
    test_a, test_b = (m.build_dataset("test", tiny, train=False) for m in (official, honest))
    orders = [(test_a[i]["qids"], test_b[i]["qids"]) for i in range(len(test_a))]
    assert all(sorted(a) == sorted(b) for a, b in orders) and any(a != b for a, b in orders)


def test_sparsity_term_counted_twice_flag():
    cfg = MRNet.Config(**TINY)
    one = torch.tensor(1.0)
    sp = torch.tensor(2.0)
    assert total_loss(one, one, one, sp, 1, cfg) == 1 + 1 + 1 + 2 + 2  # loss_ratio 0: always twice
    assert total_loss(one, one, one, sp, 1, cfg.model_copy(update={"sparsity_count_twice": False})) == 5
    high = cfg.model_copy(update={"loss_ratio": 1.0})  # overall_min = 1 * 4 * 10 = 40 > 2
    assert total_loss(one, one, one, sp, 1, high) == 5
    late = total_loss(one, one, one, sp, 101, cfg)  # after only_iou: x0.01 except the IoU loss
    assert torch.allclose(late, torch.tensor(1 + 0.01 * (1 + 1 + 2) + 0.01 * 2))


@pytest.mark.parametrize("profile,millions", [
    ("mrnet_activitynet.yaml", 77.55), ("mrnet_charades.yaml", 119.11), ("mrnet_tacos.yaml", 18.44),
])
def test_parameter_count_of_published_configs(profile, millions, tmp_path):
    cfg, _ = effective(profile, "mrnet")  # what `vmr train --profile` builds
    data = DataContext(dataset=None, features_dir=tmp_path, vocab_dir=tmp_path, frames_dir=tmp_path,
                       run_dir=tmp_path, seed=0)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = MRNet(cfg, data)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def official_keys_and_shapes(cfg: MRNet.Config) -> dict[str, tuple[int, ...]]:
    """The official RET state dict layout (xian-sh/MRNet ret_model*.py), written out by hand."""
    d, h, n = cfg.dim, cfg.featpool_hidden, cfg.num_clips
    shapes = {"featpool.conv.weight": (h, cfg.input_size, 1), "featpool.conv.bias": (h,)}
    for name, (i, o) in {"text_encoder.fc_out1": (cfg.query_dim, d), "text_encoder.fc_out2": (cfg.query_dim, d),
                         "text_out.fc_out1": (d, d), "text_out.fc_out2": (d, d),
                         "input_vid_proj.0.net.1": (h, d), "input_vid_proj.1.net.1": (d, d),
                         "trans_ret.ffns.0.0": (d, cfg.ffn_dim), "trans_ret.ffns.0.2": (cfg.ffn_dim, d)}.items():
        shapes |= {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
    for name, size in {"text_out.layernorm": d, "input_vid_proj.0.LayerNorm": h, "input_vid_proj.1.LayerNorm": d,
                       "trans_ret.layer_norms_1.0": d, "trans_ret.layer_norms_2.0": d, "trans_ret.norm": d}.items():
        shapes |= {f"{name}.weight": (size,), f"{name}.bias": (size,)}
    layer = "trans_ret.rets.0"
    shapes |= {f"{layer}.xpos.scale": (d // 2,), f"{layer}.learn_vid_ret.weight": (n * n, 1)}
    linears = 1 if cfg.projection == "matrices" else 4
    shapes |= {f"{layer}.self_attn.linears.{j}.{p}": (d, d) if p == "weight" else (d,)
               for j in range(linears) for p in ("weight", "bias")}
    if cfg.projection == "matrices":
        shapes |= {f"{layer}.W_{m}_{x}": (d, d) for m in ("vid", "txt") for x in "QKV"}
    k, hid = cfg.predictor_kernel, cfg.predictor_hidden
    for i in range(cfg.predictor_layers):
        shapes |= {f"proposal_conv.convs.{i}.weight": (hid, d if i == 0 else hid, k, k), f"proposal_conv.convs.{i}.bias": (hid,)}
        shapes |= {f"proposal_conv.bn.{i}.{p}": (hid,) for p in ("weight", "bias", "running_mean", "running_var")}
        shapes[f"proposal_conv.bn.{i}.num_batches_tracked"] = ()
    for head in ("conv1x1_iou", "conv1x1_contrastive"):
        shapes |= {f"proposal_conv.{head}.weight": (d, hid, 1, 1), f"proposal_conv.{head}.bias": (d,)}
    return shapes


@pytest.mark.parametrize("projection", ["matrices", "linear"])
def test_official_checkpoint_loads(tiny, tmp_path, projection):
    from models.mrnet import XPos

    cfg = MRNet.Config(**{**TINY, "feature": "toy", "query_feature": "query_toy", "projection": projection})
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) if s else torch.tensor(7) for k, s in official_keys_and_shapes(cfg).items()}
    state["trans_ret.rets.0.xpos.scale"] = XPos(cfg.dim).zeta.clone()
    model = MRNet(cfg, tiny)
    assert len(state) - 1 == len(model.state_dict())  # everything but the xPos buffer has a home
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[7, 15])
    path = tmp_path / "pool_model_14.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": 14}, path)
    from pipeline.core.provenance import sha256_file

    loaded = MRNet(cfg.model_copy(update={"init_weights": str(path), "init_weights_sha256": sha256_file(path)}), tiny)
    ours = loaded.state_dict()
    assert torch.equal(ours["query_proj.weight"], state["text_encoder.fc_out2.weight"])
    assert torch.equal(ours["video_proj.6.bias"], state["input_vid_proj.1.net.1.bias"])
    assert torch.equal(ours["transret.layers.0.retention.gate_logits"].flatten(), state["trans_ret.rets.0.learn_vid_ret.weight"].flatten())
    last = "transret.layers.0.retention.out_proj.weight"
    assert torch.equal(ours[last], state[f"trans_ret.rets.0.self_attn.linears.{0 if projection == 'matrices' else 3}.weight"])
    assert loaded.weights_provenance()["init_weights"] == sha256_file(path)
    with pytest.raises(ValueError, match="does not match"):
        MRNet(cfg.model_copy(update={"init_weights": str(path), "init_weights_sha256": "0" * 64}), tiny)


def test_learns_to_ground_through_the_trainer(tmp_path):
    """End to end with the shared trainer: a few epochs beat the random-proposal baseline widely."""
    from pipeline.training.trainer import fit, random_grounding_predictions

    data = make_tiny_dataset(tmp_path, num_train=32, num_test=12)
    cfg = MRNet.Config(**{**TINY, "feature": "toy", "query_feature": "query_toy", "epochs": 6, "eval_every": 6,
                          "batch_size": 2})
    result = fit("mrnet", MRNet, cfg, data, device="cpu", select_split="test", amp=False)
    queries = data.queries("test")
    baseline = MRNet(cfg, data).metrics(random_grounding_predictions(queries, seed=0), queries)
    assert result.best_metrics["R@1,IoU@0.5"] > baseline["R@1,IoU@0.5"] + 30
    assert result.best_metrics["mIoU"] > baseline["mIoU"] + 15
