"""GLSCL: scores against hand computations, losses on tiny inputs, the published shape, DDP gather."""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.profiles import effective  # noqa: E402

from models.glscl import GLSCL
from models.glscl.data import (
    FeatureClips,
    FrameClips,
    check_one_frame_per_second,
    glscl_protocol,
    keep_uniformly,
    retrieval_pairs,
    tokenize,
)
from models.glscl.model import (
    BertAdam,
    all_gather_local_grad,
    contrastive_loss,
    inter_consistency_loss,
    intra_diversity_loss,
    warmup_cosine,
)
from pipeline.core.params import DatasetParams
from pipeline.core.provenance import sha256_file
from pipeline.media.features import FeatureFile
from pipeline.media.h5merge import merge_to_hdf5
from pipeline.nets.clip import IMAGE_MEAN, IMAGE_STD
from pipeline.text.annotations import load_msrvtt_video_list
from pipeline.training.trainer import (
    DataContext,
    RetrievalResult,
    fit,
    load_for_evaluation,
    predict_and_score,
    setup_distributed,
)

TINY = dict(embed_dim=64, text_width=64, text_layers=2, vision_width=64, vision_layers=1, image_size=64,
            patch_size=32, decoder_heads=2, num_queries=4, temporal_layers=2, vocab_size=1000,
            context_length=16, max_words=8, max_frames=4, decoder_dropout=0.0)


def tiny(**overrides) -> GLSCL:
    torch.manual_seed(0)
    return GLSCL(GLSCL.Config(**{**TINY, **overrides}))


def tiny_batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 990, (n, 8), generator=g)
    lengths = torch.tensor([8, 5, 3, 6, 8, 4, 7, 2][:n])
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[torch.arange(n), lengths - 1] = 999  # EOT: the largest id
    video = torch.randn(n, 4, 3, 64, 64, generator=g)
    video_mask = (torch.arange(4)[None] < torch.tensor([4, 2, 3, 1, 4, 3, 2, 4][:n])[:, None]).long()
    return ids, mask, video, video_mask


