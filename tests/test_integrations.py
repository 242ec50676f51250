"""The Hugging Face backend: small BERT- and Llama-style models built from
configs (random weights, nothing downloaded) give the same logits and
gradients with attn_implementation="bigkernels" as with "sdpa"."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
import bigkernels.integrations.transformers as bk_hf  # noqa: E402


def build(config_cls, model_cls, attn, **config):
    torch.manual_seed(0)
    cfg = config_cls(**config)
    return model_cls.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def run(model, inputs, output_name):
    out = getattr(model(**inputs), output_name)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_matches_sdpa_backend(arch):
    bk_hf.register()
    if arch == "llama":  # causal, GQA (4 query heads on 2 key/value heads)
        cls, model_cls, output = transformers.LlamaConfig, transformers.AutoModelForCausalLM, "logits"
        config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:  # bidirectional encoder with padding
        cls, model_cls, output = transformers.BertConfig, transformers.AutoModel, "last_hidden_state"
        config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    ids = torch.randint(64, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        want, want_grads = run(build(cls, model_cls, "sdpa", **config), inputs, output)
        got, got_grads = run(build(cls, model_cls, bk_hf.NAME, **config), inputs, output)
        keep = mask.bool() if "attention_mask" in inputs else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-4)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_gives_sdpa_tokens(cache):
    """Greedy generation with left padding, one token per step against transformers' default
    dynamic cache or its static cache (a fixed-size cache and a mask over it): our backend picks
    the same tokens as "sdpa"."""
    bk_hf.register()
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5)
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0,
               **({"cache_implementation": "static"} if cache == "static" else {}))
    with torch.no_grad():
        want = build(transformers.LlamaConfig, transformers.AutoModelForCausalLM, "sdpa", **config).generate(
            ids, attention_mask=mask, **gen)
        got = build(transformers.LlamaConfig, transformers.AutoModelForCausalLM, bk_hf.NAME, **config).generate(
            ids, attention_mask=mask, **gen)
    assert len(set(want[:, 7:].flatten().tolist())) > 3  # the tokens vary: the check can fail
    assert torch.equal(got, want)


def test_gemma2_softcap_matches_eager_attention():
    """Gemma 2 caps its attention scores (attn_logit_softcapping) and mixes sliding-window
    layers: our backend applies the softcap inside the kernels and gives eager attention's
    logits and gradients (transformers' SDPA backend cannot softcap)."""
    bk_hf.register()
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_logit_softcapping=2.0,
                  initializer_range=0.5, final_logit_softcapping=None, sliding_window=4, query_pre_attn_scalar=8)
    # (weights large enough that the cap bends the scores: without it the logits move by ~3)
    ids = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding (left-padded rows that see no key differ: eager spreads them evenly)
    inputs = {"input_ids": ids, "attention_mask": mask}
    want, want_grads = run(build(transformers.Gemma2Config, transformers.AutoModelForCausalLM, "eager", **config),
                           inputs, "logits")
    got, got_grads = run(build(transformers.Gemma2Config, transformers.AutoModelForCausalLM, bk_hf.NAME, **config),
                         inputs, "logits")
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=3e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_padding_free_training_runs_on_varlen_with_the_padded_batch_numbers(flash_kwargs, monkeypatch):
    """DataCollatorWithFlattening packs the sequences into one row (position_ids
    restarting, or flash-attention's cu_seq_lens_* kwargs): our backend runs
    them on varlen_attention, and the loss and every gradient are the padded
    batch's (on "sdpa" and on ours)."""
    bk_hf.register()
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    gen = torch.Generator().manual_seed(4)
    sequences = [torch.randint(1, 64, (n,), generator=gen) for n in (5, 13, 1, 8)]
    ids = torch.zeros(len(sequences), 13, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(sequences):
        ids[b, :len(seq)], mask[b, :len(seq)] = seq, 1
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    flat = collator([{"input_ids": seq.tolist(), "labels": seq.tolist()} for seq in sequences])
    assert flat["input_ids"].shape == (1, 27) and ("cu_seq_lens_q" in flat) == flash_kwargs

    calls = []
    varlen = bk_hf.varlen_attention
    monkeypatch.setattr(bk_hf, "varlen_attention", lambda *a, **kw: calls.append(a[3]) or varlen(*a, **kw))

    def loss_and_grads(attn, batch):
        model = build(transformers.LlamaConfig, transformers.AutoModelForCausalLM, attn, **config)
        loss = model(**batch, use_cache=False).loss  # (with a cache, transformers' masks ignore the packing)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = loss_and_grads("sdpa", padded)
    for attn, batch in (("sdpa", flat), (bk_hf.NAME, padded), (bk_hf.NAME, flat)):
        calls.clear()
        got, got_grads = loss_and_grads(attn, batch)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], atol=2e-6, rtol=1e-4, msg=name)
        ran_varlen = attn == bk_hf.NAME and batch is flat
        assert len(calls) == (2 if ran_varlen else 0)  # each layer's attention, when packed
        if ran_varlen:
            assert calls[0].tolist() == [0, 5, 18, 19, 27]


