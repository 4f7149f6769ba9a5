"""Train a small causal language model with sequence-parallel dilated attention under DDP, FSDP2 or PyTorch
Lightning, and check its loss curve against single-process training on the same data.

Two models:

- ``tiny``: a model written with the drop-in module ``dc.nn.create_multihead_dilated_attention("ring", ...)``;
- ``llama``: a transformers ``LlamaForCausalLM`` built from a small config, unchanged, rewritten by the compiler:
  ``dc.rewrite(model, shard, dc.SequenceParallel(dc.Dilated(...)))`` on each rank (its materialised causal mask
  is read as causality and key padding), against ``dc.rewrite(model, batch, dc.Dilated(...))`` in one process.
  Each rank passes the global positions of its shard (``position_ids``: rotary embeddings see where the tokens
  are) and its shard of the attention mask; the engine wraps the rewritten module.

Every rank sees the same batch of sequences and keeps its contiguous shard of each sequence; only the attention
communicates. Each rank's loss is the mean over its tokens; the engine averages gradients over ranks, which is the
gradient of the mean over all tokens (the shards are equal), so the run must follow single-process training step
for step.

    python examples/sequence_parallel_training.py [--model tiny|llama] [--engine ddp|fsdp2|lightning] [--world 2]
                                                  [--steps 10]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import dilate_compiler as dc

VOCAB, EMBED, HEADS, SEQ, BATCH = 64, 32, 4, 64, 4
DILATED = dict(segment_lengths=(8, 16, 64), dilation_rates=(1, 2, 4))


class Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attn = dc.nn.create_multihead_dilated_attention(kind, embed_dim=EMBED, num_heads=HEADS,
                                                             num_kv_heads=2, **DILATED)
        self.mlp = nn.Sequential(nn.Linear(EMBED, 4 * EMBED), nn.GELU(), nn.Linear(4 * EMBED, EMBED))

    def forward(self, x):
        x = x + self.attn(self.ln1(x), is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """No position embedding (the causal dilated attention orders the tokens), so every op but attention is per
    token and a sequence shard runs through it unchanged. ``kind="improved"``: single process; ``"ring"``:
    sequence-parallel attention."""

    def __init__(self, kind: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.blocks = nn.Sequential(Block(kind), Block(kind))
        self.head = nn.Sequential(nn.LayerNorm(EMBED), nn.Linear(EMBED, VOCAB))

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens)))


def batches(steps: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        seq = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        yield seq[:, :-1], seq[:, 1:]


def initial_state() -> dict:
    torch.manual_seed(0)
    return TinyLM("improved").double().state_dict()


def loss_fn(model, tokens, targets):
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def train_single(steps: int) -> list:
    model = TinyLM("improved").double()
    model.load_state_dict(initial_state())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for tokens, targets in batches(steps):
        loss = loss_fn(model, tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _shard(t):
    return dc.distributed.shard_sequence(t, dim=1)


def _global_mean(loss):
    import torch.distributed as dist

    total = loss.detach().clone()
    dist.all_reduce(total)
    return (total / dist.get_world_size()).item()


def train_rank(rank: int, world: int, engine: str, steps: int) -> list:
    """One rank of sequence-parallel training under ``engine`` (``ddp`` or ``fsdp2``; the process group exists)."""
    model = TinyLM("ring").double()
    model.load_state_dict(initial_state())
    if engine == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    else:
        raise ValueError(f"engine must be 'ddp' or 'fsdp2' here, got {engine!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for tokens, targets in batches(steps):
        loss = loss_fn(model, _shard(tokens), _shard(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(_global_mean(loss))
    return losses


def lightning_module(steps: int):
    import lightning as L

    class SequenceParallelLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyLM("ring").double()
            self.model.load_state_dict(initial_state())
            self.losses = []

        def training_step(self, batch, _):
            tokens, targets = (t.squeeze(0) for t in batch)
            loss = loss_fn(self.model, _shard(tokens), _shard(targets))
            self.losses.append(_global_mean(loss))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):   # every rank the same whole sequences; the module shards them
            return torch.utils.data.DataLoader(list(batches(steps)), batch_size=1)

    return SequenceParallelLM()


# --- a transformers Llama, rewritten ---------------------------------------------------------------------------------


def llama():
    """A small ``LlamaForCausalLM`` (float64), the same weights in every process."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=2 * EMBED,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                                      max_position_embeddings=SEQ, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def llama_inputs(tokens, shard: bool) -> dict:
    """The keyword inputs of a batch (or of this rank's shard of it): the attention mask and global positions."""
    positions = torch.arange(SEQ).view(1, -1).expand(tokens.shape[0], -1)
    kwargs = {"attention_mask": torch.ones(tokens.shape[0], SEQ, dtype=torch.long), "position_ids": positions}
    return {k: _shard(v) for k, v in kwargs.items()} if shard else kwargs


def llama_rewritten(strategy, shard: bool):
    """The Llama rewritten for ``strategy`` on the shape of a batch (``shard``: of this rank's shard of it)."""
    tokens, _ = next(batches(1))
    example = _shard(tokens) if shard else tokens
    res = dc.rewrite(llama(), (example,), strategy, example_kwargs=llama_inputs(tokens, shard))
    return res.module


def llama_loss(model, tokens, targets, shard: bool):
    inputs = llama_inputs(tokens, shard)
    if shard:
        tokens, targets = _shard(tokens), _shard(targets)
    logits = model(tokens, **inputs).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def train_llama_single(steps: int) -> list:
    model = llama_rewritten(dc.Dilated(**DILATED), shard=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for tokens, targets in batches(steps):
        loss = llama_loss(model, tokens, targets, shard=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_llama_rank(rank: int, world: int, engine: str, steps: int) -> list:
    """One rank of sequence-parallel training of the rewritten Llama under ``engine`` (``ddp`` or ``fsdp2``)."""
    model = llama_rewritten(dc.SequenceParallel(dc.Dilated(**DILATED)), shard=True)
    if engine == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    else:
        raise ValueError(f"engine must be 'ddp' or 'fsdp2' here, got {engine!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for tokens, targets in batches(steps):
        loss = llama_loss(model, tokens, targets, shard=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(_global_mean(loss))
    return losses


def train_lightning_rank(rank: int, world: int, steps: int, port: int) -> list:
    """One rank of Lightning DDP training; the processes are launched outside Lightning (as torchrun would)."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    module = lightning_module(steps)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=steps, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return module.losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "llama"), default="tiny")
    ap.add_argument("--engine", choices=("ddp", "fsdp2", "lightning"), default="ddp")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    from dilate_compiler.distributed.launch import free_port, run_ranks, values

    if args.model == "llama":
        if args.engine == "lightning":
            ap.error("--model llama runs under --engine ddp or fsdp2")
        got = values(run_ranks(train_llama_rank, args.world, args.engine, args.steps))
        ref = train_llama_single(args.steps)
    elif args.engine == "lightning":
        got = values(run_ranks(train_lightning_rank, args.world, args.steps, free_port(), init=False))
        ref = train_single(args.steps)
    else:
        got = values(run_ranks(train_rank, args.world, args.engine, args.steps))
        ref = train_single(args.steps)
    print(f"{'step':>4}  {'single process':>14}  {args.engine} x{args.world}")
    for i, (a, b) in enumerate(zip(ref, got[0])):
        print(f"{i:>4}  {a:>14.8f}  {b:.8f}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got[0]))
    print(f"largest relative difference: {worst:.3g}")


if __name__ == "__main__":
    main()