# -- pairwise scores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gim_mask", ["after_softmax", "masked_softmax"])
def test_global_score_matches_a_hand_computation(gim_mask):
    model = tiny(gim_mask=gim_mask)
    g = torch.Generator().manual_seed(0)
    eot, frames = torch.randn(3, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = model.global_score(eot, frames, mask)
    for a in range(3):
        for b in range(2):
            logits = [float(eot[a] @ frames[b, t]) / 3.0 for t in range(4)]
            if gim_mask == "after_softmax":  # released: softmax over all slots, padding zeroed after
                z = sum(math.exp(x) for x in logits)
                w = [math.exp(x) / z * int(mask[b, t]) for t, x in enumerate(logits)]
            else:
                z = sum(math.exp(x) for t, x in enumerate(logits) if mask[b, t])
                w = [math.exp(x) / z if mask[b, t] else 0.0 for t, x in enumerate(logits)]
            pooled = sum(w[t] * frames[b, t] for t in range(4))
            assert got[a, b].item() == pytest.approx(F.cosine_similarity(eot[a], pooled, dim=0).item(), abs=1e-5)


def test_global_masking_after_softmax_rescales_and_can_underflow():
    """The released mask-after-softmax drops the padded share without renormalising: the pooled vector
    is a positive multiple of the properly masked one, so the cosine is the same in exact arithmetic.
    But padded slots still enter the softmax; when they dominate it, the valid weights underflow."""
    after, masked = tiny(gim_mask="after_softmax"), tiny(gim_mask="masked_softmax")
    torch.manual_seed(3)
    eot, frames = torch.randn(2, 64), torch.randn(2, 4, 64)
    padded = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    proper = masked.global_score(eot, frames, padded)
    assert torch.allclose(after.global_score(eot, frames, padded), proper, atol=1e-6)
    frames[0, 2:] = eot.sum(0) * 50  # padded slots aligned with both texts: huge logits
    assert torch.allclose(masked.global_score(eot, frames, padded), proper, atol=1e-6)  # unaffected
    assert after.global_score(eot, frames, padded)[:, 0].abs().max() < 1e-3  # collapsed


def test_local_score_is_the_mean_of_query_wise_cosines():
    text = F.normalize(torch.randn(3, 4, 64), dim=-1)
    video = F.normalize(torch.randn(5, 4, 64), dim=-1)
    got = GLSCL.local_score(text, video)
    for a in range(3):
        for b in range(5):
            cosines = [F.cosine_similarity(text[a, q], video[b, q], dim=0) for q in range(4)]
            assert got[a, b].item() == pytest.approx(float(sum(cosines) / 4), abs=1e-6)


def test_final_score_is_global_plus_lambda_local_and_blocks_agree():
    model = tiny(local_weight=0.5).eval()
    ids, mask, video, vmask = tiny_batch(4)
    with torch.no_grad():
        t = model.encode_text({"qid": [0, 1, 2, 3], "vid": list("abcd"), "ids": ids, "mask": mask})
        v = model.encode_video({"vid": list("abcd"), "video": video, "mask": vmask})
        eot, tc = t["emb"]
        frames, m, vc = v["emb"]
        full = model.similarity(t["emb"], v["emb"])
        expected = model.global_score(eot, frames, m) + 0.5 * model.local_score(tc, vc)
        halves = torch.cat([model.similarity((eot[:2], tc[:2]), v["emb"]),
                            model.similarity((eot[2:], tc[2:]), v["emb"])])
    assert full.dtype == torch.float32 and full.shape == (4, 4)
    assert torch.allclose(full, expected, atol=1e-6)
    assert torch.allclose(full, halves, atol=1e-6)
    # local concepts are unit rows
    assert torch.allclose(vc.norm(dim=-1), torch.ones(4, 4), atol=1e-5)


def test_decoder_memory_mask_flag():
    """Released: padded memory is attended to; with the flag, padding no longer changes the output."""
    ids, mask, video, vmask = tiny_batch(2)
    frames = torch.randn(2, 4, 64)
    garbage = frames.clone()
    garbage[vmask == 0] = 100.0
    for flag, same in ((False, False), (True, True)):
        model = tiny(decoder_memory_mask=flag).eval()
        with torch.no_grad():
            a = model.local_concepts(frames, vmask, "video")
            b = model.local_concepts(garbage, vmask, "video")
        assert torch.allclose(a, b, atol=1e-5) is same


# -- losses -------------------------------------------------------------------------------------------


def test_contrastive_loss_is_symmetric_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(3) / (math.exp(1) + math.exp(3)))) / 2
    cols = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1))) + math.log(math.exp(3) / (1 + math.exp(3)))) / 2
    assert contrastive_loss(logits).item() == pytest.approx((rows + cols) / 2, abs=1e-6)


def test_intra_diversity_loss_on_a_tiny_input():
    # two videos, three unit queries: q0 and q1 nearly parallel (cos 0.96), q2 orthogonal to both
    e = torch.eye(3)
    q1 = F.normalize(torch.tensor([1.0, 0.2917, 0.0]), dim=0)  # cos(q0,q1) = 0.96
    video = torch.stack([torch.stack([e[0], q1, e[2]])] * 2)
    c = float(q1[0])
    # G = Gram (identical for both videos): every off-diagonal hinge max(0, 0.1 + G_ij - 1), both ways
    hinge = max(0.0, 0.1 + c - 1.0)
    expected = (2 * 2 * hinge) / (3 * 2)  # pairs (0,1),(1,0) each hit twice (row and column terms)
    assert intra_diversity_loss(video, margin=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert intra_diversity_loss(torch.eye(3)[None].repeat(2, 1, 1)).item() == 0.0  # orthogonal: no loss


def test_inter_consistency_loss_on_a_tiny_input():
    video = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]]), dim=-1)
    text = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]), dim=-1)
    b, nq = 2, 2
    mse = float(((video.mean(0) - text.mean(0)) ** 2).mean())
    paired = [sum(float(video[i, q] @ text[i, q]) for i in range(b)) for q in range(nq)]
    for normalizer, div in (("num_queries", nq), ("batch", b)):
        diag = sum((p / div - 0.75) ** 2 for p in paired)
        got = inter_consistency_loss(video, text, beta=0.02, target=0.75, normalizer=normalizer)
        assert got.item() == pytest.approx(mse + 0.02 * diag, abs=1e-6)


