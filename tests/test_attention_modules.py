"""bigkernels.nn.MultiheadAttention and TransformerEncoderLayer against
torch.nn's with the same weights: outputs, gradients, state_dict, optimize()."""

import pytest
import torch
from torch import nn

import bigkernels

E, H = 16, 4


def same_weights(ours, theirs):
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return ours


def compare(ours, theirs, inputs, kwargs, atol=1e-10, self_attention=False):
    """Outputs and the gradients of inputs and parameters, float64.
    self_attention: call module(x, x, x) with the one input."""
    results = []
    for module in (ours, theirs):
        leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = module(*(leaves * 3 if self_attention else leaves), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out).mul_(torch.arange(out.numel()).view_as(out) % 7 - 3.0))
        grads = [t.grad for t in leaves if t.requires_grad] + [p.grad for p in module.parameters()]
        results.append((out.detach(), grads))
        module.zero_grad()
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-8)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-8)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv_dims", [None, (10, 6)], ids=["self", "kdim-vdim"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masks", ["none", "key_padding", "bool", "float", "per_head", "both", "causal"])
def test_multihead_attention_matches_torch(batch_first, kv_dims, bias, masks):
    torch.manual_seed(0)
    kdim, vdim = kv_dims or (None, None)
    kwargs = dict(bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=torch.float64)
    theirs = nn.MultiheadAttention(E, H, **kwargs).eval()
    ours = same_weights(bigkernels.nn.MultiheadAttention(E, H, **kwargs).eval(), theirs)
    B, L, S = 3, 7, 9 if kv_dims else 7
    def seq(n, d):
        return torch.randn(B, n, d, dtype=torch.float64) if batch_first else torch.randn(n, B, d, dtype=torch.float64)
    q = seq(L, E)
    k, v = (seq(S, kdim), seq(S, vdim)) if kv_dims else (q, q)
    call = dict(need_weights=False)
    padding = torch.rand(B, S) < 0.3
    padding[:, 0] = False
    if masks in ("key_padding", "both"):
        call["key_padding_mask"] = padding
    if masks in ("bool", "both"):
        call["attn_mask"] = torch.rand(L, S) < 0.2
    if masks == "float":
        call["attn_mask"] = torch.randn(L, S, dtype=torch.float64)
    if masks == "per_head":
        call["attn_mask"] = torch.randn(B * H, L, S, dtype=torch.float64)
    if masks == "causal":
        call["attn_mask"] = torch.full((L, S), float("-inf"), dtype=torch.float64).triu(1)
        call["is_causal"] = S == L
    if kv_dims:
        compare(ours, theirs, (q, k, v), call)
    else:
        compare(ours, theirs, (q,), call, self_attention=True)


def test_need_weights_and_unbatched_match_torch():
    torch.manual_seed(1)
    theirs = nn.MultiheadAttention(E, H, dtype=torch.float64).eval()
    ours = same_weights(bigkernels.nn.MultiheadAttention(E, H, dtype=torch.float64).eval(), theirs)
    x = torch.randn(5, E, dtype=torch.float64)  # unbatched [L, E]
    a, wa = ours(x, x, x)
    b, wb = theirs(x, x, x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], b)


def test_add_bias_kv_takes_torchs_path():
    torch.manual_seed(2)
    theirs = nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True).eval()
    ours = same_weights(bigkernels.nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True).eval(), theirs)
    x = torch.randn(4, 2, E)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_matches_torch(norm_first, activation, batch_first):
    torch.manual_seed(3)
    kwargs = dict(dim_feedforward=24, dropout=0.0, activation=activation, batch_first=batch_first,
                  norm_first=norm_first, dtype=torch.float64)
    theirs = nn.TransformerEncoderLayer(E, H, **kwargs)
    ours = same_weights(bigkernels.nn.TransformerEncoderLayer(E, H, **kwargs), theirs)
    assert isinstance(ours.self_attn, bigkernels.nn.MultiheadAttention)
    x = torch.randn(3, 6, E, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    compare(ours, theirs, (x,), dict(src_key_padding_mask=padding))
    compare(ours, theirs, (x,), dict(src_mask=causal, is_causal=True))
    with torch.no_grad():  # eval: torch may take its fast path; the numbers must still agree
        torch.testing.assert_close(ours.eval()(x, src_key_padding_mask=padding),
                                   theirs.eval()(x, src_key_padding_mask=padding))


def test_optimize_swaps_attention_layers_and_keeps_outputs():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    want, want_mha = model(x), mha(x, x, x, need_weights=False)[0]
    params = [p.data_ptr() for p in model.parameters()]
    bigkernels.optimize(model)
    bigkernels.optimize(mha)
    assert all(isinstance(m, bigkernels.nn.TransformerEncoderLayer) for m in model.layers)
    assert isinstance(mha, bigkernels.nn.MultiheadAttention)
    assert [p.data_ptr() for p in model.parameters()] == params  # the same parameters, not copies
    torch.testing.assert_close(model(x), want)
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], want_mha)


def test_transformer_language_model_is_causal_and_trains():
    torch.manual_seed(5)
    vocab, T = 16, 12
    model = bigkernels.models.Transformer(vocab, d_model=32, nhead=4, num_layers=2, max_len=T)
    tokens = torch.randint(vocab, (4, T))
    logits = model(tokens)
    assert logits.shape == (4, T, vocab)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % vocab  # the future must not change the past
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])
    # the article's loop: loss, backward, Adam step, on sequences that count up
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        seq = (torch.randint(vocab, (16, 1)) + torch.arange(T + 1)) % vocab
        loss = nn.functional.cross_entropy(model(seq[:, :-1]).reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_transformer_classifier_ignores_padding():
    torch.manual_seed(6)
    model = bigkernels.models.Transformer(20, d_model=32, nhead=4, num_layers=1, num_classes=3).eval()
    tokens = torch.randint(20, (2, 9))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[:, 6:] = True
    out = model(tokens, padding)
    assert out.shape == (2, 3)
    other = tokens.clone()
    other[:, 6:] = 0  # what sits under the padding does not matter
    torch.testing.assert_close(model(other, padding), out)
    torch.testing.assert_close(model(tokens[:, :6]), out)


def test_transformer_rejects_bad_input():
    model = bigkernels.models.Transformer(10, d_model=16, nhead=2, num_layers=1, max_len=8)
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))
