"""MMN: the sparse map and its mask, every block's shapes on the published configs, parameter counts,
the losses against hand computation, overfitting one batch, inference, and the text encoder."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.profiles import effective  # noqa: E402
from support.toy import toy_context  # noqa: E402

from models.common import (  # noqa: E402
    SparseMaxPool,
    fuse_scores,
    moment_to_iou2d,
    mutual_matching_loss,
    rank_moments,
    scaled_iou_bce_loss,
    sparse_proposal_mask,
)
from models.mmn import MMN, collate_videos  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROFILES = {name: REPO / "profiles" / f"mmn_{name}.yaml" for name in
            ("charades_vgg", "charades_i3d", "tacos_c3d", "activitynet_c3d")}
# (total, without DistilBERT) from the official layer shapes (../shared/reference/mmn_mrnet.md §1.2:
# 121.56 M / 55.20 M Charades and TACoS, 152.22 M ANet; DistilBERT-base 66,362,880).
PARAMETERS = {
    "charades_vgg": (121_559_552, 55_196_672),
    "charades_i3d": (119_986_688, 53_623_808),
    "tacos_c3d": (121_559_552, 55_196_672),
    "activitynet_c3d": (152_218_112, 85_855_232),
}
VALID_CELLS = {"charades_vgg": 136, "charades_i3d": 136, "tacos_c3d": 2548, "activitynet_c3d": 1104}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmn")
    return toy_context(root / "data", root / "run")


def published(name: str) -> MMN.Config:
    cfg, _ = effective(PROFILES[name].name, "mmn")  # what `vmr train --profile` builds
    return cfg.model_copy(update={"features": ["toy"]})  # the toy file stands in; input_size is explicit


def tiny_config(**overrides) -> MMN.Config:
    base = dict(features=["toy"], input_size=None, num_pre_clips=8, num_clips=4, pool_kernel=2,
                pooling_counts=[3], feat_hidden=16, pred_hidden=16, pred_kernel=3, pred_layers=2,
                joint_size=16, text_dim=16, text_layers=1, text_heads=2, text_ffn=32, vocab_size=120,
                freeze_bert=0, iou_thresholds=[0.3, 0.5, 0.7], batch_size=4, eval_batch_size=4)
    return MMN.Config(**{**base, **overrides})


# -- the sparse 2D map ----------------------------------------------------------------------------


def _rule_mask(n: int, counts: list[int]) -> np.ndarray:
    """The sampling rule written out: group g (stride 2^g) adds `count` diagonals at offsets growing
    by the stride, starting at rows that are multiples of the stride."""
    mask = np.eye(n, dtype=bool)
    offset, stride = 0, 1
    for count in counts:
        for _ in range(count):
            offset += stride
            for i in range(0, n - offset, stride):
                mask[i, i + offset] = True
        stride *= 2
    return mask


@pytest.mark.parametrize("n,counts,valid,max_offset", [
    (16, [15], 136, 15), (64, [15, 8, 8], 1104, 63), (128, [15, 8, 8, 8], 2548, 127)])
def test_valid_proposal_mask_follows_the_sparse_sampling_rule(n, counts, valid, max_offset):
    mask, _ = sparse_proposal_mask(n, counts)
    assert np.array_equal(mask.numpy(), _rule_mask(n, counts))
    assert int(mask.sum()) == valid
    rows, cols = np.nonzero(mask.numpy())
    assert (cols >= rows).all() and (cols - rows).max() == max_offset


def test_sparse_max_pool_cell_is_the_max_over_its_clips():
    torch.manual_seed(0)
    pool = SparseMaxPool([15, 8, 8], 64)
    x = torch.randn(2, 3, 64)
    map2d = pool(x)
    mask = pool.mask2d
    for i, j in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        torch.testing.assert_close(map2d[:, :, i, j], x[:, :, i : j + 1].max(dim=2).values)
    assert (map2d[:, :, ~mask] == 0).all()


# -- shapes and parameter counts on the published configs -----------------------------------------


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_shapes_and_parameter_count_on_each_published_config(name, toy):
    cfg = published(name)
    with torch.device("meta"):  # shapes and counts without allocating 120 M parameters
        model = MMN(cfg, toy)
    model = model.to("meta")
    total = sum(p.numel() for p in model.parameters())
    bert = sum(p.numel() for p in model.text_encoder.bert.parameters())
    assert (total, total - bert) == PARAMETERS[name]
    assert bert == 66_362_880

    b, n = 2, cfg.num_clips
    pre = model.featpool(torch.empty(b, cfg.num_pre_clips, cfg.input_size, device="meta"))
    assert pre.shape == (b, cfg.feat_hidden, n)
    map2d = model.feat2d(pre)
    assert map2d.shape == (b, cfg.feat_hidden, n, n)
    contrastive, iou = model.proposal_conv(map2d)
    assert contrastive.shape == iou.shape == (b, cfg.joint_size, n, n)
    assert int(sparse_proposal_mask(n, cfg.pooling_counts)[0].sum()) == VALID_CELLS[name]


def test_text_encoder_shapes_distilbert_base(toy):
    cfg = published("charades_vgg")
    torch.manual_seed(0)
    model = MMN(cfg, toy)
    enc = [model.tokenizer.encode(s).ids for s in ["a person opens the door.", "someone sits down."]]
    tokens = torch.zeros(2, max(map(len, enc)), dtype=torch.long)
    for i, ids in enumerate(enc):
        tokens[i, : len(ids)] = torch.tensor(ids)
    sent, sent_iou = model.text_encoder(tokens, torch.tensor([len(e) for e in enc]))
    assert sent.shape == sent_iou.shape == (2, 256)


# -- losses against hand computation --------------------------------------------------------------


def test_moment_to_iou2d_by_hand():
    iou = moment_to_iou2d(torch.tensor([2.0, 6.0]), num_clips=4, duration=8.0)
    assert iou[1, 2] == 1.0  # [2, 6]
    assert iou[0, 0] == 0.0  # [0, 2]
    assert iou[0, 3] == pytest.approx(0.5)  # [0, 8]
    assert iou[1, 1] == pytest.approx(0.5)  # [2, 4]
    assert iou[3, 0] == 0.0  # reversed cell: no overlap


def test_scaled_iou_bce_loss_by_hand():
    mask = torch.tensor([[True, True], [False, True]])
    scores = torch.tensor([[[0.9, 0.2], [0.5, 0.6]]])
    ious = torch.tensor([[[0.8, 0.4], [1.0, 0.55]]])
    # valid cells: (0,0) 0.9 vs (0.8-0.5)/0.5=0.6; (0,1) 0.2 vs 0 (clamped); (1,1) 0.6 vs 0.1
    expected = -np.mean([0.6 * math.log(0.9) + 0.4 * math.log(0.1), math.log(0.8),
                         0.1 * math.log(0.6) + 0.9 * math.log(0.4)])
    assert scaled_iou_bce_loss(scores, ious, mask, 0.5, 1.0).item() == pytest.approx(expected, rel=1e-5)


def _reference_mutual_matching(map2d, sents, ious, moments, mask, tv, ts, m, neg_iou, removal):
    """The formulas of the notes (§0.2), one term at a time (top_k = 1)."""
    def unit(v):
        return v / np.linalg.norm(v)

    cells = [tuple(c) for c in np.argwhere(mask)]
    feats = [[unit(map2d[i][:, a, b]) for a, b in cells] for i in range(len(sents))]
    all_s = [(i, unit(s)) for i, ss in enumerate(sents) for s in ss]
    all_gt = [g for gs in moments for g in gs]

    def iou1(a, b):
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        return inter / ((a[1] - a[0]) + (b[1] - b[0]) - inter)

    vid_terms, sent_terms, k = [], [], 0
    for i, ss in enumerate(sents):
        for n in range(len(ss)):
            s_k = all_s[k][1]
            cell_ious = [ious[i][n][a, b] for a, b in cells]
            p = int(np.argmax(cell_ious))
            v_p = feats[i][p]
            pos_v = (v_p @ s_k - m) / tv
            den = 0.0
            for j, (vj, s_j) in enumerate(all_s):
                keep = j == k or vj != i or iou1(all_gt[k], all_gt[j]) < removal
                if keep:
                    den += math.exp((v_p @ s_j - (m if j == k else 0.0)) / tv)
            vid_terms.append(pos_v - math.log(den))
            pos_s = (v_p @ s_k - m) / ts
            den = math.exp(pos_s)
            for q, v_q in enumerate(feats[i]):
                den += math.exp((s_k @ v_q) * (cell_ious[q] < neg_iou) / ts)
            for o in range(len(sents)):
                if o != i:
                    den += sum(math.exp((s_k @ v_q) / ts) for v_q in feats[o])
            sent_terms.append(pos_s - math.log(den + 1e-6))
            k += 1
    return -np.mean(vid_terms), -np.mean(sent_terms)


def test_mutual_matching_loss_by_hand():
    torch.manual_seed(0)
    n, c = 3, 4
    mask, _ = sparse_proposal_mask(n, [2])
    map2d = torch.randn(2, c, n, n, dtype=torch.float64)
    sents = [torch.randn(2, c, dtype=torch.float64), torch.randn(1, c, dtype=torch.float64)]
    # video 0: two overlapping sentences (IoU 0.6 >= 0.5: not negatives of each other)
    moments = [torch.tensor([[0.0, 3.0], [0.0, 5.0]], dtype=torch.float64), torch.tensor([[4.0, 9.0]], dtype=torch.float64)]
    ious = [torch.stack([moment_to_iou2d(g.float(), n, 9.0) for g in gs]).double() for gs in moments]
    loss_vid, loss_sent = mutual_matching_loss(
        map2d, sents, ious, moments, mask, tau_video=0.1, tau_sent=0.2, margin=0.3, top_k=1, neg_iou=0.5,
        sent_removal_iou=0.5)
    ref_vid, ref_sent = _reference_mutual_matching(
        map2d.numpy(), [s.numpy() for s in sents], [i.numpy() for i in ious], [g.numpy() for g in moments],
        mask.numpy(), 0.1, 0.2, 0.3, 0.5, 0.5)
    assert loss_vid.item() == pytest.approx(ref_vid, rel=1e-9)
    assert loss_sent.item() == pytest.approx(ref_sent, rel=1e-9)


# -- training and inference -----------------------------------------------------------------------


def test_overfitting_one_batch_drives_the_loss_near_zero(toy):
    torch.manual_seed(0)
    # binary IoU targets (min 0.5, max 0.51) so the BCE optimum is 0; contrastive terms off (their
    # optimum is bounded away from 0 by the temperature and the exp(0) terms)
    model = MMN(tiny_config(min_iou=0.5, max_iou=0.51, contrastive_weight=0.0, lr=3e-3), toy)
    data = model.build_dataset("train", toy, train=True)
    batch = collate_videos([data[i] for i in range(4)])
    opt = model.configure_optimizers().optimizers[0]
    model.train()
    model.on_train_epoch_start(1)
    from pipeline.training.trainer import StepContext

    ctx = StepContext(epoch=1, step=0, world_size=1, optimizer_step=lambda *a, **k: None)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = model.training_step(batch, ctx)["loss"]
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert first > 0.3 and loss.item() < 0.02


def test_inference_scores_and_nms():
    contrastive = torch.tensor([[[0.6, 0.2], [0.0, -1.0]]])
    iou = torch.tensor([[[0.5, 0.9], [0.0, 0.4]]])
    fused = fuse_scores(contrastive, iou, 0.5)
    assert fused[0, 0, 0].item() == pytest.approx(math.sqrt(0.8) * 0.5)
    assert fused[0, 1, 1].item() == 0.0
    # N=4 over 8 s: the best cell [0, 6] suppresses overlapping ones (IoU > 0.5), keeps [6, 8]
    mask, _ = sparse_proposal_mask(4, [3])
    score2d = torch.zeros(1, 4, 4)
    score2d[0, 0, 2] = 0.9  # [0, 6]
    score2d[0, 0, 1] = 0.8  # [0, 4]: IoU 0.67 with [0, 6] -> suppressed
    score2d[0, 3, 3] = 0.7  # [6, 8]: IoU 0 -> kept
    score2d[0, 1, 2] = 0.6  # [2, 6]: IoU 0.67 -> suppressed
    windows, scores, valid = rank_moments(score2d, mask, [8.0], nms_threshold=0.5, top_n=3)
    assert windows[0, :2].tolist() == [[0.0, 6.0], [6.0, 8.0]]
    assert scores[0, :2].tolist() == pytest.approx([0.9, 0.7])
    assert valid[0, :2].all()


def test_predictions_are_moment_detr_lines_and_metrics_follow_mmn(toy):
    torch.manual_seed(0)
    model = MMN(tiny_config(), toy).eval()
    data = model.build_dataset("test", toy, train=False)
    preds = model.predict_step(collate_videos([data[i] for i in range(len(data))]))
    queries = toy.queries("test")
    assert sorted(p["qid"] for p in preds) == sorted(q.qid for q in queries)
    for p in preds:
        assert set(p) == {"qid", "vid", "pred_relevant_windows"}
        scores = [w[2] for w in p["pred_relevant_windows"]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= model.cfg.num_windows
    metrics = model.metrics(preds, queries)
    assert {"R@1,IoU@0.5", "R@5,IoU@0.7", "mIoU", "Best_R1", "Best_R5"} <= set(metrics)
    # a perfect prediction scores 100
    perfect = [{"qid": q.qid, "vid": q.video_id, "pred_relevant_windows": [[*q.moment, 1.0]]} for q in queries]
    assert model.metrics(perfect, queries)["R@1,IoU@0.7"] == 100.0


# -- text encoder: random WordPiece, or a local Hugging Face directory ----------------------------


def test_random_encoder_tokenizer_travels_in_the_state_dict(toy):
    torch.manual_seed(0)
    model = MMN(tiny_config(), toy)
    assert model.weights_provenance() == {"text_encoder": "random"}
    ids = model.tokenizer.encode("person does thing 3.").ids
    assert ids[0] == model.tokenizer.token_to_id("[CLS]") and ids[-1] == model.tokenizer.token_to_id("[SEP]")
    other = MMN(tiny_config(), toy)
    other.tokenizer = None
    other.load_state_dict(model.state_dict())
    assert other.tokenizer.encode("person does thing 3.").ids == ids


def test_distilbert_from_a_local_hf_directory(tmp_path, toy):
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    from pipeline.core.provenance import sha256_file

    hf = tmp_path / "distilbert"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "person", "does", "thing", "door", "open", "##s", "."]
    words += [str(i) for i in range(20)]
    hf.mkdir()
    (hf / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(1)
    DistilBertModel(DistilBertConfig(vocab_size=len(words), dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(hf)
    digest = sha256_file(hf / "model.safetensors")
    model = MMN(tiny_config(text_encoder=str(hf), text_encoder_sha256=digest), toy)
    assert model.weights_provenance() == {"text_encoder": digest}
    reference = DistilBertTokenizer.from_pretrained(hf)  # what MMN calls (uncased)
    for sentence in ["Person opens door.", "person does thing 12.", "Pérson  DOES\tthing"]:
        assert model.tokenizer.encode(sentence).ids == reference(sentence)["input_ids"]
    loaded = DistilBertModel.from_pretrained(hf)
    torch.testing.assert_close(model.text_encoder.bert.embeddings.word_embeddings.weight,
                               loaded.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match="sha256"):
        MMN(tiny_config(text_encoder=str(hf), text_encoder_sha256="0" * 64), toy)


def test_candidate_seconds_are_mmn_float32_grid_values():
    # NMS ties at IoU 0.5 are common on the grid: candidates must round exactly as MMN's float32
    # `grids * duration / num_clips`, or R@5 moves (seen: 73.08 vs 65.38 on the synthetic test split)
    mask, _ = sparse_proposal_mask(16, [15])
    score2d = torch.rand(1, 16, 16) * mask
    windows, _, valid = rank_moments(score2d, mask, [23.7], nms_threshold=1.0, top_n=136)
    grids = torch.nonzero(mask)
    grids[:, 1] += 1
    expected = {tuple(w) for w in (grids * 23.7 / 16).tolist()}
    assert valid.all() and {tuple(w) for w in windows[0].tolist()} == expected


def test_wordpiece_vocabulary_is_the_same_in_another_process():
    # tokenizers' own WordPiece trainer gives different vocabularies in different processes
    import subprocess

    from pipeline.text.tokenizers import train_wordpiece

    code = ("from pipeline.text.tokenizers import train_wordpiece; import sys; "
            "print(train_wordpiece(['The white circle grows bigger.', 'a red square moves up!'] * 3, 60).to_str())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=REPO).stdout.strip()
    here = train_wordpiece(["The white circle grows bigger.", "a red square moves up!"] * 3, 60)
    assert other == here.to_str()
    assert here.encode("the white square").tokens == ["[CLS]", "the", "white", "square", "[SEP]"]