def test_training_loss_is_the_sum_of_its_parts_and_trains():
    model = tiny(alpha=0.5, beta=0.5)
    ids, mask, video, vmask = tiny_batch(4)
    out = model(ids, mask, video, vmask)
    assert out["loss"].item() == pytest.approx((out["nce"] + out["idl"] + out["icl"]).item(), abs=1e-6)
    assert out["idl"].item() > 0 or out["icl"].item() > 0
    opt = BertAdam(model.param_groups(), lr=1e-3)
    for _ in range(5):
        opt.zero_grad()
        loss = model(ids, mask, video, vmask)["loss"]
        loss.backward()
        opt.step()
        model.after_step()
    assert model(ids, mask, video, vmask)["loss"].item() < out["loss"].item()


# -- optimisation ---------------------------------------------------------------------------------


def test_param_groups_split_clip_lr_and_decay_only_non_biases():
    model = tiny(lr=1e-4, coef_lr=1e-3, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.param_groups()
    seen = 0
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen += 1
            assert g["lr"] == pytest.approx(1e-7 if name.startswith("clip.") else 1e-4)
            assert g["weight_decay"] == (0.0 if "bias" in name else 0.2)
    assert seen == sum(p.requires_grad for p in model.parameters())
    assert "clip.visual.conv1.weight" not in {names[id(p)] for g in groups for p in g["params"]}  # frozen


def test_logit_scale_is_clamped_after_a_step():
    model = tiny()
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    model.on_after_optimizer_step(0)
    assert model.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_bert_adam_step_and_schedule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BertAdam([{"params": [p], "lr": 0.1, "weight_decay": 0.2}], lr=0.1, max_grad_norm=1.0)
    p.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to [0.6, 0.8]
    opt.step()
    g = torch.tensor([0.6, 0.8])
    m, v = 0.1 * g, 0.02 * g * g  # no bias correction
    expected = torch.tensor([1.0, -2.0]) - 0.1 * (m / (v.sqrt() + 1e-6) + 0.2 * torch.tensor([1.0, -2.0]))
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.5, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0)


# -- the published shape --------------------------------------------------------------------------


def _official_parameter_count() -> int:
    """DiCoSA/GLSCL `modeling.py` with the ViT-B/32 weights, counted from its module list."""
    d, vw, patch, grid = 512, 768, 32, 7
    block = lambda w: 4 * w * w + 4 * w + 2 * w + 2 * w * 4 * w + 4 * w + w + 2 * w  # attn, ln_1, mlp, ln_2  # noqa: E731
    visual = vw * 3 * patch * patch + vw + (grid * grid + 1) * vw + 2 * vw + 12 * block(vw) + 2 * vw + vw * d
    text = 49408 * d + 77 * d + 12 * block(d) + 2 * d + d * d + 1  # ..., ln_final, text_projection, logit_scale
    weight_fc = (2 * d * 4 * d + 4 * d) + (4 * d + 1)  # computed then discarded ("no weighting")
    temporal = 77 * d + 4 * block(d)  # frame_position_embeddings + transformerClip
    queries = 2 * 8 * d  # noun_queries, spatial_queries
    decoder_layer = 2 * (4 * d * d + 4 * d) + (d * 2048 + 2048) + (2048 * d + d) + 3 * 2 * d
    decoders = 2 * 3 * decoder_layer  # transformer_decoder_noun and _spatial
    return visual + text + weight_fc + temporal + queries + decoders