def test_packed_rows_with_another_mask_keep_the_mask():
    """Only a mask that is exactly the packed sequences' causal blocks is left
    to varlen_attention: one that also masks something else (here a padded
    key) keeps the mask's path."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    sequence = torch.tensor([0, 0, 0, 1, 1])
    block = (sequence[:, None] == sequence[None, :]).tril()[None, None]
    q = torch.randn(1, 2, 5, 8)
    found = bk_hf._packed_sequences(q, q, block, True, {"position_ids": position_ids})
    assert found is not None and found[0].tolist() == [0, 3, 5] and found[1] == 3
    other = block.clone()
    other[..., 1] = False
    assert bk_hf._packed_sequences(q, q, other, True, {"position_ids": position_ids}) is None
    assert bk_hf._packed_sequences(q, q, block, False, {"position_ids": position_ids}) is None  # not causal
    assert bk_hf._packed_sequences(q, q, None, True, {"position_ids": torch.arange(5)[None]}) is None  # one sequence


# bigkernels.optimize() on Hugging Face models: the blocks it knows fuse their
# activation, the attention moves to our backend; outputs and gradients keep
# the 2x rule against stock in float64, the state_dict and checkpoints are unchanged.
import copy  # noqa: E402
import pickle  # noqa: E402

import bigkernels  # noqa: E402
from bigkernels.nn import Linear  # noqa: E402
from conftest import assert_close  # noqa: E402

ENCODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FAMILIES = {  # (config, model, output, its feed-forward block's (module, linear, activation) names)
    "bert": (transformers.BertConfig, transformers.BertModel, "last_hidden_state",
             ("intermediate", "dense", "intermediate_act_fn")),
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel, "last_hidden_state",
                ("intermediate", "dense", "intermediate_act_fn")),
    "distilbert": (transformers.DistilBertConfig, transformers.DistilBertModel, "last_hidden_state",
                   ("ffn", "lin1", "activation")),
}
DISTILBERT = dict(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64,
                  dropout=0.0, attention_dropout=0.0)


def feed_forward_blocks(model, names):
    return [m for n, m in model.named_modules() if n.endswith("." + names[0])]


@pytest.mark.parametrize("family,act,ours_act", [("bert", "gelu", "gelu"), ("bert", "gelu_new", "gelu_tanh"),
                                                  ("roberta", "gelu", "gelu"), ("distilbert", "gelu", "gelu")])
def test_optimize_fuses_known_blocks_and_keeps_the_numbers(family, act, ours_act, tmp_path):
    config_cls, model_cls, output, names = FAMILIES[family]
    config = dict(DISTILBERT, activation=act) if family == "distilbert" else dict(ENCODER, hidden_act=act)
    torch.manual_seed(0)
    stock = model_cls(config_cls(**config, attn_implementation="sdpa")).eval()
    truth = model_cls(config_cls(**config, attn_implementation="sdpa")).double().eval()
    truth.load_state_dict(stock.state_dict())
    state = {k: v.clone() for k, v in stock.state_dict().items()}
    ours = bigkernels.optimize(model_cls(config_cls(**config, attn_implementation="sdpa")).eval())
    ours.load_state_dict(state)

    assert ours.config._attn_implementation == bk_hf.NAME
    for block in feed_forward_blocks(ours, names):
        linear, activation = getattr(block, names[1]), getattr(block, names[2])
        assert type(linear) is Linear and linear.activation == ours_act and type(activation) is torch.nn.Identity
    assert ours.state_dict().keys() == state.keys()
    fused_norms = [m for m in ours.modules() if isinstance(m, bk_hf._ResidualNormBlock)]
    assert len(fused_norms) == (0 if family == "distilbert" else 2 * 2)  # two per layer

    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    got, theirs, want = (run(m, dict(input_ids=ids, attention_mask=mask), output) for m in (ours, stock, truth))
    keep = mask.bool()
    assert_close("output", got[0][keep], theirs[0][keep], want[0][keep])
    for name in want[1]:
        assert_close(name, got[1][name], theirs[1][name], want[1][name])

    # a second optimize() changes nothing; copies and pickles stay fused and give the same
    # output; the checkpoint loads into stock transformers
    assert repr(bigkernels.optimize(ours)) == repr(ours)
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert len([m for m in twin.modules() if isinstance(m, bk_hf._ResidualNormBlock)]) == len(fused_norms)
        with torch.no_grad():
            torch.testing.assert_close(getattr(twin(input_ids=ids, attention_mask=mask), output), got[0])
    ours.save_pretrained(tmp_path)
    reloaded = model_cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_optimize_leaves_what_it_cannot_fuse():
    # an activation our kernels lack (relu2) stays a module; a model on the eager backend keeps it
    config_cls, model_cls, _, names = FAMILIES["bert"]
    model = bigkernels.optimize(model_cls(config_cls(**ENCODER, hidden_act="relu2", attn_implementation="eager")))
    assert model.config._attn_implementation == "eager"
    for block in feed_forward_blocks(model, names):
        assert type(block.dense) is Linear and block.dense.activation == "none"
        assert type(block.intermediate_act_fn).__name__ == "ReLUSquaredActivation"


DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)
# family -> (config, model, config overrides, fused blocks expected per layer, and once per model)
DECODERS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, {"_RMSNorm": 2, "_GatedMLP": 1,
                                                                             "_DecoderLayer": 1}, {"_RMSNorm": 1, "_CausalLM": 1}),
    "llama-bias-geglu": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                         {"mlp_bias": True, "hidden_act": "gelu"},
                         {"_RMSNorm": 2, "_GatedMLP": 1, "_DecoderLayer": 1}, {"_RMSNorm": 1, "_CausalLM": 1}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {},
                {"_RMSNorm": 2, "_GatedMLP": 1, "_DecoderLayer": 1}, {"_RMSNorm": 1, "_CausalLM": 1}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {},
              {"_RMSNorm": 2, "_GatedMLP": 1, "_DecoderLayer": 1}, {"_RMSNorm": 1, "_CausalLM": 1}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8},  # + q_norm, k_norm
              {"_RMSNorm": 4, "_GatedMLP": 1, "_DecoderLayer": 1}, {"_RMSNorm": 1, "_CausalLM": 1}),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {}, {"_Conv1DMLP": 1}, {"_CausalLM": 1}),
}


def fused_counts(model):
    counts = {}
    for m in model.modules():
        if isinstance(m, bk_hf._Fused):
            name = type(m)._fused_forward.__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("family", DECODERS)
def test_optimize_fuses_decoder_blocks_and_keeps_the_numbers(family, tmp_path):
    config_cls, model_cls, overrides, per_layer, once = DECODERS[family]
    config = dict(GPT2 if family == "gpt2" else DECODER, **overrides)
    make = lambda: model_cls(config_cls(**config, attn_implementation="sdpa")).eval()  # noqa: E731
    torch.manual_seed(0)
    stock = make()
    with torch.no_grad():  # norms start at ones and biases at zeros: make them count
        for name, p in stock.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if "norm" in name or "ln_" in name else 0.0))
    state = {k: v.clone() for k, v in stock.state_dict().items()}
    truth = make().double()
    truth.load_state_dict(stock.state_dict())
    ours = bigkernels.optimize(make())
    ours.load_state_dict(state)

    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert fused_counts(ours) == {k: layers * per_layer.get(k, 0) + once.get(k, 0) for k in per_layer.keys() | once}
    assert ours.config._attn_implementation == bk_hf.NAME
    assert ours.state_dict().keys() == state.keys()

    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as for generation
    got, theirs, want = (run(m, dict(input_ids=ids, attention_mask=mask), "logits") for m in (ours, stock, truth))
    keep = mask.bool()
    assert_close("logits", got[0][keep], theirs[0][keep], want[0][keep])
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert_close(name, got[1][name], theirs[1][name], want[1][name])

    # greedy generation (a KV cache, one token per step) gives stock's tokens
    prompt = ids[:, :5]
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, **gen), stock.generate(prompt, **gen))

    assert repr(bigkernels.optimize(ours)) == repr(ours)
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert fused_counts(twin) == fused_counts(ours)
        with torch.no_grad():
            torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits, got[0])
    ours.save_pretrained(tmp_path)
    reloaded = model_cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_fused_decoder_blocks_step_aside_for_what_they_cannot_read():
    # A projection wrapped after optimize() (as LoRA does), a norm weight in another dtype (torch
    # promotes, our op would refuse), and a positional call run transformers' own forward: the same
    # numbers as stock with the same change.
    config_cls, model_cls, overrides, _, _ = DECODERS["llama"]
    torch.manual_seed(0)
    stock = model_cls(config_cls(**DECODER, attn_implementation="sdpa")).eval()
    ours = bigkernels.optimize(copy.deepcopy(stock))

    class Scaled(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 2 * self.linear(x)

    for model in (stock, ours):
        mlp = model.model.layers[0].mlp
        mlp.up_proj = Scaled(mlp.up_proj)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        x = torch.randn(2, 7, 32)
        norms = [copy.deepcopy(m.model.layers[1].post_attention_layernorm).double() for m in (stock, ours)]
        for residual in (None, torch.randn(2, 7, 32)):
            want = norms[0](x + (0 if residual is None else residual))
            got = norms[1](x, residual=residual)
            torch.testing.assert_close(got if residual is None else got[0], want)
            assert want.dtype == torch.float64
        layer = ours.model.layers[0]
        rope = ours.model.rotary_emb(x, torch.arange(7)[None])
        mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
        torch.testing.assert_close(layer(x, mask, position_embeddings=rope),
                                   stock.model.layers[0](x, mask, position_embeddings=rope), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_optimized_decoder_compiles_without_graph_breaks(family):
    torch._dynamo.reset()
    config_cls, model_cls, overrides, _, _ = DECODERS[family]
    torch.manual_seed(0)
    ours = bigkernels.optimize(model_cls(config_cls(**(GPT2 if family == "gpt2" else DECODER), **overrides,
                                                    attn_implementation="sdpa")).eval())
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(4))

    def loss_and_grads(model):
        ours.zero_grad(set_to_none=True)
        # the loss outside: GPT-2's own loss logs a warning, a graph break in stock transformers too
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        return [loss.detach()] + [p.grad for p in ours.parameters()]

    want = loss_and_grads(ours)
    got = loss_and_grads(torch.compile(ours, fullgraph=True, backend="aot_eager"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_optimized_decoders_in_bfloat16_keep_the_2x_rule(family):
    # bf16 rounds differently in our fused blocks (e.g. the norm's weight is applied before
    # rounding, where transformers rounds twice): the error against float64 stays within 2x stock's.
    config_cls, model_cls, overrides, _, _ = DECODERS[family]
    config = dict(GPT2, n_embd=64) if family == "gpt2" else dict(DECODER, hidden_size=64, intermediate_size=96)
    torch.manual_seed(0)
    stock = model_cls(config_cls(**config, **overrides, attn_implementation="sdpa")).eval()
    truth = copy.deepcopy(stock).double()
    stock = stock.bfloat16()
    ours = bigkernels.optimize(copy.deepcopy(stock))
    ids = torch.randint(3, 64, (3, 33), generator=torch.Generator().manual_seed(5))
    got, theirs, want = (run(m, dict(input_ids=ids), "logits") for m in (ours, stock, truth))
    assert_close("logits", got[0].double(), theirs[0].double(), want[0])
    for name in want[1]:
        assert_close(name, got[1][name].double(), theirs[1][name].double(), want[1][name])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_causal_lm_training_loss_through_the_fused_cross_entropy(family):
    config_cls, model_cls, overrides, _, _ = DECODERS[family]
    config = config_cls(**dict(GPT2 if family == "gpt2" else DECODER, **overrides), attn_implementation="sdpa")
    torch.manual_seed(0)
    stock = model_cls(config).double().train()
    ours = bigkernels.optimize(model_cls(config).double().train())
    ours.load_state_dict(stock.state_dict())
    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :4] = -100
    for extra in ({}, {"num_items_in_batch": torch.tensor(17)}):
        got, want = ours(input_ids=ids, labels=labels, **extra), stock(input_ids=ids, labels=labels, **extra)
        assert got.logits is None  # never made
        torch.testing.assert_close(got.loss, want.loss)
        grads = [torch.autograd.grad(out.loss, list(m.parameters())) for out, m in ((got, ours), (want, stock))]
        for a, b in zip(*grads):  # (stock's loss runs in float32 on the double model's logits)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    ours.eval()  # evaluation (no gradients) keeps transformers' forward: logits and the same loss
    assert ours(input_ids=ids, labels=labels).logits is None  # eval mode, but a gradient may follow
    with torch.no_grad():
        out, ref = ours(input_ids=ids, labels=labels), stock.eval()(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
