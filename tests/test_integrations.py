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
