"""raydiff's BERT layers against transformers' BertEncoder with the same weights: the same
outputs and gradients, and checkpoints written with BertEncoder's names load."""

import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

from raydiff.model.denoiser import additive_attention_mask
from raydiff.model.encoder import Encoder
from tests.conftest import tiny_denoiser

H, LAYERS, HEADS, INTERMEDIATE = 32, 2, 4, 64


def _bert() -> BertEncoder:
    torch.manual_seed(0)
    bert = BertEncoder(BertConfig(hidden_size=H, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="sdpa"))
    with torch.no_grad():  # LayerNorms away from (1, 0), so that a swapped one would show
        for name, p in bert.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "LayerNorm" in name else 0.05))
    return bert.train()


def test_the_same_outputs_and_gradients_as_bert_from_its_weights():
    bert = _bert()
    mine = Encoder(H, LAYERS, HEADS, INTERMEDIATE, dropout=0.0).train()
    mine.load_state_dict(bert.state_dict())  # BertEncoder's names, strict

    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 7, H, generator=g)
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[1, 5:] = 0  # padding in one row
    mask = additive_attention_mask(attention, torch.float32)
    upstream = torch.randn(3, 7, H, generator=g)
    outputs, grads = [], []
    for model, call in ((bert, lambda x: bert(x, attention_mask=mask).last_hidden_state),
                        (mine, lambda x: mine(x, mask))):
        x = h.clone().requires_grad_()
        out = call(x)
        (out * upstream).sum().backward()
        outputs.append(out.detach())
        grads.append((x.grad, dict(model.named_parameters())))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    theirs, ours = grads[0][1], grads[1][1]
    for i in range(LAYERS):
        at = f"layer.{i}.attention.self."
        qkv = torch.cat([theirs[f"{at}{n}.weight"].grad for n in ("query", "key", "value")])
        torch.testing.assert_close(ours[f"layers.{i}.qkv.weight"].grad, qkv, rtol=1e-5, atol=1e-6)
        for bert_name, name in (("intermediate.dense", "ffn_in"), ("output.LayerNorm", "ffn_norm"),
                                ("attention.output.LayerNorm", "attn_norm")):
            torch.testing.assert_close(ours[f"layers.{i}.{name}.weight"].grad,
                                       theirs[f"layer.{i}.{bert_name}.weight"].grad,
                                       rtol=1e-5, atol=1e-6)
    assert outputs[0].abs().mean() > 0.1 and not torch.allclose(outputs[0][1], h[1])


def test_a_denoiser_saved_with_bert_names_loads_and_a_missing_weight_is_refused():
    model = tiny_denoiser()
    state = model.state_dict()
    renamed = {}  # the state dict a BertEncoder-based denoiser wrote
    for key, value in state.items():
        if ".qkv." not in key:
            for mine, bert in (("attn_out", "attention.output.dense"),
                               ("attn_norm", "attention.output.LayerNorm"),
                               ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"),
                               ("ffn_norm", "output.LayerNorm")):
                key = key.replace(f".{mine}.", f".{bert}.")
            renamed[key.replace("encoder.layers.", "encoder.layer.")] = value
            continue
        i, kind = key.split(".")[2], key.rsplit(".", 1)[1]
        for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
            renamed[f"encoder.layer.{i}.attention.self.{name}.{kind}"] = part
    assert not any("qkv" in k or "layers." in k for k in renamed)

    fresh = tiny_denoiser()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(renamed)  # strict
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key

    del renamed["encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key.*encoder\.layers\.1\.qkv\.weight"):
        fresh.load_state_dict(renamed)  # a damaged checkpoint: PyTorch's own error
