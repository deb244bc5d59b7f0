"""MRNet: the maskable retention against hand computations, the encoder's structure, the model."""

from __future__ import annotations

import math

import pytest
import torch

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
