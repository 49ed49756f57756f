"""Mask unit tests: exact mask patterns, and masking happens in forward, never in the weights."""

import torch

from pixelcnn.layers import MaskedConv2d, causal_mask


def test_grayscale_mask_a_and_b_differ_only_at_centre():
    a = causal_mask("A", 1, 1, 5)[0, 0]
    b = causal_mask("B", 1, 1, 5)[0, 0]
    expected_a = torch.tensor([
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ], dtype=torch.float)
    assert torch.equal(a, expected_a)
    expected_b = expected_a.clone()
    expected_b[2, 2] = 1
    assert torch.equal(b, expected_b)


def test_rgb_centre_connections_follow_channel_order():
    # 3 data channels in, 6 features out (groups R, G, B, R, G, B).
    a = causal_mask("A", 6, 3, 3, data_channels=3)[:, :, 1, 1]
    b = causal_mask("B", 6, 3, 3, data_channels=3)[:, :, 1, 1]
    # rows: output groups R, G, B; columns: input R, G, B
    assert torch.equal(a[:3], torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float))
    assert torch.equal(b[:3], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float))
    assert torch.equal(a[3:], a[:3]) and torch.equal(b[3:], b[:3])
    # off-centre taps ignore channel groups: every earlier pixel is visible to every channel
    full = causal_mask("A", 6, 3, 3, data_channels=3)
    assert full[:, :, 0, :].eq(1).all() and full[:, :, 1, 0].eq(1).all()
    assert full[:, :, 2, :].eq(0).all() and full[:, :, 1, 2].eq(0).all()


def test_mask_applied_in_forward_not_written_into_weights():
    torch.manual_seed(0)
    conv = MaskedConv2d("A", 2, 3, 3)
    before = conv.weight.detach().clone()
    x = torch.randn(1, 2, 5, 5)
    conv(x).sum().backward()
    assert torch.equal(conv.weight.detach(), before), "forward must not modify weight"
    assert (before * (1 - conv.mask)).abs().sum() > 0, "unmasked entries stay in weight"
    assert torch.all(conv.weight.grad[conv.mask == 0] == 0), "masked entries get no gradient"
    assert (conv.weight.grad[conv.mask == 1] != 0).any()
    # An optimizer step therefore can never resurrect a masked connection.
    torch.optim.SGD(conv.parameters(), lr=1.0).step()
    assert torch.equal(conv.weight.detach()[conv.mask == 0], before[conv.mask == 0])


def test_masked_conv_equals_plain_conv_with_masked_kernel():
    torch.manual_seed(1)
    conv = MaskedConv2d("B", 4, 4, 3, data_channels=2)
    x = torch.randn(2, 4, 6, 7)
    ref = torch.nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1)
    assert torch.allclose(conv(x), ref)
    assert "mask" not in conv.state_dict(), "the mask is derived, not saved"
