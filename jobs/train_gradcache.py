"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

In-batch-negative losses (mnrl) compare every anchor with every positive of the batch, so their quality grows with
the batch; gradient accumulation does not help, because each micro-batch's loss only sees its own rows. GradCache
gets the full-batch loss at the activation memory of a small chunk:

1. embed the whole micro-batch chunk by chunk without keeping a graph (remembering each chunk's RNG state);
2. compute the loss over the full (B, D) embeddings and backpropagate it to the embeddings only;
3. re-embed each chunk with a graph (same RNG state, so the same dropout) and backpropagate its slice of the
   embedding gradient into the model.

The result equals the plain full-batch loss's gradients up to float rounding; the price is a second forward pass.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

TokenBatch = dict[str, Tensor]


def split_batch(batch: TokenBatch, chunk_size: int) -> list[TokenBatch]:
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[i: i + chunk_size] for k, v in batch.items()} for i in range(0, rows, chunk_size)]


class RngState:
    """The CPU (and CUDA) generator state at one point, to replay the same dropout masks later."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _embed_without_graph(model: nn.Module, chunks: list[TokenBatch], device: torch.device,
                         autocast: Callable) -> tuple[Tensor, list[RngState]]:
    states, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            with autocast():
                outputs.append(model(chunk).float())
    return torch.cat(outputs), states


def gradcache_backward(model: nn.Module, batch: dict, loss_fn: Callable[[Tensor, Tensor], Tensor], chunk_size: int,
                       autocast: Callable, scale: Callable[[Tensor], Tensor], sync: bool,
                       device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward of loss_fn(embed(a), embed(b)) over the whole batch, chunk by chunk; returns (loss, outputs).

    `scale` turns the loss into what is backpropagated (accumulation divisor, fp16 loss scale). Under DDP, only the
    last chunk's backward syncs gradients, and only when `sync` (the last micro-batch of an optimizer step).
    """
    sides = [split_batch(batch["a"], chunk_size), split_batch(batch["b"], chunk_size)]
    embedded = [_embed_without_graph(model, chunks, device, autocast) for chunks in sides]
    leaves = [emb.detach().requires_grad_() for emb, _ in embedded]
    loss = loss_fn(*leaves)
    scale(loss).backward()
    work = [(chunk, state, grad) for chunks, (_, states), leaf in zip(sides, embedded, leaves)
            for chunk, state, grad in zip(chunks, states, leaf.grad.split(chunk_size))]
    for i, (chunk, state, grad) in enumerate(work):
        last = i == len(work) - 1
        no_sync = isinstance(model, DistributedDataParallel) and not (sync and last)
        with model.no_sync() if no_sync else nullcontext():
            with state.replay(), autocast():
                emb = model(chunk).float()
            emb.backward(grad)
    return loss.detach(), {"a": leaves[0].detach(), "b": leaves[1].detach()}
