"""The trainer's batches: the walk through the cached training set epoch after epoch (each rank's share of
each global batch under torchrun), and one batch of cached entries on the device."""

from __future__ import annotations

import torch

from catfast.train.cache import batch_order, collate
from catfast.train.dist import Dist


class BatchStream:
    """Walks ``batch_order(dataset, global_batch, seed, epoch)`` epoch after epoch. The position
    (``epoch``, ``index``) names the next global batch; checkpoints store it."""

    def __init__(self, dataset, global_batch: int, seed: int, epoch: int, index: int):
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.epoch, self.index = epoch, index
        self.order = self._order(epoch)

    def _order(self, epoch: int):
        return batch_order(self.dataset, self.global_batch, self.seed, epoch)

    def next_shard(self, dist: Dist) -> tuple[list, int, int, int]:
        """(keys to compute, their offset in the next global batch, the global batch size, how many of
        the keys count). A rank's share is contiguous; a rank left without samples (a short last batch)
        computes the batch's first sample with weight 0, since every DDP rank must run each step."""
        if self.index >= len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        keys = [tuple(k) for k in self.order[self.index]]
        self.index += 1
        n = len(keys)
        sizes = [n // dist.world + (1 if r < n % dist.world else 0) for r in range(dist.world)]
        start, count = sum(sizes[: dist.rank]), sizes[dist.rank]
        if count == 0:
            return keys[:1], 0, n, 0
        return keys[start : start + count], start, n, count


def collate_batch(dataset, keys, device, dtype, *, empty=None, drop: list[bool] | None = None) -> dict:
    """The cached entries ``keys`` as one batch on ``device``; text conditions cast to ``dtype``. ``drop``: per key,
    whether its trigger caption's condition is replaced by ``empty`` (the empty caption's row: caption dropout;
    an SDXL row keeps its own size and crop ``time_ids``)."""
    items = [dataset[k] for k in keys]
    if drop is not None:
        items = [{**item, "cond": _emptied(item["cond"], empty)} if d else item for item, d in zip(items, drop)]
    batch = collate(items)
    return {
        "latents": batch["latents"].to(device, non_blocking=True),
        "cond": _to(batch["cond"], device, dtype),
        "cond_stripped": _to(batch["cond_stripped"], device, dtype),
        "concepts": batch["concepts"],
    }


def _emptied(cond, empty):
    """``cond`` (one cached row: a tensor, or SDXL's dict) with the empty caption's states (and pooled embedding)."""
    if not isinstance(cond, dict):
        return empty.to(cond.dtype)
    pooled = empty["added_cond_kwargs"]["text_embeds"].to(cond["added_cond_kwargs"]["text_embeds"].dtype)
    hidden = empty["encoder_hidden_states"].to(cond["encoder_hidden_states"].dtype)
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {**cond["added_cond_kwargs"], "text_embeds": pooled}}


def _to(cond, device, dtype):
    if isinstance(cond, torch.Tensor):
        return cond.to(device, dtype, non_blocking=True)
    return {k: _to(v, device, dtype) for k, v in cond.items()} if isinstance(cond, dict) else cond
