"""The adapter pool: adapters registered by name (files on disk), an LRU tier of parsed adapters in host
memory, and a bounded number resident on the device in the model's ``SlotLora`` slots (UNet layers, and
text-encoder layers when an adapter has them: those apply while the request's prompts are encoded).

Tiers: disk (every registered adapter: its file) -> host (``host_cache`` parsed adapters, LRU) ->
device (``num_slots`` slots, LRU among adapters no running request uses). Making an adapter resident
copies its tensors into a free slot of every module it targets (``SlotLora.put``); a resident
adapter is used by putting its slot index in the plan, whatever the number registered.

Invariants: an adapter a running request uses (``Entry.running > 0``) is never evicted; unregistering
one that is in use hides its name at once and frees its slot when its last request ends. File reads
happen outside the engine lock (``read_file``); installs are tensor copies done by the scheduler
thread between steps, never during a UNet call. Not thread-safe by itself: the engine holds its lock
around every call except ``read_file``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from catfast.adapters.adapter import format_name, most_common
from catfast.adapters.formats import read_adapter
from catfast.adapters.merge import MAX_UPDATE_RATIO, resolve_targets, update_ratio
from catfast.errors import CatfastError
from catfast.integrations.word_embedding import read_embedding
from catfast.nn.slot_lora import SlotHolder, SlotLora
from catfast.serve.errors import AdapterFamilyError, AdapterLoadError, UnknownAdapter
from catfast.serve.scan import one_line

log = logging.getLogger("catfast.serve")


@dataclass
class AdapterInfo:
    """A registered adapter: its file, format ("diffusers" or "kohya", the names `catfast adapter info`
    uses), rank and alpha (the most common over its layers), the module kinds it targets (to_q, conv1, ...)
    and whether it is on the device now."""

    name: str
    path: str
    format: str
    rank: int
    alpha: float
    targets: list[str]
    resident: bool


@dataclass
class Entry:
    """One registration (a name re-registered is a new entry; the old one lives while requests use it)."""

    name: str
    path: str
    format: str
    rank: int
    alpha: float
    kinds: list[str]
    modules: list[str]  # the module names it targets (UNet names; "text_encoder:<name>" for text encoders)
    layers: dict | None = None  # host tier: module name -> (down, up, alpha / r); None when not in host memory
    slot: int | None = None
    running: int = 0  # running requests using it (never evicted while > 0)
    queued: int = 0  # queued requests naming it
    removed: bool = False
    loading: bool = False
    error: str | None = None  # the last failed re-read from disk
    meta: dict = field(default_factory=dict)

    def info(self) -> AdapterInfo:
        resident = self.slot is not None
        return AdapterInfo(self.name, self.path, self.format, self.rank, self.alpha, list(self.kinds), resident)


def adapter_meta(adapter, denoiser_layers: dict, layers: dict, e4t=None) -> dict:
    """What registration records of a file read by ``AdapterPool._read``: format, the most common rank and
    alpha of its denoiser layers, the module kinds it targets, the modules (``layers``' keys) and E4T data."""
    return {
        "format": format_name(adapter.source_format),
        "rank": int(most_common([v.rank for v in denoiser_layers.values()])),
        "alpha": float(most_common([v.alpha for v in denoiser_layers.values()])),
        "kinds": adapter.describe()["targets"],
        "modules": sorted(layers),
        "e4t": e4t,
    }


class AdapterPool:
    """Registry, host LRU and device slots of one model (see the module docstring)."""

    def __init__(
        self, unet: torch.nn.Module, *, num_slots: int = 16, host_cache: int = 64, text_encoders: dict | None = None
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.unet = unet
        # every model an adapter may target, by component; each has its own plan holder (its own rows)
        self.models = {"unet": unet, **{k: v for k, v in (text_encoders or {}).items() if v is not None}}
        self.num_slots, self.host_cache = num_slots, max(0, host_cache)
        self.holders = {component: SlotHolder() for component in self.models}
        self.holder = self.holders["unet"]
        self.layers: dict[str, SlotLora] = {}
        self.entries: dict[str, Entry] = {}
        self.slots: list[Entry | None] = [None] * num_slots
        self.resident_lru: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest first
        self.host_lru: OrderedDict[int, Entry] = OrderedDict()
        self.hits = self.loads = self.evictions = 0
        self._norms: dict[str, float] = {}  # registration's ratio check: norms of the target weights

    # --------------------------------------------------------------------------- registry (host side)

    def read_file(self, path: str | os.PathLike) -> tuple[dict, dict]:
        """Parse and check an adapter file against the UNet: (layers, meta). AdapterLoadError (one line)
        for a file that is missing, corrupt, in an unknown format, made for another model, of rank 0, with
        non-finite values or damaged E4T metadata, or whose update is out of proportion to the weights it
        modifies (``MAX_UPDATE_RATIO``); whatever else reading it raises is reported the same way, so one
        bad file never escapes as a crash. Lock-free."""
        path = Path(path)
        try:
            if not path.exists():
                raise AdapterLoadError(f"{path}: no such file")
            return self._read(path)
        except (AdapterLoadError, AdapterFamilyError) as e:
            raise type(e)(one_line(e)) from None
        except CatfastError as e:
            raise AdapterLoadError(one_line(e)) from None
        except Exception as e:  # noqa: BLE001 - a file must not crash the server, whatever it holds
            log.debug("reading %s failed", path, exc_info=True)
            raise AdapterLoadError(one_line(f"{path}: cannot read the adapter: {type(e).__name__}: {e}")) from None

    def _read(self, path: Path) -> tuple[dict, dict]:
        adapter = read_adapter(path, models=self.models)
        others = [c for c in adapter.components() if c not in self.models]
        if others:
            raise AdapterLoadError(f"{path}: has {', '.join(others)} LoRA layers, but the base has no {others[0]}")
        unet_layers = adapter.component("unet")
        if not unet_layers:
            raise AdapterLoadError(f"{path}: no UNet layers in this adapter")
        targets = {c: resolve_targets(self.models[c], adapter, c) for c in adapter.components()}
        e4t = read_embedding(adapter.metadata, str(path))  # an E4T concept embedding, or None
        layers = {}
        for component, found in targets.items():
            component_layers = adapter.component(component)
            for p, (name, module) in found.items():
                layer = component_layers[p]
                if isinstance(module, torch.nn.Conv2d) and module.padding_mode != "zeros":
                    raise AdapterLoadError(f"{path}: {name} is a Conv2d with padding_mode={module.padding_mode!r}")
                key = name if component == "unet" else f"{component}:{name}"
                self.check_ratio(path, key, layer, module)
                layers[key] = (layer.down, layer.up, layer.scale)
        return layers, adapter_meta(adapter, unet_layers, layers, e4t)

    def check_ratio(self, path, key: str, layer, module: torch.nn.Module) -> None:
        """AdapterLoadError when ``layer``'s update is out of proportion to ``module``'s weight."""
        ratio = update_ratio(layer, self._weight_norm(key, module))
        if not ratio <= MAX_UPDATE_RATIO:
            raise AdapterLoadError(
                f"{path}: layer {key}: its LoRA update is {ratio:.3g} x the base weight it modifies "
                f"(Frobenius norms at weight 1; at most {MAX_UPDATE_RATIO:g} is accepted; catfast's demo "
                "adapters measure 0.04-0.45): a damaged or mis-scaled file"
            )

    def _weight_norm(self, key: str, module: torch.nn.Module) -> float:
        """The Frobenius norm of a target's weight, computed once per module (the base weights are frozen)."""
        norm = self._norms.get(key)
        if norm is None:
            norm = self._norms[key] = float(module.weight.detach().double().norm())
        return norm

    def register(self, name: str, path: str, layers: dict, meta: dict) -> AdapterInfo:
        """Add (or replace) ``name`` with a file already read by ``read_file``."""
        old = self.entries.get(name)
        if old is not None:
            self._retire(old)
        entry = Entry(name, str(path), meta["format"], meta["rank"], meta["alpha"], meta["kinds"], meta["modules"])
        entry.meta["e4t"] = meta.get("e4t")
        self.entries[name] = entry
        self.keep_on_host(entry, layers)
        return entry.info()

    def unregister(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is None:
            raise UnknownAdapter(f"no adapter named {name!r}")
        self._retire(entry)

    def _retire(self, entry: Entry) -> None:
        entry.removed = True
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
        self.host_lru.pop(id(entry), None)  # its tensors stay while queued or running requests need them
        self.release_if_unused(entry)

    def lookup(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownAdapter(f"no adapter named {name!r}; registered: {self._few_names()}")
        return entry

    def _few_names(self) -> str:
        names = sorted(self.entries)
        return (", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")) or "none"

    def keep_on_host(self, entry: Entry, layers: dict) -> None:
        """Put a parsed adapter in the host tier (LRU). Over ``host_cache``, the least recently used
        adapters' tensors are dropped, except those of adapters queued requests wait for (dropping them
        could make two requests' loads evict each other forever)."""
        entry.layers, entry.error = layers, None
        self.host_lru[id(entry)] = entry
        self.host_lru.move_to_end(id(entry))
        excess = len(self.host_lru) - self.host_cache
        for key, old in list(self.host_lru.items()):
            if excess <= 0:
                break
            if old.queued == 0:
                del self.host_lru[key]
                old.layers = None
                excess -= 1

    def infos(self) -> list[AdapterInfo]:
        return [self.entries[n].info() for n in sorted(self.entries)]

    # --------------------------------------------------------------------------- device slots

    def resident(self) -> int:
        return sum(e is not None for e in self.slots)

    def touch(self, entry: Entry) -> None:
        """Mark a resident adapter as just used (LRU) and count a hit."""
        self.resident_lru.move_to_end(id(entry))
        self.hits += 1

    def install(self, entry: Entry) -> bool:
        """Make ``entry`` resident (its host layers must be loaded): a free slot, else the least recently
        used slot whose adapter no running request uses. False when every slot is in use. Only between
        UNet calls."""
        if entry.slot is not None:
            return True
        if entry.layers is None:
            raise RuntimeError(f"adapter {entry.name!r} is not in host memory")
        slot = self.claim_slot()
        if slot is None or not self.put(entry, slot):
            return False
        entry.slot = slot
        self.slots[slot] = entry
        self.resident_lru[id(entry)] = entry
        self.loads += 1
        return True

    def put(self, entry: Entry, slot: int) -> bool:
        """Copy ``entry``'s host layers into device slot ``slot`` of the ``SlotLora`` hooks; True when done."""
        for name, (down, up, scale) in entry.layers.items():
            layer = self.layers.get(name)
            if layer is None:
                component, _, module = name.rpartition(":")
                component = component or "unet"
                target = self.models[component].get_submodule(module)
                layer = self.layers[name] = SlotLora(target, self.num_slots, self.holders[component])
            layer.put(slot, down, up, scale)
        return True

    def claim_slot(self) -> int | None:
        """A free slot, else the slot of the least recently used adapter no running request uses (evicted);
        None when every slot is in use."""
        slot = next((i for i, e in enumerate(self.slots) if e is None), None)
        if slot is None:
            victim = next((e for e in self.resident_lru.values() if e.running == 0), None)
            if victim is None:
                return None
            slot = victim.slot
            self._evict(victim)
            self.evictions += 1
        return slot

    def _evict(self, entry: Entry) -> None:
        for name in entry.modules:
            self.layers[name].clear(entry.slot)
        self.slots[entry.slot] = None
        self.resident_lru.pop(id(entry), None)
        entry.slot = None

    def release_if_unused(self, entry: Entry) -> None:
        """Free a retired adapter's slot once no request uses it."""
        if entry.removed and entry.running == 0 and entry.queued == 0:
            if entry.slot is not None:
                self._evict(entry)
            entry.layers = None

    def close(self) -> None:
        """Take every hook off the UNet (it computes exactly what it did before the pool)."""
        for layer in self.layers.values():
            layer.remove()
        self.layers.clear()
        self.slots = [None] * self.num_slots
        self.resident_lru.clear()
        for entry in self.entries.values():
            entry.slot = None
