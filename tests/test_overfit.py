"""A tiny model must be able to memorise a handful of sentences: the whole stack (embedding,
noising, losses, optimiser, EMA, clamped sampling) has to be right for this to pass."""

import torch

from raydiff.config import load_config
from raydiff.data.blocks import encode_blocks
from raydiff.data.tokenizer import train_word_tokenizer
from raydiff.diffusion import Draws, LossSpec, diffusion_losses, sample
from raydiff.train.engine import DiffusionEngine

SENTENCES = [
    "the company said profit rose 5 pct .",
    "oil prices fell in london trading .",
    "shares of acme were up 3 cents .",
    "globex will buy a steel unit in tokyo .",
    "coffee exports climbed in the first quarter .",
    "the chairman said demand was strong .",
]


def test_tiny_model_overfits_and_sampling_reproduces_training_sentences():
    tokenizer = train_word_tokenizer(SENTENCES, 100)
    blocks = encode_blocks(tokenizer, SENTENCES, 12)
    batch = {k: torch.from_numpy(v) for k, v in blocks.items()}
    cfg = load_config(None, [
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.intermediate_size=128", "model.embed_dim=16", "model.dropout=0.0",
        "model.time_embed_dim=32", "diffusion.num_steps=100", "data.seq_len=12",
        "optim.lr=0.003", "optim.anneal_steps=1000", "optim.ema_decay=0.99",
        "train.batch_size=6"])
    engine = DiffusionEngine(cfg, len(tokenizer), torch.device("cpu"))
    first = engine.train_step(batch)
    for _ in range(399):
        last = engine.train_step(batch)
    assert last["loss"] < 0.3 * first["loss"]

    model = engine.ema.model.eval()
    with torch.no_grad():
        t = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
        draws = Draws.sample(t, (6, 12, 16), torch.Generator().manual_seed(1))
        terms = diffusion_losses(model, engine.schedule, batch, LossSpec(), draws)
    assert terms.token_accuracy.mean() > 0.9

    out = sample(model, engine.schedule, (6, 12, 16), sample_steps=50, clamp=True,
                 attention_mask=batch["attention_mask"], generator=torch.Generator().manual_seed(0))
    mask = batch["attention_mask"].bool()
    training = {tuple(row[m].tolist()) for row, m in zip(batch["input_ids"], mask, strict=True)}
    generated = [tuple(row[m].tolist()) for row, m in zip(out.tokens, mask, strict=True)]
    assert sum(g in training for g in generated) >= 2
