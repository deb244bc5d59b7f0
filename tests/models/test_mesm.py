"""MESM: losses and matcher against hand computations, masking, negatives, batching, overfitting,
parameter counts of the published configs, the CLIP checkpoint format, a QVHighlights-format run,
MESM's clamped pooling of long videos and the clip_len check against the feature file's row times."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from support.profiles import effective  # noqa: E402
from torch import nn

from models.mesm import (
    MESM,
    ClipTextEncoder,
    MESMCriterion,
    MESMNet,
    MesmTokenizer,
    build_clip_text_tower,
    decode_predictions,
    generalized_temporal_iou,
    label_smoothed_nll,
    load_clip_text_checkpoint,
    mask_words,
    match_hungarian,
    match_top1,
    saliency_loss,
    sample_outclass_negatives,
    segment_sentence_loss,
    span_xx_to_cxw,
)
from pipeline.media.features import average_to_clips, l2_normalize
from pipeline.text.annotations import Query
from pipeline.text.vocab import load_glove_pkl
from pipeline.text.vocab import write_glove_pkl as write_glove_pkl_file
from pipeline.training.trainer import (
    DataContext,
    fit,
    load_for_evaluation,
    predict_and_score,
    setup_distributed,
)

REPO = Path(__file__).resolve().parents[2]

# -- small worlds ---------------------------------------------------------------------------------

WORDS = ["a", "person", "opens", "the", "door", "circle", "moves", "left", "right", "grows", "."]


def write_glove_pkl(path: Path, dim: int = 300, seed: int = 0) -> None:
    """A glove.pkl in the CPL format: w2id (<PAD>=0, first appearance), id2vec list, counter."""
    rng = np.random.default_rng(seed)
    counter = Counter({w: 100 - i for i, w in enumerate(WORDS)})
    w2id = {"<PAD>": 0} | {w: i + 1 for i, w in enumerate(WORDS)}
    id2vec = [np.zeros(dim, np.float32)] + [rng.normal(size=dim).astype(np.float32) for _ in WORDS]
    write_glove_pkl_file(path, {"w2id": w2id, "id2vec": id2vec, "counter": counter})


class World:
    """Features, vocab and queries on disk, and a DataContext over them."""

    def __init__(self, root: Path, queries: dict[str, list[Query]], lengths: dict[str, int], dim: int = 12, seed=0):
        rng = np.random.default_rng(seed)
        (root / "features").mkdir(parents=True)
        (root / "vocab").mkdir()
        with h5py.File(root / "features" / "clip.h5", "w") as f:
            for vid, length in lengths.items():
                f.create_dataset(vid, data=rng.normal(size=(length, dim)).astype(np.float32))
        write_glove_pkl(root / "vocab" / "glove.pkl")
        self.queries = queries
        world = self

        @dataclasses.dataclass(frozen=True)
        class Context(DataContext):
            def queries(self, split):  # noqa: D401 - the test's records instead of parsed files
                return world.queries[split]

        self.data = Context(dataset=None, features_dir=root / "features", vocab_dir=root / "vocab",
                            frames_dir=root / "frames", run_dir=root / "run", seed=seed)


def charades_queries(split: str, n_videos: int = 3) -> tuple[list[Query], dict[str, int]]:
    sentences = ["a person opens the door.", "the circle moves left.", "the circle grows."]
    queries, lengths = [], {}
    for v in range(n_videos):
        vid = f"V{v}"
        lengths[vid] = 20 + v
        for k in range(2 + v % 2):
            st = 2.0 + 6 * k
            queries.append(Query("synthetic", split, vid, float(lengths[vid]), ((st, st + 4.0),),
                                 sentences[k % 3], f"{split}-{vid}-{k}"))
    return queries, lengths


def tiny_config(**overrides) -> MESM.Config:
    base = dict(features=["clip"], text_encoder="glove_pkl", hidden_dim=32, nheads=4, dim_feedforward=64,
                enc_layers=1, dec_layers=2, t2v_layers=1, num_recfw_layers=1, num_recss_layers=1,
                vocab_size=8, max_video_l=64, clip_len=1.0, seed=0, batch_size=3, epochs=1)
    return MESM.Config(**(base | overrides))


@pytest.fixture
def charades_world(tmp_path):
    train, lengths = charades_queries("train")
    test, _ = charades_queries("test")
    return World(tmp_path, {"train": train, "test": test}, lengths)


# -- spans, matcher -------------------------------------------------------------------------------


def test_generalized_iou_by_hand():
    a = torch.tensor([[0.0, 0.2], [0.5, 1.0]])
    b = torch.tensor([[0.0, 0.3], [0.0, 1.0]])
    # IoU 0.2/0.3; 0.2/1.0; disjoint: 0 - (1.0 - 0.8)/1.0; 0.5/1.0
    expected = torch.tensor([[2 / 3, 0.2], [-0.2, 0.5]])
    assert torch.allclose(generalized_temporal_iou(a, b), expected, atol=1e-6)


def _outputs(spans, fg_prob):
    p = torch.as_tensor(fg_prob, dtype=torch.float32)
    logits = torch.stack([torch.log(p), torch.log(1 - p)], dim=-1)  # softmax(...)[..., 0] == p
    return {"pred_spans": torch.as_tensor(spans, dtype=torch.float32), "pred_logits": logits}


def test_top1_matcher_on_known_costs():
    # query 0's GT = [0.2, 0.6] (c 0.4, w 0.4); query 1's GT = [0.5, 0.9] (c 0.7, w 0.4)
    moments = torch.tensor([[0.2, 0.6], [0.5, 0.9]])
    spans = [[[0.4, 0.4], [0.7, 0.4], [0.41, 0.4]], [[0.4, 0.4], [0.7, 0.4], [0.69, 0.38]]]
    # query 0: exact match (pred 0) beats the near match (pred 2) even with a lower probability
    # cost(pred0) = 0 - 1 - 4*0.5 = -3; cost(pred2) = 10*0.01 - giou - 4*0.9 with giou = 0.39/0.41
    out = _outputs(spans, [[0.5, 0.5, 0.9], [0.1, 0.2, 0.9]])
    c02 = 10 * 0.01 - 0.39 / 0.41 - 4 * 0.9
    assert c02 < -3  # so pred 2 wins for query 0 (the class term dominates)
    # query 1: pred 1 = -1 - 0.8 = -1.8; pred 2: 10*0.03 - giou - 3.6, giou = 0.36/0.40 -> -4.2
    idx = match_top1(out, span_xx_to_cxw(moments), moments, (10, 1, 4))
    assert idx.tolist() == [2, 2]
    out = _outputs(spans, [[0.5, 0.5, 0.5], [0.1, 0.5, 0.5]])
    assert match_top1(out, span_xx_to_cxw(moments), moments, (10, 1, 4)).tolist() == [0, 1]


def test_hungarian_matcher_assigns_each_window_once():
    windows = [torch.tensor([[0.0, 0.2], [0.6, 1.0]])]
    spans = [[[0.8, 0.4], [0.1, 0.2], [0.5, 0.1]]]  # pred 0 = window 1, pred 1 = window 0
    out = _outputs(spans, [[0.5, 0.5, 0.5]])
    (rows, cols), = match_hungarian(out, [span_xx_to_cxw(w) for w in windows], windows, (10, 1, 4))
    assert dict(zip(rows.tolist(), cols.tolist(), strict=False)) == {0: 1, 1: 0}


# -- losses against hand computations -------------------------------------------------------------


def test_span_giou_and_label_losses_by_hand():
    moments = torch.tensor([[0.2, 0.6]])
    spans = [[[0.4, 0.4], [0.5, 0.2], [0.3, 0.2]]]
    out = {"pred_spans": torch.tensor(spans), "pred_logits": torch.zeros(1, 3, 2)}
    crit = MESMCriterion()
    losses = crit.span_label_losses(out, {"norm_span": span_xx_to_cxw(moments), "norm_moment": moments})
    # all probabilities equal: the exact span (pred 0) has the lowest cost
    assert losses["loss_span"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # CE = log 2 everywhere; weights 1 (matched, foreground) and 0.1 (2 background); plain mean over 3
    assert losses["loss_label"].item() == pytest.approx(math.log(2) * (1 + 0.1 + 0.1) / 3, rel=1e-5)

    out["pred_spans"] = torch.tensor([[[0.5, 0.2], [0.5, 0.2], [0.5, 0.2]]])
    losses = crit.span_label_losses(out, {"norm_span": span_xx_to_cxw(moments), "norm_moment": moments})
    # pred [0.4, 0.6] vs GT [0.2, 0.6]: L1 = mean(|0.5-0.4|, |0.2-0.4|) = 0.15; IoU = 0.2/0.4, hull = union
    assert losses["loss_span"].item() == pytest.approx(0.15, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(0.5, rel=1e-5)


def test_label_smoothed_nll_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[True, True, False]])

    def term(p, label):
        return 0.9 * -math.log(p[label]) + 0.1 / 3 * sum(-math.log(x) for x in p)

    expected = (term([0.5, 0.25, 0.25], 0) + term([0.2, 0.6, 0.2], 1)) / 2  # padding excluded
    assert label_smoothed_nll(logits, labels, mask).item() == pytest.approx(expected, rel=1e-5)


def test_saliency_loss_by_hand():
    scores = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 2.0]])
    mask = torch.tensor([[True, True]])
    labels = torch.tensor([[1.0, 0.0]])
    neg_pair = math.log(2) + -math.log(1 - 1 / (1 + math.exp(-2.0)))
    # rank contrastive, r = 1 only: slots [1, 0, 0, 2] / 0.5, positive = slot 0
    logits = [2.0, 0.0, 0.0, 4.0]
    rank = -(logits[0] - math.log(sum(math.exp(x) for x in logits))) / 12
    got = saliency_loss(scores, neg, mask, labels, rank_coef=12)
    assert got.item() == pytest.approx(neg_pair + rank, rel=1e-4)
    # triplet: margin 0.2 + s_neg - s_pos = 0.2 + 0 - 1 < 0 -> 0; swapped -> 1.2 * 2 / (1 * 1)
    trip = (torch.tensor([[1]]), torch.tensor([[0]]), 0.2)
    with_trip = saliency_loss(scores, neg, mask, labels, rank_coef=12, triplet=trip)
    assert with_trip.item() == pytest.approx(neg_pair + rank + 2.4, rel=1e-4)
    # no negative pass (a single video): only the positive half of the rank term remains
    alone = saliency_loss(scores, None, mask, labels, rank_coef=1)
    assert alone.item() == pytest.approx(-(2.0 - math.log(math.exp(2.0) + 1.0)), rel=1e-4)


def test_saliency_rank_thresholds_for_graded_labels():
    # QVH labels 0..12: thresholds r = 1..11 each add a term while any label >= r
    scores, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[True, True]])
    labels = torch.tensor([[3.0, 0.0]])
    got = saliency_loss(scores, None, mask, labels, rank_coef=1)
    assert got.item() == pytest.approx(3 * math.log(2), rel=1e-4)  # r = 1, 2, 3, uniform softmax


def test_segment_sentence_loss_by_hand():
    clip = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    words = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    moments = torch.tensor([[0.0, 0.5], [0.0, 0.5], [0.5, 1.0]])
    # groups [2, 1]: queries 0 and 1 share a moment (gIoU 1 >= 0.9): positives {0,1} for both rows
    sim = (clip @ words.T / 0.5).tolist()

    def log_softmax(row, j):
        return row[j] - math.log(sum(math.exp(x) for x in row))

    expected = (-(log_softmax(sim[0], 0) + log_softmax(sim[0], 1)) / 2
                - (log_softmax(sim[1], 0) + log_softmax(sim[1], 1)) / 2
                - log_softmax(sim[2], 2)) / 3
    got = segment_sentence_loss(clip, words, moments, [2, 1], gamma=0.9, tau=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-4)


# -- masking, negatives ---------------------------------------------------------------------------


def test_mask_words_count_and_pos_weights():
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for i, length in enumerate([1, 2, 7, 9]):
        mask[i, :length] = True
    weight = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0],
                           [0, 2, 0, 0, 0, 0, 0, 0, 0],
                           [1, 2, 1, 2, 1, 2, 1, 0, 0],
                           [0, 2, 2, 1, 1, 1, 1, 1, 0]])  # CLIP style: SOT/EOT weigh 0
    gen = torch.Generator().manual_seed(0)
    picked = torch.zeros(4, 9)
    for _ in range(400):
        m = mask_words(mask, weight, gen)
        assert m.sum(1).tolist() == [0, 1, 2, 3]  # max(l // 3, 1) for l > 1, none for l = 1
        assert not (m & (weight == 0)).any()  # zero-weight tokens are never picked
        picked += m
    # POS weight 2 (nouns, verbs, ...) is picked about twice as often as weight 1 with 1 pick
    row = picked[1]
    assert row[1] == 400
    heavy, light = picked[2, [1, 3, 5]].mean(), picked[2, [0, 2, 4, 6]].mean()
    assert 1.5 < heavy / light < 2.7


def test_negatives_come_from_another_video():
    gen = torch.Generator().manual_seed(0)
    groups = [2, 1, 3]
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    for _ in range(50):
        neg = sample_outclass_negatives(groups, generator=gen)
        assert (owner[neg] != owner).all()


# -- the network ----------------------------------------------------------------------------------


def tiny_batch(num_clips=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    b, length, width = sum(num_clips), 12, 7
    video_mask = torch.ones(b, length, dtype=torch.bool)
    video_mask[-1, 9:] = False
    ids = torch.randint(1, 12, (b, width), generator=g)
    ids[:, 5:] = 0
    moments = torch.rand(b, 2, generator=g).sort(dim=1)[0]
    moments[:, 1] = torch.maximum(moments[:, 1], moments[:, 0] + 0.2).clamp(max=1.0)
    clip_mask = torch.zeros(b, length, dtype=torch.bool)
    for i, (s, e) in enumerate(moments.tolist()):
        clip_mask[i, int(s * 8) : int(e * 8) + 1] = True
    return {
        "num_clips": list(num_clips), "video_feat": torch.randn(b, length, 10, generator=g) * video_mask[..., None],
        "video_mask": video_mask, "words_id": ids, "words_mask": ids != 0, "words_weight": (ids != 0).long() * 2,
        "unknown_mask": ids > 9, "words_label": torch.randint(0, 9, (b, width), generator=g), "clip_mask": clip_mask,
        "norm_moment": moments, "norm_span": span_xx_to_cxw(moments),
        "pos_idx": torch.zeros(b, 2, dtype=torch.long), "neg_idx": torch.zeros(b, 2, dtype=torch.long),
    }


def tiny_net(**kw):
    torch.manual_seed(0)
    return MESMNet(nn.Embedding(12, 16), vid_dim=10, txt_dim=16, num_word_classes=9, hidden_dim=32, nheads=4,
                   dim_feedforward=64, num_recss_layers=1, **kw)


def test_forward_shapes_and_negative_pass():
    net, batch = tiny_net(), tiny_batch()
    out = net.train()(batch)
    assert out["pred_spans"].shape == (5, 10, 2) and out["pred_logits"].shape == (5, 10, 2)
    assert len(out["aux_outputs"]) == 1
    assert out["saliency_scores"].shape == out["neg_saliency_scores"].shape == (5, 12)
    owner = torch.tensor([0, 0, 1, 1, 1])
    assert (owner[out["neg_index"]] != owner).all()
    assert out["recfw_words_logit"].shape == (5, 7, 9)
    # the frozen text encoder gets no gradient; everything else trains
    losses, total = MESMCriterion()(out, batch)
    total.backward()
    assert net.text_encoder.weight.grad is None
    assert net.global_rep_token.grad is not None and net.masked_token.grad is not None
    assert set(losses) >= {"loss_span", "loss_giou", "loss_label", "loss_saliency", "loss_rec_fw", "loss_rec_ss",
                           "loss_span_0", "loss_giou_0", "loss_label_0"}


def test_single_video_batch_trains():
    net, batch = tiny_net(), tiny_batch(num_clips=(3,))
    out = net.train()(batch)
    assert "neg_saliency_scores" not in out
    losses, total = MESMCriterion()(out, batch)
    assert torch.isfinite(total)
    total.backward()


def test_overfits_one_batch():
    net, batch = tiny_net(dropout=0.0, input_dropout=0.0), tiny_batch()
    crit = MESMCriterion()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    net.train()
    history = []
    for _ in range(70):
        losses, total = crit(net(batch), batch)
        history.append({k: v.item() for k, v in losses.items()} | {"total": total.item()})
        opt.zero_grad()
        total.backward()
        opt.step()
    first, last = history[0], history[-1]
    # the matched predictions sit on their GT moments, the saliency and reconstruction terms fall
    assert last["loss_giou"] < 0.15 and last["loss_span"] < 0.3 * first["loss_span"]
    assert last["loss_saliency"] < 0.2 * first["loss_saliency"]
    assert last["loss_rec_fw"] < first["loss_rec_fw"] and last["loss_rec_ss"] < first["loss_rec_ss"]
    assert last["total"] < 0.3 * first["total"]


# -- published configs ----------------------------------------------------------------------------

# Parameter counts of lntzm/MESM's model built from each released config (with use_tef's +2):
# all parameters (frozen CLIP text tower included) and the trainable ones.
OFFICIAL_COUNTS = {
    "mesm_charades_vgg_glove": (13_081_395, 13_081_395, 4098, 300),
    "mesm_charades_csf_clip": (76_234_885, 12_806_789, 2818, 512),
    "mesm_charades_cg": (76_234_885, 12_806_789, 2818, 512),
    "mesm_qvhighlights": (77_238_454, 13_810_358, 2818, 512),
    "mesm_tacos_c3d_glove": (None, 14_134_579, 4098, 300),  # + the frozen GloVe table (|vocab| x 300)
}


class _NoText(nn.Module):
    def forward(self, ids):
        return ids


@pytest.mark.parametrize("profile", sorted(OFFICIAL_COUNTS))
def test_parameter_count_equals_official(profile):
    total, trainable, vid_dim, txt_dim = OFFICIAL_COUNTS[profile]
    cfg, _ = effective(f"{profile}.yaml", "mesm")  # what `vmr train --profile` builds
    num_classes = cfg.vocab_size + (3 if cfg.text_encoder == "clip" else 1)
    net = MESMNet(_NoText(), vid_dim, txt_dim, num_classes, hidden_dim=cfg.hidden_dim, nheads=cfg.nheads,
                  dim_feedforward=cfg.dim_feedforward, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
                  t2v_layers=cfg.t2v_layers, num_recfw_layers=cfg.num_recfw_layers,
                  num_recss_layers=cfg.num_recss_layers, num_queries=cfg.num_queries, max_words_l=cfg.max_words_l,
                  share_mlp=cfg.share_mlp)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == trainable
    if total is not None and cfg.text_encoder == "clip":
        clip_tower_params = 63_428_096  # ViT-B/32 text tower incl. text_projection
        assert trainable + clip_tower_params == total


def test_clip_text_checkpoint_roundtrip_and_truncation(tmp_path):
    torch.manual_seed(0)
    source = build_clip_text_tower()
    state = {k: v.half() for k, v in source.state_dict().items()}  # as clip.load's fp16 weights
    state["context_length"] = torch.tensor(77)  # MESM's loader drops these three keys
    path = tmp_path / "clip_text_encoder.pth"
    torch.save(state, path)
    enc = ClipTextEncoder(max_words_l=16)
    digest = load_clip_text_checkpoint(enc.tower, str(path))
    with pytest.raises(ValueError, match="sha256"):
        load_clip_text_checkpoint(enc.tower, str(path), expected_sha256="0" * 64)
    torch.save(state | {"logit_scale": torch.tensor(1.0)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="logit_scale"):
        load_clip_text_checkpoint(enc.tower, str(tmp_path / "bad.pth"))
    assert len(digest) == 64
    # running the causal tower on the first 16 tokens equals the first 16 outputs of the 77-token pass
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :5] = torch.tensor([49406, 320, 2533, 1116, 49407])
    ids[1, :3] = torch.tensor([49406, 269, 49407])
    with torch.no_grad():
        full = enc.tower.ln_final(enc.tower.transformer(enc.tower.token_embedding(ids) + enc.tower.positional_embedding,
                                                        attn_mask=enc.tower.attn_mask))
        short = enc(ids)
    assert short.shape == (2, 16, 512)
    assert torch.allclose(short, full[:, :16], atol=1e-4)


# -- tokenizers -----------------------------------------------------------------------------------


def test_glove_pkl_tokenizer(tmp_path):
    write_glove_pkl(tmp_path / "glove.pkl")
    vocab = load_glove_pkl(tmp_path / "glove.pkl")
    tok = MesmTokenizer("glove_pkl", str(tmp_path), vocab_size=3, max_words_l=16, glove_pkl=vocab)
    t = tok("A person opens the xyzzy door.")
    # unknown-to-GloVe words are dropped; labels: most_common(3) = a, person, opens; others <unknown> = 3
    assert t.ids == [vocab["w2id"][w] for w in ["a", "person", "opens", "the", "door", "."]]
    assert t.labels == [0, 1, 2, 3, 3, 3] and t.unknown == [False, False, False, True, True, True]
    assert tok.num_classes == 4
    assert set(t.weights) <= {1, 2} and t.weights[1] == 2  # "person" is content


def test_clip_tokenizer_labels(tmp_path):
    (tmp_path / "CLIP_tokenized_count.txt").write_text("320 50\n2533 40\n269 30\n")
    tok = MesmTokenizer("clip", str(tmp_path), vocab_size=2, max_words_l=5, glove_pkl=None)
    t = tok("a person is putting a book.")
    assert t.ids[0] == 49406 and t.ids[-1] == 49407 and len(t.ids) == 5  # cut to max_words_l - 2 pieces
    assert t.ids[1:3] == [320, 2533]
    assert t.labels[0] == 3 and t.labels[-1] == 4 and t.labels[1:3] == [0, 1]  # <start>=V+1, <end>=V+2
    assert t.weights[0] == 0 and t.weights[-1] == 0


# -- decoding -------------------------------------------------------------------------------------


def test_decoding_sorts_clamps_and_rounds():
    spans = torch.tensor([[[0.5, 0.2], [0.05, 0.3], [0.9, 0.4]]])
    p = torch.tensor([[0.3, 0.9, 0.6]])
    outputs = {"pred_spans": spans, "pred_logits": torch.stack([p.log(), (1 - p).log()], -1),
               "saliency_scores": torch.tensor([[0.1, 0.2, 0.3, 0.4]])}
    (res,) = decode_predictions(outputs, torch.tensor([30.0]), torch.tensor([[True, True, True, False]]),
                                clip_len=2.0, max_ts_val=25)
    assert res["scores"] == [0.9, 0.6, 0.3]
    # [-3, 6] -> clamp [0, 6]; [21, 33] -> clamp [21, 25] -> multiples of 2 s with torch.round's
    # half-to-even (10.5 -> 10, 12.5 -> 12): [20, 24]; [12, 18]
    assert res["windows"] == [[0.0, 6.0], [20.0, 24.0], [12.0, 18.0]]
    assert res["saliency"] == pytest.approx([0.1, 0.2, 0.3])


# -- the registered model under the trainer contract ----------------------------------------------


def test_dataset_groups_queries_by_video_and_collates(charades_world):
    model = MESM(tiny_config(), charades_world.data)
    ds = model.build_dataset("train", charades_world.data, train=True)
    assert len(ds) == 3 and [len(item) for item in ds] == [2, 3, 2]
    batch = model.collate([ds[0], ds[1]])
    assert batch["num_clips"].tolist() == [2, 3]
    assert batch["video_feat"].shape == (5, 21, 14)  # 12-d features + TEF, padded to the longer video
    assert batch["video_mask"].sum(1).tolist() == [20, 20, 21, 21, 21]
    # GT frames int(st / clip_len) .. int(ed / clip_len), moments normalised by the duration
    assert batch["clip_mask"][0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert batch["norm_moment"][0].tolist() == pytest.approx([0.1, 0.3])


def test_training_step_and_prediction(charades_world):
    data = charades_world.data
    model = MESM(tiny_config(), data)
    ds = model.build_dataset("train", data, train=True)
    model.train()
    losses = model.training_step(model.collate([ds[0], ds[1]]), None)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    model.eval()
    preds = model.predict_step(model.collate([ds[2]]))
    assert len(preds) == 2 and len(preds[0]["pred_relevant_windows"]) == 10
    metrics = model.metrics(preds, [q for q in data.queries("train") if q.video_id == "V2"])
    assert {"R@1,IoU@0.5", "mIoU", "mAP"} <= set(metrics)
    assert model.weights_provenance()["text_encoder"].startswith("glove.pkl sha256")


def test_qvhighlights_run_produces_highlight_metrics(tmp_path):
    queries, lengths = [], {}
    for v in range(2):
        for c in range(2):
            vid = f"yt{v}_{c * 150}.0_{c * 150 + 150}.0"
            lengths[vid] = 75
            queries.append(Query("qvhighlights", "val", vid, 150.0, ((10.0, 20.0), (40.0, 44.0)),
                                 "a person opens the door.", 100 * v + c, relevant_clip_ids=(5, 6, 7, 8, 9, 20, 21),
                                 saliency_scores=((4, 3, 2), (2, 2, 2), (1, 0, 1), (0, 0, 0), (3, 4, 4), (2, 1, 1), (1, 2, 3))))
    world = World(tmp_path, {"train": queries, "val": queries}, lengths)
    cfg = tiny_config(layout="qvhighlights", clip_len=2.0, max_video_l=75, max_words_l=32, use_triplet=True,
                      loss_saliency_coef=1, loss_recfw_coef=0.5)
    model = MESM(cfg, world.data)
    ds = model.build_dataset("train", world.data, train=True)
    assert [len(item) for item in ds] == [2, 2]  # grouped by YouTube id
    batch = model.collate([ds[0], ds[1]])
    assert batch["saliency_label"][0, 5].item() == 9 and batch["clip_mask"][0, 8].item() is False
    model.train()
    loss = model.training_step(batch, None)["loss"]
    assert torch.isfinite(loss)
    model.eval()
    preds = [p for item in model.build_dataset("val", world.data, train=False) for p in model.predict_step(model.collate([item]))]
    metrics = model.metrics(preds, queries)
    assert {"HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1", "R@1,IoU@0.5", "mAP"} <= set(metrics)


def test_sentence_feature_conventions():
    table = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([[1, 2, 0]])
    for from_normalized, expected_dir in ((False, [3.0, 1.0]), (True, [1.0, 1.0])):
        net = MESMNet(nn.Embedding.from_pretrained(table), vid_dim=4, txt_dim=2, num_word_classes=3, hidden_dim=8,
                      nheads=2, dim_feedforward=8, sentence_from_normalized_words=from_normalized)
        words, sentence = net.encode_text(ids, ids != 0)
        assert torch.allclose(words[0, :2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # L2-normalised words
        assert torch.allclose(words[0, 2], torch.zeros(2))
        assert torch.allclose(sentence[0], torch.nn.functional.normalize(torch.tensor(expected_dir), dim=0), atol=1e-6)


def test_trains_and_reloads_under_the_shared_trainer(charades_world):
    data = charades_world.data
    cfg = tiny_config(epochs=2, select_metric="R@1,IoU@0.5")
    result = fit("mesm", MESM, cfg, data, device="cpu", select_split="test", resume=False)
    assert result.best_path.exists() and len(result.history) == 2
    assert "test/R@1,IoU@0.5" in result.history[-1] and "train/loss_rec_ss" in result.history[-1]
    env = setup_distributed("cpu")
    model, state = load_for_evaluation(MESM, result.best_path, data, env.device)
    preds, metrics = predict_and_score(model, model.eval_data("test", data), cfg.eval_batch_size, env)
    assert [p["qid"] for p in preds] == [q.qid for q in data.queries("test")]
    assert metrics == pytest.approx(state["metrics"])  # the reloaded model predicts what was selected


def test_optional_video_standardisation(charades_world):
    data = charades_world.data
    model = MESM(tiny_config(standardize_video=True), data)
    assert {"video_mean", "video_std"} <= set(model.state_dict())  # kept with the weights
    ds = model.build_dataset("train", data, train=True)
    frames = torch.cat([rec["video"][:, :12] for i in range(len(ds)) for rec in ds[i][:1]])
    assert frames.mean(0).abs().max() < 1e-4 and (frames.std(0, unbiased=False) - 1).abs().max() < 1e-3
    plain = MESM(tiny_config(), data).build_dataset("train", data, train=True)[0][0]["video"]
    assert torch.allclose(plain[:, :12], torch.nn.functional.normalize(plain[:, :12], dim=1))  # MESM: L2 only


def test_long_videos_are_pooled_with_mesm_clamped_bins(charades_world):
    """MESM's sample_video_feat clamps the bin edges to T-1 (lntzm/MESM dataset/base.py:104): a pooled
    video is `average_to_clips` of its L2-normalised frames, and its last frame is never averaged in."""
    data = charades_world.data
    ds = MESM(tiny_config(max_video_l=8), data).build_dataset("train", data, train=True)
    video = ds[2][0]["video"]  # V2: 22 frames -> 8
    with h5py.File(data.feature_file("clip"), "r") as h5:
        frames = h5["V2"][()]
    frames = l2_normalize(frames)
    np.testing.assert_allclose(video[:, :12].numpy(), average_to_clips(frames, 8), rtol=1e-6)
    # edges round(i * 22 / 8) = 0, 3, 6, 8, 11, 14, 16, 19, 22 -> 21: the last bin is frames 19 and 20
    np.testing.assert_allclose(video[-1, :12].numpy(), frames[19:21].mean(0), rtol=1e-6)


def write_row_windows(path: Path, seconds: float) -> None:
    """The `windows` attribute merge writes from extract's sidecars: (start, end) seconds per row."""
    with h5py.File(path, "a") as h5:
        for vid in h5:
            t = seconds * np.arange(len(h5[vid]))
            h5[vid].attrs["windows"] = np.stack([t, t + seconds], axis=1)