def test_parameter_count_equals_the_official_model():
    with torch.device("meta"):
        model = GLSCL(GLSCL.Config())
    ours = sum(p.numel() for p in model.parameters())
    weight_fc = 2 * 512 * 2048 + 2048 + 2048 + 1  # dead in the released forward: not built here
    assert _official_parameter_count() == 191_259_906
    assert ours + weight_fc == _official_parameter_count()
    assert sum(p.numel() for p in model.clip.parameters()) == 151_277_313  # OpenAI ViT-B/32


def test_temporal_module_starts_from_clip_text_blocks():
    model = tiny(text_layers=3, temporal_layers=2)
    for i in range(2):
        ours, theirs = model.temporal.resblocks[i].state_dict(), model.clip.transformer.resblocks[i].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(model.frame_position_embeddings.weight, model.clip.positional_embedding)
    q = model.video_queries
    assert q.min() >= 0 and q.max() < 1  # released init: torch.rand


def test_loads_openai_state_dict_and_checks_sha(tmp_path):
    source = tiny()
    state = {k: v.clone() for k, v in source.clip.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.0)
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(16), vocab_size=torch.tensor(1000))
    path = tmp_path / "ViT-B-32.pt"
    torch.save(state, path)
    loaded = GLSCL(GLSCL.Config(**TINY, weights=str(path), weights_sha256=sha256_file(path)))
    assert loaded.clip.logit_scale.item() == 4.0
    assert torch.equal(loaded.temporal.resblocks[1].mlp.c_fc.weight, state["transformer.resblocks.1.mlp.c_fc.weight"])
    assert loaded.weights_provenance()["clip"] == sha256_file(path)
    with pytest.raises(ValueError, match="sha256"):
        GLSCL(GLSCL.Config(**TINY, weights=str(path), weights_sha256="0" * 64))
    del state["ln_final.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="ln_final.weight"):
        GLSCL(GLSCL.Config(**TINY, weights=str(path)))


def test_head_flops_per_pair():
    """Pairwise path: GIM 2·(2TD) + cosine, LIM 2·Nq·D FLOPs; no learned weights (docs/glscl.md)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny()
    T, D, Nq = 4, 64, 4
    text = (torch.randn(1, D), F.normalize(torch.randn(1, Nq, D), dim=-1))
    video = (torch.randn(1, T, D), torch.ones(1, T), F.normalize(torch.randn(1, Nq, D), dim=-1))
    with FlopCounterMode(display=False) as counter:
        model.similarity(text, video)
    assert counter.get_total_flops() == 2 * T * D + 2 * T * D + 2 * D + 2 * Nq * D


# -- distributed: all-gather for the contrastive loss -----------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = torch.arange(6.0).view(3, 2) + 10 * rank
    gathered = all_gather_local_grad(x.requires_grad_())
    gathered.sum().backward()
    model = tiny()
    ids, mask, video, vmask = tiny_batch(4)
    share = slice(2 * rank, 2 * rank + 2)
    out = model(ids[share], mask[share], video[share], vmask[share])
    out["loss"].backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # what the trainer / DDP does: average over ranks
            grads[name] = p.grad / world
    torch.save({"gathered": gathered.detach(), "x_grad": x.grad, "loss": out["loss"].detach(), "grads": grads},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_all_gather_on_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2) + 10])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    assert torch.equal(r0["x_grad"], torch.ones(3, 2))  # only the local slice receives gradient

    model = tiny()  # the same global batch in one process
    ids, mask, video, vmask = tiny_batch(4)
    ref = model(ids, mask, video, vmask)
    ref["loss"].backward()
    assert r0["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5)
    assert r1["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        # the pairwise head runs on the gathered batch on every rank (full gradient); encoders see
        # only their local slice, so averaging over ranks gives 1/world of it (as released)
        scale = 1.0 if ("decoder" in name or "queries" in name or name == "clip.logit_scale") else 0.5
        assert torch.allclose(r0["grads"][name], scale * p.grad, atol=1e-5), name


# -- data -----------------------------------------------------------------------------------------


def test_tokenize_is_clip4clip_style():
    ids, mask = tokenize("a red circle moves to the left", 6)
    assert ids[0] == 49406 and ids[5] == 49407 and mask.tolist() == [1] * 6  # truncated to 4 words
    ids, mask = tokenize("a dog", 8)
    assert ids.tolist()[:4][-1] == 49407 and ids[4:].tolist() == [0] * 4 and mask.sum() == 4
    assert ids.argmax() == 3


def test_keep_uniformly_matches_released_linspace():
    assert keep_uniformly(5, 12).tolist() == [0, 1, 2, 3, 4]
    assert keep_uniformly(30, 12).tolist() == np.linspace(0, 29, 12, dtype=int).tolist()
    assert keep_uniformly(30, 12)[[0, -1]].tolist() == [0, 29]


def _write_tiny_msrvtt(root):
    """CLIP4Clip's MSR-VTT files in the published schema: 3 train videos x 2 captions, 2 test videos."""
    captions = {"video0": ["a man sings", "someone sings a song"], "video1": ["a cat runs", "the cat plays"],
                "video2": ["cars race", "a race"], "video9": ["ignored", "not in any split"]}
    sentences = [{"caption": c, "video_id": v, "sen_id": i}
                 for i, (v, c) in enumerate((v, c) for v, cs in captions.items() for c in cs)]
    data = {"info": {"contributor": "tests"},
            "videos": [{"category": 0, "url": "", "video_id": v, "start time": 0.0, "end time": 9.9,
                        "split": "train", "id": i} for i, v in enumerate(captions)],
            "sentences": sentences}
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7,video7,a person cooks\nret1,msr8,video8,a dog barks\n")


def test_msrvtt_pairs(tmp_path):
    _write_tiny_msrvtt(tmp_path)
    dataset = DatasetParams(name="msrvtt", format="msrvtt_json", video_captions=None,
                            splits={"train": str(tmp_path / "MSRVTT_data.json"),
                                    "test": str(tmp_path / "MSRVTT_JSFUSION_test.csv")},
                            durations=[str(tmp_path / "MSRVTT_train.9k.csv")])
    data = DataContext(dataset=dataset, features_dir=tmp_path, vocab_dir=tmp_path, frames_dir=tmp_path,
                       run_dir=tmp_path, seed=0)
    cfg = GLSCL.Config(source="msrvtt", input="features")
    assert set(data.input_files(GLSCL.needs(cfg, dataset))) == {"features.clip", "dataset.durations.0"}
    train = retrieval_pairs(cfg, data, "train")
    assert [(v, c) for _, v, c in train] == [("video0", "a man sings"), ("video0", "someone sings a song"),
                                             ("video1", "a cat runs"), ("video1", "the cat plays"),
                                             ("video2", "cars race"), ("video2", "a race")]
    test = retrieval_pairs(cfg, data, "test")
    assert test == [("ret0", "video7", "a person cooks"), ("ret1", "video8", "a dog barks")]


def test_msrvtt_real_split_files(shared_annotations):
    train = load_msrvtt_video_list(shared_annotations / "msrvtt" / "MSRVTT_train.9k.csv")
    assert len(train) == 9000 and len(set(train)) == 9000


def test_feature_clips_sample_and_pad(tmp_path):
    with h5py.File(tmp_path / "clip.h5", "w") as f:
        f["v1"] = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
        f["v2"] = np.ones((2, 3), dtype=np.float32)
    clips = FeatureClips(tmp_path / "clip.h5", max_frames=4)
    video, mask = clips("v1")
    assert video[:, 0].tolist() == [0.0, 18.0, 36.0, 57.0] and mask.tolist() == [1, 1, 1, 1]  # rows 0,6,12,19
    video, mask = clips("v2")
    assert mask.tolist() == [1, 1, 0, 0] and video[2:].abs().sum() == 0
    with pytest.raises(KeyError, match="v3"):
        clips("v3")


def _merged_features(root, row_seconds: float, name: str = "clip"):
    """features/<name>.h5 as `vmr extract` + `vmr merge` write it: each row's window in the sidecar."""
    src = root / "extracted"
    src.mkdir(parents=True)
    for vid, rows in (("a", 5), ("b", 3)):
        np.save(src / f"{vid}.npy", np.ones((rows, 4), dtype=np.float32))
        windows = [[k * row_seconds, (k + 1) * row_seconds] for k in range(rows)]
        (src / f"{vid}.json").write_text(json.dumps({"windows": windows}))
    merge_to_hdf5(src, root / "features" / f"{name}.h5")
    return root / "features" / f"{name}.h5"


def test_feature_rows_must_be_one_second_apart(tmp_path, capsys):
    """GLSCL takes a feature row for a frame at 1 fps: the row times merge recorded must agree."""
    one = _merged_features(tmp_path / "one", 1.0)
    FeatureClips(one, max_frames=4)  # agrees: no error, nothing logged
    assert "row times" not in capsys.readouterr().err

    two = _merged_features(tmp_path / "two", 2.0)  # e.g. extractors.clip.clip_len: 2 (QVHighlights)
    assert FeatureFile(two).seconds_per_row() == 2.0
    with pytest.raises(ValueError, match=r"two/features/clip\.h5: its rows are 2 s apart.*model\.glscl\.feature: clip"):
        FeatureClips(two, max_frames=4)

    with h5py.File(tmp_path / "bare.h5", "w") as f:  # not written by `vmr extract`: no row times
        f["a"] = np.ones((5, 4), dtype=np.float32)
    check_one_frame_per_second(FeatureFile(tmp_path / "bare.h5"))  # trusted ...
    assert "bare.h5: no row times" in capsys.readouterr().err  # ... and said so


# -- the shared trainer: train + evaluate on frozen features ------------------------------------------

COLOURS = ["red", "green", "blue", "white", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]


def _tiny_retrieval_dataset(root, dim=64, row_seconds: float | None = None):
    """18 videos (12 train / 6 test): a caption names a colour and a shape, and the video's frozen frame
    features carry them in fixed random directions plus noise. `row_seconds`: row times to record."""
    rng = np.random.default_rng(0)
    colour_dir, shape_dir = rng.normal(size=(6, dim)), rng.normal(size=(3, dim))
    vids = [f"S{i:04d}" for i in range(18)]
    captions, lines = {}, {"train": [], "test": []}
    ann = root / "annotations"
    ann.mkdir(parents=True)
    (root / "features").mkdir()
    with h5py.File(root / "features" / "clip.h5", "w") as f:
        for i, vid in enumerate(vids):
            c, s = i % 6, (i // 6) % 3
            captions[vid] = f"the {COLOURS[c]} {SHAPES[s]} moves"
            t = 3 + i % 5
            f[vid] = (colour_dir[c] + shape_dir[s] + 0.3 * rng.normal(size=(t, dim))).astype(np.float32)
            if row_seconds is not None:
                f[vid].attrs["windows"] = row_seconds * np.stack([np.arange(t), np.arange(1, t + 1)], axis=1)
            lines["train" if i < 12 else "test"].append(f"{vid} 0.0 1.0##{captions[vid]}.\n")
    (ann / "video_captions.json").write_text(json.dumps(captions))
    rows = "".join(f"{v},,,,,,,,,,10.0\n" for v in vids)
    (ann / "durations.csv").write_text("id,subject,scene,quality,relevance,verified,script,objects,"
                                       "descriptions,actions,length\n" + rows)
    for split in ("train", "test"):
        (ann / f"{split}.txt").write_text("".join(lines[split]))
    return DatasetParams(splits={s: str(ann / f"{s}.txt") for s in ("train", "test")},
                         durations=[str(ann / "durations.csv")], video_captions=str(ann / "video_captions.json"))


def test_the_row_time_check_runs_when_glscl_builds_its_data(tmp_path):
    dataset = _tiny_retrieval_dataset(tmp_path, row_seconds=2.0)
    data = DataContext(dataset=dataset, features_dir=tmp_path / "features", vocab_dir=tmp_path / "vocab",
                       frames_dir=tmp_path / "frames", run_dir=tmp_path / "runs" / "glscl", seed=0)
    model = GLSCL(GLSCL.Config(**{**TINY, "vocab_size": 49408, "input": "features"}), data)
    with pytest.raises(ValueError, match="clip.h5: its rows are 2 s apart"):
        model.build_dataset("train", data, train=True)


def test_trains_and_evaluates_on_frozen_features_with_the_shared_trainer(tmp_path):
    dataset = _tiny_retrieval_dataset(tmp_path)
    data = DataContext(dataset=dataset, features_dir=tmp_path / "features", vocab_dir=tmp_path / "vocab",
                       frames_dir=tmp_path / "frames", run_dir=tmp_path / "runs" / "glscl", seed=0)
    cfg = GLSCL.Config(**{**TINY, "vocab_size": 49408, "context_length": 32, "max_words": 16,
                          "input": "features", "epochs": 12, "batch_size": 6, "eval_batch_size": 4,
                          "coef_lr": 1.0, "lr": 1e-3, "weight_decay": 0.0, "eval_every": 12})
    assert set(data.input_files(GLSCL.needs(cfg, dataset))) == {"features.clip", "dataset.video_captions"}
    result = fit("glscl", GLSCL, cfg, data, device="cpu", select_split="test", amp=False)
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    env = setup_distributed("cpu")
    model, state = load_for_evaluation(GLSCL, result.best_path, data, env.device)
    preds, metrics = predict_and_score(model, model.eval_data("test", data), 4, env)
    assert preds.similarity.shape == (6, 6) and preds.text_vids == preds.video_vids
    assert metrics == pytest.approx(result.best_metrics)
    assert {"t2v_R1", "t2v_R5", "t2v_MdR", "t2v_MnR", "v2t_R1"} <= set(metrics)
    assert metrics["t2v_R1"] >= 50.0  # chance is 100/6 on these held-out videos


def test_metrics_follow_clip4clip_ties():
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.8, 0.3], [0.1, 0.5, 0.4]])
    # videos listed in another order: metrics() puts each text's video on the diagonal first
    result = RetrievalResult(similarity=sim[:, [2, 0, 1]], text_qids=[0, 1, 2], text_vids=["a", "b", "c"],
                             video_vids=["c", "a", "b"])
    m = tiny().metrics(result)
    assert (m["t2v_R1"], m["t2v_MdR"], m["t2v_MnR"]) == (50.0, 1.5, 1.5)


