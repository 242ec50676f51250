import torch
from torch import nn

from ..nn import Linear, TransformerEncoderLayer
from ..ops.losses import linear_cross_entropy


class Transformer(nn.Module):
    """A Transformer on bigkernels' fused attention and fused MLP: token and
    learned position embeddings, num_layers pre-norm encoder layers, a final
    LayerNorm, then

    - num_classes given: an encoder classifier (mean over the non-padding
      positions, then a linear head): logits [B, num_classes];
    - num_classes None: a causal decoder-only language model (each position
      attends to itself and the past): next-token logits [B, T, vocab_size],
      with the output layer tied to the token embedding.

    forward(tokens [B, T] long, padding_mask [B, T] bool, True = padding,
    labels=None, return_logits=False). With labels (the LM: [B, T], the token
    each position should predict, -100 to ignore one; padding positions are
    ignored too. The classifier: [B]), it returns the cross-entropy loss
    through bigkernels.linear_cross_entropy, which never holds the
    [B x T x vocab] logits; return_logits=True returns (loss, logits).
    """

    def __init__(self, vocab_size, d_model=128, nhead=4, num_layers=2, dim_feedforward=None, dropout=0.0,
                 max_len=512, num_classes=None, activation="gelu", device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.causal = num_classes is None
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, d_model, **factory)
        self.positions = nn.Embedding(max_len, d_model, **factory)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward or 4 * d_model, dropout, activation,
                                    batch_first=True, norm_first=True, **factory)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, **factory)
        # small embeddings (GPT-2's 0.02), so that the tied output starts near uniform
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        if self.causal:
            self.head = Linear(d_model, vocab_size, bias=False, **factory)
            self.head.weight = self.tokens.weight  # tied
        else:
            self.head = Linear(d_model, num_classes, **factory)

    def forward(self, tokens, padding_mask=None, labels=None, return_logits=False):
        x = self.features(tokens, padding_mask)
        if labels is None:
            return self.head(x)
        if labels.shape != x.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(x.shape[:-1])}, got {tuple(labels.shape)}")
        if self.causal and padding_mask is not None:
            labels = labels.masked_fill(padding_mask, -100)
        loss = linear_cross_entropy(x, self.head.weight, labels, self.head.bias)
        return (loss, self.head(x)) if return_logits else loss

    def features(self, tokens, padding_mask=None):
        """What the head reads: the final norm's output [B, T, d_model] (the
        LM), or its mean over the non-padding positions [B, d_model] (the
        classifier). For fused losses over the head's weight, such as
        bigkernels.linear_distillation_loss."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        if padding_mask is not None and (padding_mask.shape != tokens.shape or padding_mask.dtype != torch.bool):
            raise ValueError(f"padding_mask must be bool with tokens' shape {tuple(tokens.shape)}, got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        x = self.tokens(tokens) + self.positions(torch.arange(T, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=x.dtype) \
            if self.causal else None
        for layer in self.layers:
            x = layer(x, src_mask=causal, src_key_padding_mask=padding_mask, is_causal=self.causal)
        x = self.norm(x)
        if self.causal:
            return x
        keep = torch.ones_like(tokens, dtype=x.dtype) if padding_mask is None else (~padding_mask).to(x.dtype)
        return (x * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
