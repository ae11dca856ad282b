"""A deep/shallow split of diffusers' ``UNet2DConditionModel`` (DeepCache-style feature reuse).

The wrapper drives the UNet's own submodules (time embedding, ``conv_in``, down/mid/up blocks and
their resnets/attentions/samplers, the output head); it does not fork the UNet's forward.

Skip stack. The UNet collects ``conv_in``'s output and every down sub-block output (each
(resnet[, attention]) pair, then each block's downsampler) on a stack; up block ``u`` pops its
``n_u`` skips from the top, its pair ``s`` taking stack entry ``end_u - 1 - s``. A cache point
``(u, s)`` caches the hidden state entering pair ``s`` of up block ``u`` (before its skip concat);
the shallow path then needs only the stack entries ``0 .. end_u - 1 - s`` (the bottom of the
stack: ``conv_in`` and the first down sub-blocks), then runs pairs ``s..`` of block ``u``, the later
up blocks and the head.

- ``"paper"`` = (last up block, pair 1): DeepCache's (layer 0, block 0) point, which the public
  Hash3D code uses; shallow = time embedding + ``conv_in`` + the first down block's first pair
  (the skips of pairs 1..) + pairs 1.. of the last up block + head.
- ``"last_subblock"`` = (last up block, its last pair): shallow = time embedding + ``conv_in``
  (the pair's skip) + that pair + head.
- ``"last_block"`` = (last up block, pair 0): shallow = time embedding + ``conv_in`` + the first
  down block's pairs (the skips) + the whole last up block + head.

Measured on the meta device for the stable-zero123 architecture (CFG batch 2, 32x32 latent, one
context token): full 176.3 GMACs; shallow 11.7 (last_subblock), 32.6 ((-1, 1)), 55.7 (last_block).

Not supported (a clear error, or simply not accepted as arguments): class/addition embeddings,
encoder projections, FreeU, attention masks, ``cross_attention_kwargs``, ControlNet/adapter
residuals, and block types other than (CrossAttn)Down/UpBlock2D and the two standard mid blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

from hash3d_dg.cache.config import resolve_cache_point

_DOWN_TYPES = (CrossAttnDownBlock2D, DownBlock2D)
_UP_TYPES = (CrossAttnUpBlock2D, UpBlock2D)
_MID_TYPES = (UNetMidBlock2DCrossAttn, UNetMidBlock2D)


class UnsupportedUNetError(ValueError):
    """The UNet uses a feature the split wrapper does not implement."""


@dataclass(frozen=True)
class _Embeddings:
    emb: torch.Tensor  # [N, temb] time embedding
    context: torch.Tensor  # [N, L, D] encoder hidden states


def _has_attention(block: nn.Module) -> bool:
    return getattr(block, "attentions", None) is not None and bool(getattr(block, "has_cross_attention", False))


class UNetSplit:
    """Deep/shallow split of a ``UNet2DConditionModel``.

    Args:
        unet: the model (weights frozen by the caller; autograd w.r.t. the sample is kept).
        cache_point: ``"paper"`` (= ``(-1, 1)``), ``"last_subblock"`` (= ``(-1, -1)``),
            ``"last_block"`` (= ``(-1, 0)``) or ``(up_block_index, pair_index)`` (negative indices
            count from the end).

    Raises:
        UnsupportedUNetError: class/addition embeddings, encoder projection, unsupported block
            types, or a stack layout the up blocks do not consume exactly.
        ValueError: an invalid cache point.
    """

    def __init__(self, unet: nn.Module, cache_point: str | tuple[int, int] | list = "paper"):
        self.unet = unet
        self._check_supported(unet)
        ups = list(unet.up_blocks)
        cache_point = resolve_cache_point(cache_point)
        u, s = cache_point
        if u < 0:
            u += len(ups)
        if not 0 <= u < len(ups):
            raise ValueError(f"cache point up block {cache_point[0]} out of range for {len(ups)} up blocks")
        n = len(ups[u].resnets)
        if s < 0:
            s += n
        if not 0 <= s < n:
            raise ValueError(f"cache point sub-block {cache_point[1]} out of range for {n} sub-blocks")
        self.cache_point: tuple[int, int] = (u, s)
        # Stack ranges consumed by each up block: block j takes [start_j, end_j).
        total = 1 + sum(len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks)
        sizes = [len(b.resnets) for b in ups]
        if sum(sizes) != total:
            raise UnsupportedUNetError(f"up blocks consume {sum(sizes)} skips but the down path makes {total}")
        self._ranges: list[tuple[int, int]] = []
        end = total
        for n in sizes:
            self._ranges.append((end - n, end))
            end -= n
        # Stack entries the shallow path needs: indices 0 .. n_skips - 1.
        self.n_skips = self._ranges[u][1] - s

    # -- checks --------------------------------------------------------------------------------
    @staticmethod
    def _check_supported(unet: nn.Module) -> None:
        cfg = unet.config
        problems = []
        if getattr(unet, "class_embedding", None) is not None:
            problems.append("class embeddings")
        if cfg.get("addition_embed_type") is not None:
            problems.append(f"addition embeddings ({cfg.get('addition_embed_type')})")
        if getattr(unet, "encoder_hid_proj", None) is not None:
            problems.append("an encoder hidden-state projection")
        for b in unet.down_blocks:
            if not isinstance(b, _DOWN_TYPES):
                problems.append(f"down block {type(b).__name__}")
        for b in unet.up_blocks:
            if not isinstance(b, _UP_TYPES):
                problems.append(f"up block {type(b).__name__}")
        if unet.mid_block is not None and not isinstance(unet.mid_block, _MID_TYPES):
            problems.append(f"mid block {type(unet.mid_block).__name__}")
        if problems:
            raise UnsupportedUNetError("UNetSplit does not support " + "; ".join(problems)
                                       + " (supported: SD-1.x style UNet2DConditionModel)")

    def _check_freeu(self) -> None:
        for b in self.unet.up_blocks:
            if all(getattr(b, a, None) for a in ("s1", "s2", "b1", "b2")):
                raise UnsupportedUNetError("UNetSplit does not support FreeU: call unet.disable_freeu()")

    # -- pieces --------------------------------------------------------------------------------
    def _embed(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> _Embeddings:
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return _Embeddings(emb, encoder_hidden_states)

    def _conv_in(self, sample: torch.Tensor) -> torch.Tensor:
        if self.unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        return self.unet.conv_in(sample)

    def _upsample_size(self, j: int, stack_bottom: list[torch.Tensor], sample: torch.Tensor):
        """Output size for up block ``j``'s upsampler when the input is not a multiple of the
        overall factor (as the UNet does); None otherwise or for the final block."""
        factor = 2 ** self.unet.num_upsamplers
        if j == len(self.unet.up_blocks) - 1 or all(d % factor == 0 for d in sample.shape[-2:]):
            return None
        return stack_bottom[self._ranges[j][0] - 1].shape[2:]

    @staticmethod
    def _pair(block: nn.Module, idx: int, h: torch.Tensor, e: _Embeddings) -> torch.Tensor:
        h = block.resnets[idx](h, e.emb)
        if _has_attention(block):
            h = block.attentions[idx](h, encoder_hidden_states=e.context, return_dict=False)[0]
        return h

    def _up_pairs(self, block: nn.Module, h: torch.Tensor, skips: list[torch.Tensor], pairs: range,
                  e: _Embeddings) -> torch.Tensor:
        """Run up-block pairs ``pairs``, popping skips from the end of ``skips`` (mutated)."""
        for p in pairs:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._pair(block, p, h, e)
        return h

    @staticmethod
    def _upsamplers(block: nn.Module, h: torch.Tensor, upsample_size) -> torch.Tensor:
        if block.upsamplers is not None:
            for up in block.upsamplers:
                h = up(h, upsample_size)
        return h

    def _up_block(self, j: int, h: torch.Tensor, skips: list[torch.Tensor], e: _Embeddings,
                  upsample_size) -> torch.Tensor:
        block = self.unet.up_blocks[j]
        kwargs = dict(hidden_states=h, temb=e.emb, res_hidden_states_tuple=tuple(skips),
                      upsample_size=upsample_size)
        if _has_attention(block):
            kwargs["encoder_hidden_states"] = e.context
        return block(**kwargs)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        if unet.conv_norm_out is not None:
            h = unet.conv_norm_out(h)
            h = unet.conv_act(h)
        return unet.conv_out(h)

    def _down_stack_prefix(self, h: torch.Tensor, e: _Embeddings, count: int) -> list[torch.Tensor]:
        """The bottom ``count`` skip-stack entries, computing only the sub-blocks they need."""
        stack = [h]
        for block in self.unet.down_blocks:
            if len(stack) >= count:
                break
            for p in range(len(block.resnets)):
                if len(stack) >= count:
                    break
                h = self._pair(block, p, h, e)
                stack.append(h)
            if len(stack) >= count:
                break
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)
                stack.append(h)
        return stack[:count]

    # -- public paths --------------------------------------------------------------------------
    def full(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full forward.

        Args:
            sample: ``[N, C_in, H, W]``.
            timestep: scalar (number or 0-d tensor) or ``[N]`` tensor.
            encoder_hidden_states: ``[N, L, D]``.

        Returns:
            ``(noise prediction [N, C_out, H, W]`` equal to ``unet(...).sample``, ``feature``): the
            hidden state at the cache point, ``[N, C_f, H_f, W_f]``.
        """
        self._check_freeu()
        unet = self.unet
        e = self._embed(sample, timestep, encoder_hidden_states)
        h = self._conv_in(sample)
        stack = [h]
        for block in unet.down_blocks:
            if _has_attention(block):
                h, res = block(hidden_states=h, temb=e.emb, encoder_hidden_states=e.context)
            else:
                h, res = block(hidden_states=h, temb=e.emb)
            stack.extend(res)
        if unet.mid_block is not None:
            if _has_attention(unet.mid_block):
                h = unet.mid_block(h, e.emb, encoder_hidden_states=e.context)
            else:
                h = unet.mid_block(h, e.emb)
        u, s = self.cache_point
        feature = None
        for j, block in enumerate(unet.up_blocks):
            start, end = self._ranges[j]
            skips = stack[start:end]
            size = self._upsample_size(j, stack, sample)
            if j != u:
                h = self._up_block(j, h, skips, e, size)
                continue
            h = self._up_pairs(block, h, skips, range(0, s), e)
            feature = h
            h = self._up_pairs(block, h, skips, range(s, len(block.resnets)), e)
            h = self._upsamplers(block, h, size)
        return self._head(h), feature

    def shallow(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                feature: torch.Tensor) -> torch.Tensor:
        """Shallow forward from a cached ``feature`` (shapes as in :meth:`full`).

        ``shallow(x, t, c, full(x, t, c)[1]) == full(x, t, c)[0]``.
        """
        self._check_freeu()
        unet = self.unet
        e = self._embed(sample, timestep, encoder_hidden_states)
        stack = self._down_stack_prefix(self._conv_in(sample), e, self.n_skips)
        u, s = self.cache_point
        if feature.shape[0] != sample.shape[0]:
            raise ValueError(f"feature batch {feature.shape[0]} does not match sample batch {sample.shape[0]}")
        h = feature.to(dtype=stack[0].dtype)
        for j in range(u, len(unet.up_blocks)):
            block = unet.up_blocks[j]
            start, end = self._ranges[j]
            size = self._upsample_size(j, stack, sample)
            if j == u:
                skips = stack[start:self.n_skips]
                h = self._up_pairs(block, h, skips, range(s, len(block.resnets)), e)
                h = self._upsamplers(block, h, size)
            else:
                h = self._up_block(j, h, stack[start:end], e, size)
        return self._head(h)

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """``full(...)[0]``."""
        return self.full(sample, timestep, encoder_hidden_states)[0]