def _write_frame_store(root, videos: dict[str, np.ndarray]):
    """The decode stage's layout (pipeline/media/framestore.py) for GLSCL's protocol."""
    key = glscl_protocol().key
    (root / key).mkdir(parents=True)
    (root / "videos").mkdir()
    for vid, frames in videos.items():
        np.save(root / key / f"{vid}.npy", frames)
        n = len(frames)
        record = {"status": "ok", "protocols": {key: {"pts": [float(i) for i in range(n)],
                                                      "windows": [[float(i), i + 1.0] for i in range(n)],
                                                      "source_index": [30 * i for i in range(n)]}}}
        (root / "videos" / f"{vid}.json").write_text(json.dumps(record))


def test_frame_clips_from_the_frame_store_with_clip_consistent_augmentation(tmp_path):
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8), 20, axis=0)  # 20 s, one image
    _write_frame_store(tmp_path, {"still": still, "short": still[:3]})
    video, mask = FrameClips(tmp_path, max_frames=12, size=224)("still")
    assert video.shape == (12, 3, 224, 224) and mask.tolist() == [1] * 12
    expected = (torch.from_numpy(still[0]).permute(2, 0, 1) / 255.0 - torch.tensor(IMAGE_MEAN)[:, None, None]) \
        / torch.tensor(IMAGE_STD)[:, None, None]
    assert torch.allclose(video[0], expected, atol=1e-5)
    video, mask = FrameClips(tmp_path, max_frames=12, size=224)("short")
    assert mask.tolist() == [1] * 3 + [0] * 9 and video[3:].abs().sum() == 0
    torch.manual_seed(0)
    augmented, _ = FrameClips(tmp_path, max_frames=4, size=224, augment=True)("still")
    assert not torch.allclose(augmented[0], expected, atol=1e-3)  # RandAugment changed the frames ...
    assert all(torch.equal(augmented[0], augmented[t]) for t in range(1, 4))  # ... identically across the clip


