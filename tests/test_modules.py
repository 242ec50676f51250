"""Drop-in layers, the DNN model and optimize(): same numbers and state_dict
as torch.nn, gradients included."""

import pytest
import torch
from torch import nn

import bigkernels
from bigkernels import reference
from conftest import assert_close, device_params

DEVICES = device_params(cpu_dtypes=[torch.float32], cuda_dtypes=[torch.float32])


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_state_dict_round_trips_with_torch_linear(device, dtype, activation, bias):
    ours = bigkernels.nn.Linear(12, 7, bias=bias, activation=activation, device=device, dtype=dtype)
    rows = 14 if activation == "swiglu" else 7
    theirs = nn.Linear(12, rows, bias=bias, device=device, dtype=dtype)
    assert ours.weight.shape == theirs.weight.shape
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 12, device=device, dtype=dtype)
    expected = reference.activation(theirs(x), activation or "none")
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    theirs.load_state_dict(ours.state_dict())  # and back


def test_linear_initialises_like_torch_linear():
    torch.manual_seed(5)
    ours = bigkernels.nn.Linear(30, 20, activation="gelu")
    torch.manual_seed(5)
    theirs = nn.Linear(30, 20)
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)
    assert "activation=gelu" in repr(ours)


def test_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        bigkernels.nn.Linear(4, 4, activation="relu6")


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_mlp_matches_torch_layers_forward_and_backward(device, dtype):
    torch.manual_seed(0)
    mlp = bigkernels.nn.MLP(16, 32, 8, activation="gelu", device=device, dtype=dtype).double()
    fc1, fc2 = nn.Linear(16, 32).double().to(device), nn.Linear(32, 8).double().to(device)
    fc1.load_state_dict(mlp.fc1.state_dict())
    fc2.load_state_dict(mlp.fc2.state_dict())
    x = torch.randn(9, 16, device=device, dtype=torch.float64)
    out, expected = mlp(x), fc2(nn.functional.gelu(fc1(x)))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(mlp.fc1.weight.grad, fc1.weight.grad)
    torch.testing.assert_close(mlp.fc2.bias.grad, fc2.bias.grad)


def test_mlp_dropout_is_active_only_in_training():
    mlp = bigkernels.nn.MLP(8, 64, 8, dropout=0.5)
    x = torch.randn(4, 8)
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp(x))
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))


def article_dnn(input_size, hidden_size, output_size):
    """The seed article's DNN, in plain torch.nn."""
    return nn.Sequential(nn.Linear(input_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, output_size))


def test_dnn_matches_the_article_model():
    torch.manual_seed(1)
    ours = bigkernels.models.DNN(10, 20, 3)
    theirs = article_dnn(10, 20, 3)
    theirs[0].load_state_dict(ours.hidden[0].state_dict())
    theirs[2].load_state_dict(ours.output.state_dict())
    x = torch.randn(6, 10)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_dnn_trains_with_mse_and_adam(device, dtype):
    torch.manual_seed(2)
    model = bigkernels.models.DNN(8, [32, 16], 1, activation="silu", device=device, dtype=dtype)
    x = torch.randn(256, 8, device=device, dtype=dtype)
    y = x[:, :1] * 2 - x[:, 1:2] ** 2  # a target a small network can fit
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_dnn_rejects_empty_hidden_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        bigkernels.models.DNN(4, [], 2)


def test_optimize_fuses_linear_and_activation_and_keeps_outputs():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 5), nn.Softmax(-1)
    )
    x = torch.randn(4, 6)
    expected = model(x)
    params = [id(p) for p in model.parameters()]
    bigkernels.optimize(model)
    assert [type(m) for m in model] == [
        bigkernels.nn.Linear, nn.Identity, bigkernels.nn.Linear, nn.Identity, bigkernels.nn.Linear, nn.Softmax
    ]
    assert [model[0].activation, model[2].activation, model[4].activation] == ["gelu", "tanh", "none"]
    assert [id(p) for p in model.parameters()] == params  # the same Parameters: optimizers keep working
    torch.testing.assert_close(model(x), expected)


def test_optimize_swaps_nested_linear_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.block = nn.ModuleDict({"inner": nn.Linear(4, 2)})

        def forward(self, x):
            return self.block["inner"](torch.relu(self.proj(x)))

    net = Net()
    x = torch.randn(3, 4)
    expected = net(x)
    bigkernels.optimize(net)
    assert type(net.proj) is bigkernels.nn.Linear and type(net.block["inner"]) is bigkernels.nn.Linear
    torch.testing.assert_close(net(x), expected)
    assert type(bigkernels.optimize(nn.Linear(3, 3))) is bigkernels.nn.Linear


@pytest.mark.parametrize("device,dtype", device_params([torch.bfloat16], [torch.bfloat16]))
def test_linear_in_bfloat16_against_float64(device, dtype):
    torch.manual_seed(4)
    layer = bigkernels.nn.Linear(64, 48, activation="geglu", device=device, dtype=dtype)
    x = torch.randn(17, 64, device=device, dtype=dtype)
    exact = reference.dense(x.double().cpu(), layer.weight.double().cpu(), layer.bias.double().cpu(), "geglu")
    theirs = reference.dense(x, layer.weight, layer.bias, "geglu")
    assert_close("output", layer(x).cpu(), theirs.cpu(), exact)
