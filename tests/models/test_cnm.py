"""CNM: the Gaussian proposal, the causal dual transformer, the losses, the two-step update, the data
path and weak supervision (training never reads a timestamp)."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from support.profiles import effective  # noqa: E402

from models.cnm import (
    CNM,
    Attention,
    CNMConfig,
    Decoder,
    FairseqAdam,
    Vocabulary,
    cnm_metrics,
    collate,
    encode_query,
    future_mask,
    gaussian_weights,
    inverse_sqrt_lr,
    ivc_loss,
    load_official_checkpoint,
    proposal_frame_indices,
    proposal_windows,
    reconstruction_loss,
    sample_masked_words,
    sinusoidal_positions,
    smoothed_nll,
)
from pipeline.core.params import DatasetParams
from pipeline.media.features import average_to_clips
from pipeline.text.annotations import Query
from pipeline.training.trainer import DataContext, fit

REPO = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=16, num_heads=2, num_decoder_layers1=1, num_decoder_layers2=1, max_num_frames=8)


def tiny_model(seed: int = 0, frame_dim: int = 6, num_classes: int = 9, **overrides) -> CNM:
    torch.manual_seed(seed)
    return CNM(CNMConfig(**{**TINY, **overrides}), frame_dim=frame_dim, num_classes=num_classes)


def tiny_batch(seed: int = 1, frame_dim: int = 6, num_classes: int = 9, num_frames: int = 8):
    g = torch.Generator().manual_seed(seed)
    words_len = torch.tensor([4, 2, 5])
    L = int(words_len.max())
    words_feat = torch.randn(3, L + 1, 300, generator=g)
    words_id = torch.randint(1, num_classes, (3, L), generator=g)
    weights = torch.rand(3, L, generator=g)
    for i, n in enumerate(words_len.tolist()):
        words_feat[i, n + 1 :], words_id[i, n:], weights[i, n:] = 0, 0, 0
        weights[i, :n] /= weights[i, :n].sum()
    frames = torch.randn(3, num_frames, frame_dim, generator=g)
    return {"frames_feat": frames, "words_feat": words_feat, "words_len": words_len, "words_id": words_id,
            "weights": weights}


# -- the Gaussian proposal --------------------------------------------------------------------------


def test_gaussian_weights_match_hand_computed_values():
    w = gaussian_weights(torch.tensor([0.5, 0.0]), torch.tensor([0.2, 0.05]), num_frames=5, alpha=5.0)
    t = [0.0, 0.25, 0.5, 0.75, 1.0]
    expected_0 = [math.exp(-5 * (x - 0.5) ** 2 / 0.2**2) for x in t]
    expected_1 = [math.exp(-5 * x**2 / 0.1**2) for x in t]  # width 0.05 is clamped to 0.1
    assert w[0].tolist() == pytest.approx(expected_0, rel=1e-5)
    assert w[1].tolist() == pytest.approx(expected_1, rel=1e-5, abs=1e-30)
    assert w[0, 2] == 1.0 and w[0, 1] == pytest.approx(math.exp(-7.8125), rel=1e-5)


def test_proposal_frames_and_windows():
    # CNM keeps linspace(0, 199, 50).long() of its 200 frames
    idx = proposal_frame_indices(200)
    assert len(idx) == 50 and idx[:4].tolist() == [0, 4, 8, 12] and idx[17] == 69 and idx[-1] == 199
    assert proposal_frame_indices(8).tolist() == [0, 7]
    win = proposal_windows(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.4, 0.2, 0.4]))
    assert win.flatten().tolist() == pytest.approx([0.0, 0.3, 0.4, 0.6, 0.7, 1.0])


def test_frames_are_resampled_by_bin_means_as_cnm():
    x = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    # T=5 -> 2 bins: edges round([0, 2.5, 5]) = [0, 2, 5] clipped to 4: the last frame is never averaged
    assert average_to_clips(x, 2)[:, 0].tolist() == [0.5, 2.5]
    # T=2 -> 4 bins (upsampling): edges [0, 0, 1, 2, 2] clipped to 1 -> frames 0, 0, 1, 1
    assert average_to_clips(x[:2], 4)[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_masked_word_sampling():
    words_len = torch.tensor([1, 3, 7])
    weights = torch.zeros(3, 7)
    weights[0, 0] = 1
    weights[1, 2] = 1  # one-hot: slot 3 (word 3) must be the one masked
    weights[2] = 1 / 7
    for seed in range(5):
        m = sample_masked_words(words_len, weights, 8, torch.Generator().manual_seed(seed))
        assert m.sum(1).tolist() == [1, 1, 2]  # max(l // 3, 1)
        assert not m[:, 0].any()  # the start slot is never masked
        assert m[0, 1] and m[1, 3]
        assert all(not m[i, int(n) + 1 :].any() for i, n in enumerate(words_len))


# -- the transformer --------------------------------------------------------------------------------


def test_future_mask_and_causal_decoder():
    assert torch.isinf(future_mask(3, 3)).tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    torch.manual_seed(0)
    dec = Decoder(2, 8, 2, dropout=0.0).eval()
    x, memory = torch.randn(1, 6, 8), torch.randn(1, 4, 8)
    pad = torch.zeros(1, 6, dtype=torch.bool)
    y = dec(x, pad, memory, torch.zeros(1, 4, dtype=torch.bool))
    x2 = x.clone()
    x2[:, 4:] += 1.0  # changing the future must not change the past
    y2 = dec(x2, pad, memory, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert not torch.allclose(y[:, 4:], y2[:, 4:], atol=1e-3)


def test_generator_sees_frames_causally_and_reads_the_last_frame():
    model = tiny_model(dropout=0.0, transformer_dropout=0.0).eval()
    b = tiny_batch()
    out = model(b["frames_feat"], b["words_feat"], b["words_len"])
    changed = b["frames_feat"].clone()
    changed[:, -1] += 1.0  # the proposal comes from the last frame's state, which sees every frame
    out2 = model(changed, b["words_feat"], b["words_len"])
    assert not torch.allclose(out["center"], out2["center"])
    # padding words do not matter
    padded = b["words_feat"].clone()
    padded[1, 3:] = 5.0
    out3 = model(b["frames_feat"], padded, b["words_len"])
    assert torch.allclose(out["center"], out3["center"], atol=1e-6)


def test_gaussian_attention_reweights_probabilities_over_keys():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    one_hot = torch.zeros(2, 5)
    one_hot[:, 2] = 1
    out = attn(q, k, key_weight=one_hot)
    # all the mass on key 2: every query returns key 2's value, projected
    v = torch.nn.functional.linear(k, attn.in_proj_weight[16:], attn.in_proj_bias[16:])
    expected = attn.out_proj(v[:, 2:3].expand(-1, 3, -1))
    assert torch.allclose(out, expected, atol=1e-5)
    # uniform weights change nothing
    assert torch.allclose(attn(q, k, key_weight=torch.full((2, 5), 0.3)), attn(q, k), atol=1e-6)


def test_word_positions_are_fairseq_sinusoids():
    pe = sinusoidal_positions(4, 8)
    assert pe[0].abs().sum() == 0  # padding index
    freq = [math.exp(-i * math.log(10000) / 3) for i in range(4)]
    assert pe[2].tolist() == pytest.approx([math.sin(2 * f) for f in freq] + [math.cos(2 * f) for f in freq], abs=1e-6)


def test_forward_matches_the_official_implementation():
    """Reference values computed once with minghangz/cnm's own CNM module (seed 0 init, same inputs)."""
    torch.manual_seed(0)
    cfg = CNMConfig(hidden_size=32, num_heads=4, num_decoder_layers1=2, num_decoder_layers2=2, dropout=0.0,
                    transformer_dropout=0.0, alpha=5.5, max_width=0.45)
    model = CNM(cfg, frame_dim=8, num_classes=12)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(3, 16, 8, generator=g)
    words_len = torch.tensor([4, 2, 5])
    words_feat = torch.randn(3, 6, 300, generator=g)
    words_id = torch.randint(1, 12, (3, 5), generator=g)
    for i, n in enumerate(words_len.tolist()):
        words_feat[i, n + 1 :], words_id[i, n:] = 0, 0
    weights = torch.zeros(3, 5)
    weights[0, 2] = weights[1, 0] = weights[2, 4] = 1  # deterministic masking
    model.eval()
    out = model(frames, words_feat, words_len)
    assert out["center"].tolist() == pytest.approx([0.4629821181, 0.5872344971, 0.5210549235], abs=1e-5)
    assert out["width"].tolist() == pytest.approx([0.2102033347, 0.2505705357, 0.1990704983], abs=1e-5)
    model.train()
    out = model(frames, words_feat, words_len, words_id, weights)
    assert reconstruction_loss(out).item() == pytest.approx(4.945061684, abs=1e-4)
    assert ivc_loss(out, 0.1, 0.15).item() == pytest.approx(0.411765337, abs=1e-4)
    assert out["words_logit"][0, 0, :4].tolist() == pytest.approx([-0.45516327, 0.04509092, -0.63000041, 6.24e-05],
                                                                  abs=1e-4)