def test_end_to_end_frames_forward_and_backward_reach_the_image_tower(tmp_path):
    rng = np.random.default_rng(1)
    _write_frame_store(tmp_path, {f"v{i}": rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8) for i in range(2)})
    clips = FrameClips(tmp_path, max_frames=4, size=64)
    video, vmask = (torch.stack(x) for x in zip(*(clips(f"v{i}") for i in range(2)), strict=True))
    model = tiny(vocab_size=49408, context_length=16, max_words=8)
    ids, tmask = (torch.stack(x) for x in zip(*(tokenize(c, 8) for c in ("a red dot", "a blue box")), strict=True))
    model(ids, tmask, video, vmask)["loss"].backward()
    assert model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert model.clip.visual.conv1.weight.grad is None  # frozen, as released


@pytest.mark.parametrize("name", ["glscl_synthetic.yaml", "glscl_msrvtt.yaml"])
def test_profiles_validate(name):
    from pathlib import Path

    import yaml

    profile = yaml.safe_load((Path(__file__).resolve().parents[2] / "profiles" / name).read_text())
    cfg, _ = effective(name, "glscl")  # what `vmr train --profile` builds
    assert profile["models"] == ["glscl"]
    if name == "glscl_msrvtt.yaml":  # the published run: everything at the released values
        assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.coef_lr, cfg.temperature, cfg.num_queries) == (128, 5, 1e-4, 1e-3, 3.0, 8)
        assert cfg.input == "frames" and cfg.source == "msrvtt" and cfg.weights_sha256
        assert (cfg.gim_mask, cfg.decoder_memory_mask, cfg.icl_normalizer, cfg.query_init) == (
            "after_softmax", False, "num_queries", "uniform")


