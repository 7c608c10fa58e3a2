"""Row-aware stand-ins for the frozen parts of a patched UNet (docs/design.md, "No backward work
for the teacher rows"): Conv2d / Linear layers without LoRA, and attention.

With a row plan that mixes grad and no-grad samples, ``RowFrozenConv2d`` / ``RowFrozenLinear`` run
every row in one launch but compute dX only for the grad samples, and ``RowAttnProcessor`` runs the
attention core with autograd for the grad samples only. Under any plan the convolutions run, forward and
dX, by the faster algorithm for their shape (``catfast.ops.conv``). Without a plan each defers to the
original module / processor exactly. Parameters are the original ones, under the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catfast.nn.plan_holder import PlanHolder
from catfast.nn.row_lora import RowLoraLayer
from catfast.ops.conv import conv2d_by_shape
from catfast.ops.grad_rows import frozen_conv2d, frozen_linear, split_rows


class _RowFrozen(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, holder: PlanHolder):
        super().__init__()
        self.__dict__["inner"] = inner
        self.__dict__["holder"] = holder
        # the wrapped layer's own Parameters, under the same names (set directly: __getattr__ below
        # would make register_parameter see them as existing attributes)
        self._parameters["weight"] = inner.weight
        if inner.bias is not None:
            self._parameters["bias"] = inner.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # in_channels, kernel_size, in_features, ... read by model code
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def matches(self) -> bool:
        """Whether the wrapped layer still has the parameters this stand-in registered."""
        inner = self.inner
        return self._parameters["weight"] is inner.weight and self._parameters.get("bias") is inner.bias

    def refresh(self) -> None:
        """Nothing to re-read: the parameters are shared (``matches`` checks they are still the same)."""

    def _row_aware(self, x: torch.Tensor, holder: PlanHolder, inner: torch.nn.Module) -> bool:
        bias = inner.bias
        return (
            x.requires_grad
            and holder.split
            and torch.is_grad_enabled()
            and x.shape[0] == len(holder.plan)
            and not inner.weight.requires_grad
            and (bias is None or not bias.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # read from __dict__ once, not through nn.Module.__getattr__ (a Python call per read, per module, per step)
        holder, inner = self.__dict__["holder"], self.__dict__["inner"]
        if holder.plan is None:  # no plan: exactly the original module
            return inner(x)
        if holder.in_prefix:
            shared = holder.prefix_shared(x, inner)
            if shared is not None:
                return shared
        if holder.twins and holder.shares_twins(x):
            return holder.twin_shared(x, self.forward)
        if not self._row_aware(x, holder, inner):
            return self.plain_op(x, inner)
        return self.row_aware_op(x, inner, holder.plan)

    def extra_repr(self) -> str:
        return repr(self.inner)


class RowFrozenConv2d(_RowFrozen):
    """A frozen Conv2d whose backward spends work only on the grad samples."""

    row_aware_op = staticmethod(frozen_conv2d)
    plain_op = staticmethod(conv2d_by_shape)  # every row, or no plan: the faster algorithm for the shape


class RowFrozenLinear(_RowFrozen):
    """A frozen Linear whose backward spends work only on the grad samples."""

    row_aware_op = staticmethod(frozen_linear)
    plain_op = staticmethod(lambda x, inner: inner(x))


class RowAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention core split by the row plan: the grad samples with
    autograd, the others under no_grad. Falls back to ``fallback`` for what it does not handle."""

    def __init__(self, holder: PlanHolder, fallback):
        self.holder = holder
        self.fallback = fallback
        self._holds_lora: bool | None = None  # whether this attention module has a row-planned LoRA layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        holder = self.holder
        if encoder_hidden_states is not None:
            holder.cross_attention_reached()
        elif attention_mask is None and temb is None and not kwargs:
            if holder.in_prefix:  # the first self-attention: its rows are still identical across groups
                if self._holds_lora is None:
                    self._holds_lora = any(isinstance(m, RowLoraLayer) for m in attn.modules())
                if self._holds_lora:
                    # the teacher rows diverge inside; the adapter groups stay twins through the whole core
                    # (sharing only the projections ran the attention core, the bulk of its cost, on all rows)
                    holder.lora_layer_reached()
                else:
                    shared = holder.prefix_shared(hidden_states, lambda rows: self.fallback(attn, rows))
                    if shared is not None:
                        return shared
            if holder.shares_twins(hidden_states):
                return holder.twin_shared(hidden_states, lambda rows: self(attn, rows))
        if (
            not self.holder.split
            or attention_mask is not None
            or attn.spatial_norm is not None
            or hidden_states.shape[0] != len(self.holder.plan)
            or kwargs
        ):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = split_rows(F.scaled_dot_product_attention, self.holder.plan, query, key, value)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