def test_clip_len_is_checked_against_the_feature_rows(charades_world):
    data = charades_world.data
    MESM(tiny_config(clip_len=2.0), data)  # no row times in the file: the config is trusted
    write_row_windows(data.feature_file("clip"), 1 / 6)
    MESM(tiny_config(clip_len=0.17), data)  # MESM's VGG config: 1/6 s written as 0.17
    MESM(tiny_config(clip_len=-1), data)  # TACoS: normalised times, nothing to check
    with pytest.raises(ValueError, match=r"model\.mesm\.clip_len is 1\.0 s but .*clip\.h5 has a feature row every 0\.1667 s"):
        MESM(tiny_config(clip_len=1.0), data)
    with pytest.raises(ValueError, match="clip_len"):
        tiny_config(clip_len=0)


# -- the released cross-attention mask ------------------------------------------------------------


def test_cross_attention_mask_order_as_released_and_corrected():
    """MESM's T2V layers pass attn_mask = (padded query x padded key).repeat(nhead, 1, 1): head-major,
    read by PyTorch batch-major, so on a batch of mixed lengths sample b's head h gets the mask of
    sample (b * nhead + h) % B. The default reproduces that; the corrected order equals no mask."""
    from models.mesm.layers import CrossAttentionLayer

    torch.manual_seed(0)
    b, lq, lk, d, heads = 3, 5, 4, 16, 4
    released = CrossAttentionLayer(d, heads, 32, dropout=0.0, official_mask_order=True).eval()
    corrected = CrossAttentionLayer(d, heads, 32, dropout=0.0, official_mask_order=False).eval()
    corrected.load_state_dict(released.state_dict())
    query, kv = torch.randn(b, lq, d), torch.randn(b, lk, d)
    query_pad = torch.arange(lq)[None] >= torch.tensor([5, 2, 3])[:, None]  # mixed lengths
    kv_pad = torch.arange(lk)[None] >= torch.tensor([4, 1, 2])[:, None]
    with torch.no_grad():
        ours = released(query, None, kv, None, kv_pad, query_pad)
        fixed = corrected(query, None, kv, None, kv_pad, query_pad)
        # the attention as the released layer calls it, on the same weights
        pair = query_pad.unsqueeze(2) & kv_pad.unsqueeze(1)
        def reference(mask):
            x = query + released.attn(query, kv, kv, key_padding_mask=kv_pad, attn_mask=mask, need_weights=False)[0]
            return released.norm2(x + released.ffn(released.norm1(x)))
        assert torch.allclose(ours, reference(pair.repeat(heads, 1, 1)), atol=1e-6)
        assert torch.allclose(fixed, reference(pair.repeat_interleave(heads, dim=0)), atol=1e-6)
        assert torch.allclose(fixed, reference(None), atol=1e-6)  # ordered correctly it changes nothing
        assert not torch.allclose(ours, fixed, atol=1e-4)  # as released, it does on mixed lengths