def test_published_msrvtt_config_has_the_official_parameter_count():
    """`vmr train --model glscl --profile profiles/glscl_msrvtt.yaml` builds the released model:
    189,158,657 parameters (CLIP ViT-B/32 both towers + temporal module + GLSCL heads)."""
    cfg, _ = effective("glscl_msrvtt.yaml", "glscl")
    cfg = cfg.model_copy(update={"weights": None, "weights_sha256": None})  # shapes only, no file
    with torch.device("meta"):
        model = GLSCL(cfg)
    assert sum(p.numel() for p in model.parameters()) == 189_158_657


def test_evaluate_writes_the_query_texts_beside_the_similarity(tmp_path):
    """`vmr evaluate` on GLSCL: similarity.npz names each row's query text, and `vmr score` reads it."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    dataset = _tiny_retrieval_dataset(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": dataset.model_dump(), "merge": {"out_dir": str(tmp_path / "features")},
        "trainer": {"out_dir": str(tmp_path / "runs"), "device": "cpu", "select_split": "test"},
        "evaluate": {"out_dir": str(tmp_path / "results"), "split": "test"}, "models": ["glscl"],
        "model": {"glscl": {**TINY, "vocab_size": 49408, "context_length": 32, "max_words": 16, "input": "features",
                            "epochs": 1, "batch_size": 6, "eval_batch_size": 4}},
    }))
    runner = CliRunner()
    for stage in ("train", "evaluate"):
        result = runner.invoke(app, [stage, "--model", "glscl", "-p", str(params)])
        assert result.exit_code == 0, result.output
    similarity = tmp_path / "results" / "glscl" / "predictions" / "similarity.npz"
    with open(dataset.video_captions) as fh:
        captions = json.load(fh)
    with np.load(similarity, allow_pickle=False) as z:
        assert z["similarity"].shape == (6, 6)
        assert z["text_queries"].tolist() == [captions[v] for v in z["text_vids"].tolist()]
    result = runner.invoke(app, ["score", str(similarity), "--annotations", dataset.video_captions,
                                 "--dataset", "msrvtt", "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
