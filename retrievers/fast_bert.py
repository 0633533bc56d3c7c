"""A lean forward pass for BERT-family sentence embedders (mean pooling).

The stages embed one short query per call, where transformers' eager BertModel
spends most of its ~8 ms in Python (mask helpers, output capturing, module
dispatch) rather than in matrix products. This module runs the same weights as
a handful of plain torch ops per layer (one fused QKV matmul, SDPA, two
LayerNorms, the MLP), with the same math: `Embedder` checks on load that it
matches the sentence-transformers forward and falls back to it otherwise or for
architectures it does not cover.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FastBert", "supports"]


def supports(hf_model: Any, pooling_mode: str | None) -> bool:
    """Whether `FastBert` can stand in for this transformers model and pooling."""
    config = getattr(hf_model, "config", None)
    return (
        type(hf_model).__name__ == "BertModel"
        and pooling_mode == "mean"
        and getattr(config, "hidden_act", None) == "gelu"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
    )


class FastBert:
    """`FastBert(hf_bert)(input_ids, attention_mask) -> (batch, hidden)` mean-pooled, normalized."""

    def __init__(self, hf_model: Any):
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        cfg = hf_model.config
        self.heads = int(cfg.num_attention_heads)
        self.eps = float(cfg.layer_norm_eps)
        self.word = sd["embeddings.word_embeddings.weight"]
        self.position = sd["embeddings.position_embeddings.weight"]
        self.token_type0 = sd["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(int(cfg.num_hidden_layers)):
            p = f"encoder.layer.{i}."
            qkv_w = torch.cat([sd[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
            qkv_b = torch.cat([sd[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            self.layers.append((
                qkv_w, qkv_b,
                sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"],
                sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"],
                sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"],
                sd[p + "output.dense.weight"], sd[p + "output.dense.bias"],
                sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"],
            ))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        hidden = self.word.shape[1]
        x = self.word[input_ids] + self.position[:t] + self.token_type0
        x = F.layer_norm(x, (hidden,), *self.emb_ln, self.eps)
        keep = attention_mask.bool()
        # Padding keys are masked; a batch of one unpadded text needs no mask at all.
        mask = None if bool(keep.all()) else keep[:, None, None, :]
        d = hidden // self.heads
        for (qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, i_w, i_b, f_w, f_b, ln2_w, ln2_b) in self.layers:
            qkv = F.linear(x, qkv_w, qkv_b).view(b, t, 3, self.heads, d).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
            a = a.transpose(1, 2).reshape(b, t, hidden)
            x = F.layer_norm(F.linear(a, o_w, o_b) + x, (hidden,), ln1_w, ln1_b, self.eps)
            h = F.linear(F.gelu(F.linear(x, i_w, i_b)), f_w, f_b)
            x = F.layer_norm(h + x, (hidden,), ln2_w, ln2_b, self.eps)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)