# -- batch dependence (docs/mesm.md) --------------------------------------------------------------


def mixed_lengths_world(root: Path) -> World:
    """Four videos of 9..33 rows with 1..3 queries each, sentences of 3..12 words."""
    sentences = ["a person opens the door.", "the circle moves left.", "the circle grows.",
                 "a person opens the door . the circle moves right ."]
    queries, lengths = [], {}
    for v, length in enumerate([9, 20, 33, 14]):
        vid = f"V{v}"
        lengths[vid] = length
        for k in range(1 + v % 3):
            st = 1.0 + 2 * k
            queries.append(Query("synthetic", "test", vid, float(length), ((st, st + 4.0),),
                                 sentences[(v + k) % 4], f"{vid}-{k}"))
    return World(root, {"test": queries, "train": queries}, lengths)


def test_batch_dependence_is_the_released_mask_and_nothing_else(tmp_path, capsys, monkeypatch):
    """Per-query predictions with every video alone (batch 1) and with all four in one batch. With the
    mask ordered correctly they are equal: nothing else in the network sees another sample's padding.
    As released they differ for some query, and a batch of one video gives the corrected result."""
    from pipeline.training.distributed import Dist
    from pipeline.training.trainer import predict

    world = mixed_lengths_world(tmp_path)
    released = MESM(tiny_config(), world.data)
    corrected = MESM(tiny_config(official_mask_order=False), world.data)
    corrected.load_state_dict(released.state_dict())
    env = Dist(rank=0, world_size=1, device=torch.device("cpu"))

    def per_query(model, batch_size):
        preds = predict(model, model.eval_data("test", world.data), batch_size, env)
        return {p["qid"]: np.array(p["pred_relevant_windows"]) for p in preds}

    def max_difference(a, b):
        assert a.keys() == b.keys()
        return max(float(np.abs(a[q] - b[q]).max()) for q in a)

    monkeypatch.setattr("models.mesm.model._NOTED", set())  # the note is logged once per process
    capsys.readouterr()
    fixed_alone, fixed_together = per_query(corrected, 1), per_query(corrected, 4)
    assert max_difference(fixed_alone, fixed_together) <= 1e-4  # scores are rounded to 4 decimals
    assert "official_mask_order" not in capsys.readouterr().err

    released_alone, released_together = per_query(released, 1), per_query(released, 4)
    assert max_difference(released_alone, fixed_alone) <= 1e-4
    assert max_difference(released_alone, released_together) > 1e-3
    err = capsys.readouterr().err
    assert err.count("note: MESM as released") == 1 and "4 videos per batch" in err

    # one video per call, as `vmr predict` runs: unaffected, with a note that evaluate may differ
    world.queries["one"] = [q for q in world.queries["test"] if q.video_id == "V2"]
    predict(released, released.eval_data("one", world.data), 30, env)
    assert "each video's queries run as one batch" in capsys.readouterr().err