# -- losses -----------------------------------------------------------------------------------------


def _nll_by_hand(a: float, eps: float = 0.1) -> float:
    """Two classes, logits [0, a], target 1: (1-eps)(-log p1) + eps/2 (-log p0 - log p1)."""
    log_p1 = a - math.log(1 + math.exp(a))
    log_p0 = -math.log(1 + math.exp(a))
    return -(1 - eps) * log_p1 - eps / 2 * (log_p0 + log_p1)


def test_label_smoothed_nll_is_masked_and_averaged_per_sentence():
    logits = torch.tensor([[[0.0, 1.0], [0.0, -2.0], [0.0, 30.0]]])
    loss = smoothed_nll(logits, torch.tensor([[1, 1, 1]]), torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx((_nll_by_hand(1.0) + _nll_by_hand(-2.0)) / 2, rel=1e-6)


def test_contrastive_margin_loss_hand_computed():
    def out(pos, hard, easy):
        as_logits = lambda a: torch.tensor([[[0.0, a]], [[0.0, a]]])  # noqa: E731
        return {"words_logit": as_logits(pos), "hard_neg_words_logit": as_logits(hard),
                "easy_neg_words_logit": as_logits(easy), "words_id": torch.ones(2, 1, dtype=torch.long),
                "words_mask": torch.ones(2, 1, dtype=torch.bool)}

    pos, hard, easy = _nll_by_hand(0.0), _nll_by_hand(-1.0), _nll_by_hand(2.0)
    # the hard negative already reconstructs worse by more than beta_1; the easy one does not
    expected = max(0.0, pos - hard + 0.1) + max(0.0, pos - easy + 0.15)
    assert max(0.0, pos - hard + 0.1) == 0.0 and expected > 0.5
    assert ivc_loss(out(0.0, -1.0, 2.0), 0.1, 0.15).item() == pytest.approx(expected, rel=1e-6)
    assert reconstruction_loss(out(0.0, -1.0, 2.0)).item() == pytest.approx(pos + hard, rel=1e-6)


def test_loss_mask_covers_the_end_of_shorter_sentences():
    """CNM's quirk: with words_len l < the batch max, positions 0..l (l + 1 of them) are scored."""
    model = tiny_model().train()
    b = tiny_batch()
    out = model(**b)
    assert out["words_mask"].sum(1).tolist() == [5, 3, 5]  # l + 1, capped at the batch max (5)
    assert out["words_logit"].shape == (3, 5, 9)


# -- optimisation -----------------------------------------------------------------------------------


class _Ctx:
    """The manual-optimisation part of the trainer's StepContext: zero, backward, step."""

    def __init__(self, optimizers, snapshots=None):
        self.optimizers, self.snapshots, self.model = optimizers, snapshots, None

    def optimizer_step(self, loss, index=0, retain_graph=False):
        opt = self.optimizers[index]
        opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain_graph)
        opt.step()
        if self.snapshots is not None:
            self.snapshots.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_the_two_steps_update_only_their_own_parameters():
    model = tiny_model()
    optim = model.configure_optimizers()
    gen_names = {"fc_mask_gen.weight", "fc_mask_gen.bias"}
    assert {id(p) for p in optim.optimizers[1].param_groups[0]["params"]} == {id(p) for p in model.fc_mask_gen.parameters()}
    assert len(optim.optimizers[0].param_groups[0]["params"]) == len(list(model.parameters())) - 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snaps = []
    ctx = _Ctx(optim.optimizers, snaps)
    ctx.model = model
    model.train()
    losses = model.training_step(tiny_batch(), ctx)
    after_rec, after_gen = snaps
    changed_rec = {k for k in before if not torch.equal(before[k], after_rec[k])}
    changed_gen = {k for k in before if not torch.equal(after_rec[k], after_gen[k])}
    assert changed_gen == gen_names
    assert not changed_rec & gen_names
    assert len(changed_rec) == len(before) - 2  # every reconstructor tensor got a gradient and moved
    assert all(p.requires_grad for p in model.parameters())  # restored after the step
    assert set(losses) == {"loss", "rec", "ivc"}


