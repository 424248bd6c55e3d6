import pytest
import torch

from dptrain.components.model import LOSS_SUMS, MLP, cross_entropy_sum, mse_sum


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_default_shapes(activation):
    model = MLP(activation=activation)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(16, 784), (16,), (16, 16), (16,), (10, 16), (10,)]
    assert model(torch.rand(5, 784)).shape == (5, 10)
    assert sum(p.numel() for p in model.parameters()) == 13_002  # 784*16+16 + 16*16+16 + 16*10+10


def test_configurable_hidden_sizes():
    model = MLP(hidden=(32, 8, 4))
    assert [layer.out_features for layer in model.layers] == [32, 8, 4, 10]
    assert model(torch.zeros(0, 784)).shape == (0, 10)  # an empty rank slice still runs


def test_activation_is_applied_between_layers_only():
    model = MLP(hidden=(3,), activation="relu")
    with torch.no_grad():
        model.layers[0].weight.fill_(-1.0)
        model.layers[0].bias.zero_()
        model.layers[1].weight.fill_(1.0)
        model.layers[1].bias.fill_(-2.0)
    # relu zeroes the negative hidden units; the output layer is left linear (logits).
    assert torch.equal(model(torch.ones(1, 784)), torch.full((1, 10), -2.0))


def test_mse_matches_hand_computation():
    # L = 1/(2M) sum_i ||sigmoid(z_i) - y_i||^2 with M = 2 samples of 10 classes.
    logits = torch.zeros(2, 10)
    logits[0, 3] = 2.0
    targets = torch.tensor([3, 7])
    s = 1 / (1 + torch.exp(torch.tensor(-2.0)))  # sigmoid(2)
    sample0 = (s - 1) ** 2 + 9 * 0.25  # class 3 hits 1 at sigmoid(2), the rest sit at 0.5
    sample1 = (0.5 - 1) ** 2 + 9 * 0.25
    expected = (sample0 + sample1) / (2 * 2)
    assert mse_sum(logits, targets) / 2 == pytest.approx(expected.item(), rel=1e-6)


def test_losses_are_sums_so_that_shares_add_up():
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    for loss in LOSS_SUMS.values():
        whole = loss(logits, targets)
        parts = loss(logits[:4], targets[:4]) + loss(logits[4:], targets[4:])
        torch.testing.assert_close(whole, parts)
    expected = torch.nn.functional.cross_entropy(logits, targets) * 6
    torch.testing.assert_close(cross_entropy_sum(logits, targets), expected)


def test_model_imports_nothing_distributed():
    import ast
    import dptrain.components.model

    tree = ast.parse(open(dptrain.components.model.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if "distributed" in n or "parallel" in n]


def test_uint8_pixels_read_as_pixel_over_255():
    model = MLP()
    pixels = torch.randint(0, 256, (8, 784), dtype=torch.uint8)
    torch.testing.assert_close(model(pixels), model(pixels.float() / 255), rtol=1e-5, atol=1e-6)


def test_cross_entropy_gradient_matches_torch():
    logits = torch.randn(32, 10, requires_grad=True)
    targets = torch.randint(0, 10, (32,))
    cross_entropy_sum(logits, targets).backward()
    ours = logits.grad.clone()
    logits.grad = None
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    torch.testing.assert_close(ours, logits.grad)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("pixels", [True, False])
def test_fused_loss_and_gradients_equal_autograd(activation, loss, pixels):
    torch.manual_seed(0)
    fused = MLP(hidden=(16, 12, 8), activation=activation, loss=loss)
    plain = MLP(hidden=(16, 12, 8), activation=activation, loss=loss)
    plain.load_state_dict(fused.state_dict())
    plain.fused = False
    x = torch.randint(0, 256, (64, 784), dtype=torch.uint8)
    x = x if pixels else x / 255
    y = torch.randint(0, 10, (64,))
    results = []
    for model in (fused, plain):
        total = model(x, y)
        (total * 0.37).backward()  # a scale, as the loop's 1 / global batch
        results.append((total, [p.grad for p in model.parameters()]))
    (loss_f, grads_f), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-6, atol=1e-5)
    for g_f, g_p in zip(grads_f, grads_p):
        torch.testing.assert_close(g_f, g_p, rtol=1e-5, atol=1e-7)
    assert torch.equal(fused(x), plain(x))  # logits: the same path


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_fused_loss_under_bf16_autocast_equals_autograd_to_bf16_round_off(activation, loss):
    """--precision bf16: the fused node runs the products in bf16 as autocast runs the layers',
    the loss in float32, and returns float32 gradients; they differ from autograd's by bf16
    round-off (2^-8 relative), and from fp32's by more (so bf16 did run)."""
    torch.manual_seed(0)
    fused = MLP(hidden=(64, 32), activation=activation, loss=loss)
    plain = MLP(hidden=(64, 32), activation=activation, loss=loss)
    plain.load_state_dict(fused.state_dict())
    plain.fused = False
    x, y = torch.randint(0, 256, (256, 784), dtype=torch.uint8), torch.randint(0, 10, (256,))
    results = []
    for model, bf16 in ((fused, True), (plain, True), (plain, False)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total = model(x, y)
        (total * 0.37).backward()
        results.append((total, [p.grad.clone() for p in model.parameters()]))
    (loss_f, grads_f), (loss_p, grads_p), (_, grads_fp32) = results
    assert loss_f.dtype == loss_p.dtype == torch.float32
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-5)
    for g_f, g_p, g_32 in zip(grads_f, grads_p, grads_fp32):
        assert g_f.dtype == torch.float32
        scale = g_p.abs().max()
        assert (g_f - g_p).abs().max() <= 2 ** -7 * scale
    assert max((g_f - g_32).abs().max() / g_32.abs().max()
               for g_f, g_32 in zip(grads_f, grads_fp32)) > 1e-3


def test_fused_gradients_carry_a_nan_scale():
    """The loop's poison factor: a NaN scale reaches the output layer's gradients (which the
    loop checks), and every element autograd would turn NaN."""
    fused, plain = MLP(), MLP()
    plain.load_state_dict(fused.state_dict())
    plain.fused = False
    x, y = torch.randint(0, 256, (8, 784), dtype=torch.uint8), torch.arange(8)
    for model in (fused, plain):
        (model(x, y) * float("nan")).backward()
    assert fused.layers[-1].weight.grad.isnan().all() and fused.layers[-1].bias.grad.isnan().all()
    for p_f, p_p in zip(fused.parameters(), plain.parameters()):
        assert torch.equal(p_f.grad.isnan(), p_p.grad.isnan())


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fused_loss_of_an_empty_rank_slice(loss):
    """A rank whose share of a small last batch is empty still joins the backward."""
    model = MLP(loss=loss)
    total = model(torch.zeros(0, 784, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    total.backward()
    assert total.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
