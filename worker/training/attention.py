"""Attention over packed rows, one example at a time, instead of over a dense (ΣL)² block-diagonal mask.

Padding-free packing puts a micro-batch's examples end to end in one row, with position ids restarting per example.
With PyTorch's SDPA, transformers then builds a block-diagonal mask over the whole row, so attention costs
(ΣL)² per head instead of ΣL², and SDPA cannot use its fused causal kernels with an arbitrary mask: on a CPU this
made packed SmolLM2 training slower than padding each batch to its longest row. flash-attention's varlen kernels
solve this on a GPU where they are installed; everywhere else `packed_sdpa` runs SDPA with `is_causal=True` on each
example's slice of the row, found from the `cu_seq_lens_q` boundaries the training collator adds.

A bf16 model on the CPU attends in float32 in examples shorter than the measured `FP32_BELOW` of its config
(worker/training/compute.py `AttentionPath`): PyTorch's CPU kernel is much slower in bf16 on short sequences.

Without those boundaries (evaluation, generation, unpacked batches) it is transformers' own SDPA, mask included.
Sliding-window layers get a windowed mask for an example longer than their window. A family whose forward does not
hand keyword arguments down to its attention layers never sees the boundaries and keeps the dense mask: correct,
only not faster. Loss and gradients equal the dense-mask ones (tests/worker/training/test_packed_attention.py).
"""

import contextlib
import functools

PACKED_SDPA = "lorajobs_packed_sdpa"
BOUNDARY_KEY = "cu_seq_lens_q"  # the name flash-attention varlen uses; models hand it down to attention
FP32_BELOW = "lorajobs_fp32_attention_below"  # config attribute: examples shorter than this attend in float32


def _window_mask(length: int, window: int, device):
    import torch

    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers' attention-function signature: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boundaries = kwargs.get(BOUNDARY_KEY)
    if boundaries is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    import torch

    rest = {k: v for k, v in kwargs.items() if k != BOUNDARY_KEY}
    window = rest.get("sliding_window") or getattr(module, "sliding_window", None)
    fp32_below = getattr(getattr(module, "config", None), FP32_BELOW, 0) if query.dtype == torch.bfloat16 else 0
    outputs = []
    for start, end in zip(boundaries[:-1].tolist(), boundaries[1:].tolist()):
        length = end - start
        mask = _window_mask(length, window, query.device) if window and length > window else None
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        upcast = length < fp32_below
        with torch.autocast(query.device.type, enabled=False) if upcast else contextlib.nullcontext():
            out, _ = sdpa_attention_forward(module, *((t.float() for t in (q, k, v)) if upcast else (q, k, v)), mask,
                                            dropout=dropout, scaling=scaling, is_causal=mask is None, **rest)
        outputs.append(out.to(query.dtype))  # a no-op where it did not upcast
    return torch.cat(outputs, dim=1), None


@functools.cache
def register() -> str:
    """Make `PACKED_SDPA` an attention implementation transformers knows (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def use_packed_attention(model) -> bool:
    """Switch a text model that runs transformers' SDPA to `packed_sdpa`; leave every other model as it is."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or config.sub_configs:
        return False
    model.set_attn_implementation(register())
    attend_in_float32_below(model, 0)
    return config._attn_implementation == PACKED_SDPA


def attend_in_float32_below(model, length: int) -> None:
    """A bf16 model's packed examples shorter than `length` attend in float32 (compute.py `AttentionPath`)."""
    setattr(model.config, FP32_BELOW, length)


def add_boundaries(batch: dict) -> dict:
    """The examples' boundaries in a packed row (positions restart at 0 where an example starts)."""
    import torch

    position_ids = batch.get("position_ids")
    if position_ids is None or position_ids.shape[0] != 1:
        return batch
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    batch[BOUNDARY_KEY] = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)
    return batch