def test_clipping_counts_every_parameter_like_the_official_runner():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = FairseqAdam([p2], lr=1.0, clip_params=[p1, p2], max_norm=5.0)
    p1.grad, p2.grad = torch.tensor([30.0]), torch.tensor([40.0])  # p1: a stale gradient of the other step
    opt.step()
    assert p2.grad.item() == pytest.approx(4.0) and p1.grad.item() == pytest.approx(3.0)  # norm 50 -> 5


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_fairseq_adam_step_and_inverse_sqrt_schedule():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = FairseqAdam([p], lr=0.1)
    p.grad = torch.tensor([2.0])
    opt.step()
    # m = 0.2, v = 0.004; step = lr * sqrt(1 - .999) / (1 - .9) * m / (sqrt(v) + eps)
    step = 0.1 * math.sqrt(0.001) / 0.1 * 0.2 / (math.sqrt(0.004) + 1e-8)
    assert p.item() == pytest.approx(1.0 - step, rel=1e-6)
    assert inverse_sqrt_lr(0, 4e-4, 400, 1e-7) == 1e-7
    assert inverse_sqrt_lr(200, 4e-4, 400, 1e-7) == pytest.approx(1e-7 + 200 * (4e-4 - 1e-7) / 400)
    assert inverse_sqrt_lr(1600, 4e-4, 400, 1e-7) == pytest.approx(2e-4)
    model = tiny_model(lr=4e-4, warmup_updates=4)
    optim = model.configure_optimizers()
    lrs = []
    for _ in range(6):
        lrs.append(optim.optimizers[1].param_groups[0]["lr"])
        for s in optim.schedulers:
            s.step()
    assert lrs == pytest.approx([inverse_sqrt_lr(n, 4e-4, 4, 1e-7) for n in range(6)])


def test_grad_clip_of_the_trainer_is_refused():
    with pytest.raises(ValueError, match="clip_norm"):
        CNMConfig(grad_clip=10.0)


# -- published configs ------------------------------------------------------------------------------

# Parameter counts of the official CNM module built from each released config (verified by building
# minghangz/cnm's models/cnm.py: frame_fc, word_fc, 2 x 3 decoder layers, fc_rec (K + 1), fc_mask_gen).
OFFICIAL = {
    "cnm_charades_i3d.yaml": (1024, 1112, 5_371_058),
    "cnm_activitynet_clip.yaml": (512, 8001, 7_010_459),
    "cnm_activitynet_c3d.yaml": (500, 8001, 7_007_387),
}


@pytest.mark.parametrize("profile", sorted(OFFICIAL))
def test_parameter_count_equals_the_official_model(profile):
    cfg, _ = effective(profile, "cnm")  # what `vmr train --profile` builds
    frame_dim, num_classes, count = OFFICIAL[profile]
    assert cfg.vocab_size + 1 == num_classes
    model = CNM(cfg, frame_dim=frame_dim, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == 118  # the official state dict's number of tensors


def test_official_checkpoint_format_loads(tmp_path):
    import hashlib

    src = tiny_model(seed=3)
    path = tmp_path / "model-best.pt"
    torch.save({"num_updates": 7, "config": {"model": {"name": "CNM"}}, "model_parameters": src.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = tiny_model(seed=4, weights=str(path), weights_sha256=digest)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True))
    assert model.weights_provenance()["cnm_checkpoint"] == digest
    with pytest.raises(Exception, match="sha256"):
        tiny_model(weights=str(path), weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_official_checkpoint(tiny_model(frame_dim=7), path)


# -- data -------------------------------------------------------------------------------------------

GLOVE_WORDS = ["<PAD>", "the", "red", "circle", "moves", "left", "grows", "square", "blue", "."]


def write_glove_pkl(path: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    glove = {
        "w2id": {w: i for i, w in enumerate(GLOVE_WORDS)},
        "id2vec": [np.zeros(300, np.float32)] + [rng.normal(size=300).astype(np.float32) for _ in GLOVE_WORDS[1:]],
        "counter": Counter(counts),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(glove))


def test_vocabulary_and_query_encoding(tmp_path):
    write_glove_pkl(tmp_path / "glove.pkl", {"the": 9, ".": 9, "red": 5, "circle": 4, "moves": 3, "left": 1})
    vocab = Vocabulary(pickle.loads((tmp_path / "glove.pkl").read_bytes()), size=4)
    # most_common(4), ties in insertion order -> ids 1..4; 0 is padding
    assert vocab.word_to_class == {"the": 1, ".": 2, "red": 3, "circle": 4} and vocab.num_classes == 5
    enc = encode_query(["The", "red", "circle", "moves", "."], [1, 2, 2, 2, 1], vocab)
    assert enc["words_id"] == [1, 3, 4, 2]  # "moves" is not among the kept words: dropped
    assert enc["pos_weights"] == [1.0, 2.0, 2.0, 1.0]
    assert enc["words_feat"].shape == (5, 300)  # start placeholder + 4 words
    assert np.array_equal(enc["words_feat"][0], enc["words_feat"][1])
    with pytest.raises(ValueError, match="'moves left'"):
        encode_query(["moves", "left"], [2, 2], vocab, "moves left")


def test_collate_pads_and_softmaxes_the_pos_weights():
    items = [
        {"frames_feat": np.zeros((4, 2), np.float32), "words_id": [3, 1, 2], "words_feat": np.ones((4, 300), np.float32),
         "pos_weights": [2.0, 1.0, 2.0], "qid": 0, "vid": "a", "duration": 3.0},
        {"frames_feat": np.ones((4, 2), np.float32), "words_id": [5], "words_feat": np.ones((2, 300), np.float32),
         "pos_weights": [1.0], "qid": 1, "vid": "b", "duration": 4.0},
    ]
    b = collate(items, max_num_words=2)  # the first sentence is cut to 2 words
    assert b["words_len"].tolist() == [2, 1] and b["words_id"].tolist() == [[3, 1], [5, 0]]
    e = math.e
    assert b["weights"][0].tolist() == pytest.approx([e**2 / (e**2 + e), e / (e**2 + e)])
    assert b["weights"][1].tolist() == [1.0, 0.0]
    assert b["words_feat"].shape == (2, 3, 300) and b["words_feat"][1, 2].abs().sum() == 0
    assert b["qid"] == [0, 1] and b["duration"] == [3.0, 4.0]


def test_metrics_use_the_top1_window():
    queries = [Query("d", "test", "a", 10.0, ((2.0, 6.0),), "x", 0), Query("d", "test", "b", 10.0, ((0.0, 5.0),), "y", 1)]
    preds = [{"qid": 0, "vid": "a", "pred_relevant_windows": [[2.0, 4.0, 1.0], [2.0, 6.0, 0.5]]},
             {"qid": 1, "vid": "b", "pred_relevant_windows": [[6.0, 9.0, 1.0]]}]
    m = cnm_metrics(preds, queries)
    assert m["mIoU"] == pytest.approx(25.0) and m["R@1,IoU@0.5"] == 50.0 and m["R@1,IoU@0.7"] == 0.0
    assert set(m) == {"R@1,IoU@0.1", "R@1,IoU@0.3", "R@1,IoU@0.5", "R@1,IoU@0.7", "R@1,IoU@0.9", "mIoU"}


# -- weak supervision: training never reads a timestamp ---------------------------------------------

CAPTIONS = ["the red circle moves left.", "the blue square grows.", "the red square moves left.", "the blue circle grows."]


def write_tiny_dataset(root: Path, moments: str = "true", seed: int = 0) -> DataContext:
    """Charades-STA files, a merged HDF5 and a glove.pkl; `moments="garbage"` replaces every train moment."""
    rng = np.random.default_rng(seed)
    garbage = np.random.default_rng(12345)
    root.mkdir(parents=True, exist_ok=True)
    csv = ["id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"]
    with h5py.File(root / "clip.h5", "w") as h5:
        for split, n in (("train", 6), ("test", 2)):
            lines = []
            for i in range(n):
                vid, duration = f"{split[:2]}{i}", float(rng.integers(8, 14))
                h5[vid] = rng.normal(size=(int(duration), 6)).astype(np.float32)
                csv.append(f"{vid},S,room,5,6,Yes,s,,d,,{duration:.2f}")
                for j in range(2):
                    s, e = 2.0 * j, 2.0 * j + 3.0
                    if split == "train" and moments == "garbage":  # still valid under the `mmn` policy
                        s = float(garbage.uniform(0, duration))
                        e = s + float(garbage.uniform(0.1, 50))
                    lines.append(f"{vid} {s:.1f} {e:.1f}##{CAPTIONS[(i + j) % 4]}\n")
            (root / f"{split}.txt").write_text("".join(lines))
    (root / "videos.csv").write_text("\n".join(csv) + "\n")
    write_glove_pkl(root / "vocab" / "glove.pkl", {"the": 24, ".": 24, "red": 12, "blue": 12, "circle": 12,
                                                   "square": 12, "moves": 12, "left": 12, "grows": 12})
    dataset = DatasetParams(name="tiny", format="charades_sta", video_dir=str(root / "videos"),
                            splits={"train": str(root / "train.txt"), "test": str(root / "test.txt")},
                            durations=[str(root / "videos.csv")], cleaning="mmn", video_captions=None)
    return DataContext(dataset=dataset, features_dir=root, vocab_dir=root / "vocab", frames_dir=root / "frames",
                       run_dir=root / "run", seed=0)


def test_dataset_items_carry_no_timestamp_and_resample_frames(tmp_path):
    data = write_tiny_dataset(tmp_path)
    model = CNM(CNMConfig(**TINY), data)
    items = model.build_dataset("train", data, train=True)
    assert len(items) == 12 and model.vocab.num_classes == 9 + 1 and model.frame_fc.in_features == 6
    item = items[0]
    assert set(item) == {"qid", "vid", "duration", "words_id", "words_feat", "pos_weights", "frames_feat"}
    assert item["frames_feat"].shape == (8, 6)
    with h5py.File(tmp_path / "clip.h5") as h5:
        assert np.allclose(item["frames_feat"], average_to_clips(h5[item["vid"]][()], 8, "float64"))
    # "the red circle moves left." -> all five words plus "." are in the vocabulary
    assert len(item["words_id"]) == 6 and item["words_feat"].shape == (7, 300)


def official_cnm_frames(frames: np.ndarray, num_clips: int) -> np.ndarray:
    """CNM's resampling as minghangz/cnm datasets/base.py:24-37 (`_sample_frame_features`) computes it:
    numpy float64 bin edges, clamped by masking, bin means or the start row for an empty bin."""
    idx = np.round(np.arange(0, num_clips + 1) / num_clips * len(frames)).astype(np.int64)
    idx[idx >= len(frames)] = len(frames) - 1
    return np.stack([frames[s:e].mean(axis=0) if s < e else frames[s] for s, e in zip(idx[:-1], idx[1:], strict=True)])


def test_dataset_items_resample_with_cnms_float64_bin_edges(tmp_path):
    data = write_tiny_dataset(tmp_path)
    # T = 45 at 200 frames is a length where float32 edges (MMN's avgfeats) pick a different row for bin 140
    long = np.random.default_rng(3).normal(size=(45, 6)).astype(np.float32)
    with h5py.File(tmp_path / "clip.h5", "a") as h5:
        del h5["tr0"]
        h5["tr0"] = long
    model = CNM(CNMConfig(**{**TINY, "max_num_frames": 200}), data)
    items = model.build_dataset("train", data, train=True)
    frames = next(items[i]["frames_feat"] for i in range(len(items)) if items[i]["vid"] == "tr0")
    np.testing.assert_array_equal(frames, official_cnm_frames(long, 200))
    assert not np.array_equal(frames, average_to_clips(long, 200))  # the float32 convention differs here


def test_a_query_without_known_words_is_an_error_naming_it(tmp_path):
    data = write_tiny_dataset(tmp_path)
    text = (tmp_path / "train.txt").read_text().splitlines()
    vid = text[0].split()[0]
    (tmp_path / "train.txt").write_text("\n".join([*text, f"{vid} 1.0 2.0##xyzzy plugh"]) + "\n")
    model = CNM(CNMConfig(**TINY), data)
    with pytest.raises(ValueError, match="query 12 .*'xyzzy plugh'"):
        model.build_dataset("train", data, train=True)


def test_garbage_training_moments_leave_the_trained_weights_bit_identical(tmp_path):
    cfg = CNMConfig(**TINY, epochs=2, batch_size=4, warmup_updates=2)
    runs = {}
    for kind in ("true", "garbage"):
        data = write_tiny_dataset(tmp_path / kind, moments=kind)
        fit("cnm", CNM, cfg, data, device="cpu", select_split=None, resume=False)
        runs[kind] = torch.load(data.run_dir / "best.pt", weights_only=True)["model"]
    true_lines = (tmp_path / "true" / "train.txt").read_text().splitlines()
    garbage_lines = (tmp_path / "garbage" / "train.txt").read_text().splitlines()
    assert all(a.split("##")[0] != b.split("##")[0] for a, b in zip(true_lines, garbage_lines, strict=True))
    init = tiny_model(frame_dim=6, num_classes=10).state_dict()
    assert not torch.equal(init["fc_mask_gen.weight"], runs["true"]["fc_mask_gen.weight"])  # it did train
    assert runs["true"].keys() == runs["garbage"].keys()
    assert all(torch.equal(runs["true"][k], runs["garbage"][k]) for k in runs["true"])


def test_optional_feature_standardization_uses_training_videos_only(tmp_path):
    data = write_tiny_dataset(tmp_path)
    model = CNM(CNMConfig(**TINY, standardize_features=True), data)
    with h5py.File(tmp_path / "clip.h5") as h5:
        frames = np.concatenate([h5[f"tr{i}"][()] for i in range(6)])  # the test videos "te*" are left out
    assert np.allclose(model.frame_mean.numpy(), frames.mean(0), atol=1e-5)
    assert np.allclose(model.frame_std.numpy(), frames.std(0) + 1e-6, atol=1e-5)
    assert {"frame_mean", "frame_std"} <= set(model.state_dict())
    assert "frame_mean" not in CNM(CNMConfig(**TINY), data).state_dict()  # off: the official state dict
