"""NEFTune scaled by each example's own length, packed or padded.

NEFTune (Jain et al., 2023) adds uniform noise in ±alpha / √(L × d) to the input embeddings while training, L being
the example's length and d the model's width. transformers' Trainer takes L as the batch's row length: the padded
length of a padded batch, and a whole packed row of a padding-free one (transformers issue #34659), so with the
packing our core trains with, eight examples in a row got a third of the noise the paper's alpha means, and how
much depended on the batch size. Here the scale is each example's: from the position ids where they restart per
example (packed rows), from the attention mask otherwise (the real tokens of a padded row). Evaluation and answers
run in eval mode, without noise, as in transformers.
"""

from functools import cache


def token_lengths(position_ids, attention_mask, shape):
    """The length of the example each token belongs to, shaped (batch, length, 1)."""
    import torch

    batch, length = shape
    if position_ids is not None and (attention_mask is None or bool(attention_mask.all())):
        # Packed rows (no padding): an example starts where its position id is 0.
        starts = position_ids.reshape(batch, length) == 0
        starts[:, 0] = True
        segment = torch.cumsum(starts.long(), dim=-1) - 1 + torch.arange(batch, device=starts.device)[:, None] * length
        counts = torch.bincount(segment.flatten(), minlength=batch * length)
        return counts[segment].unsqueeze(-1)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.sum(dim=-1).clamp(min=1)
        return real[:, None, None].expand(batch, length, 1)
    return torch.full((batch, length, 1), length, device=position_ids.device if position_ids is not None else None)


class ExampleNoise:
    """The two hooks: one on the model's forward reads where the examples are, one on its input embeddings adds
    the noise at each token's example's scale."""

    def __init__(self, model, alpha: float):
        self.alpha = alpha
        self.scale = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.embeddings = base.get_input_embeddings()
        self.handles = [
            base.register_forward_pre_hook(self._read_examples, with_kwargs=True),
            self.embeddings.register_forward_hook(self._add_noise),
        ]

    def _read_examples(self, module, args, kwargs):
        import torch

        if not module.training:
            self.scale = None
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        shape = input_ids.shape if input_ids is not None else kwargs["inputs_embeds"].shape[:2]
        lengths = token_lengths(kwargs.get("position_ids"), kwargs.get("attention_mask"), tuple(shape))
        width = self.embeddings.embedding_dim
        self.scale = self.alpha / torch.sqrt(lengths.float() * width)
        return None

    def _add_noise(self, module, inputs, output):
        import torch

        scale, self.scale = self.scale, None
        if not module.training or scale is None:
            return output
        noise = (torch.rand_like(output, dtype=torch.float32) * 2 - 1) * scale.to(output.device)
        return output + noise.to(output.dtype)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


@cache
def example_noise_callback() -> type:
    from transformers import TrainerCallback

    class ExampleNoiseCallback(TrainerCallback):
        """Per-example NEFTune for the length of `train()`, as the Trainer's own NEFTune is."""

        def __init__(self, alpha: float):
            self.alpha = alpha
            self.noise = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.noise = ExampleNoise(model, self.alpha)

        def on_train_end(self, args, state, control, **kwargs):
            if self.noise is not None:
                self.noise.remove()
                self.noise = None

    return ExampleNoiseCallback


def noise_callbacks(spec) -> list:
    return [] if spec.neftune_noise_alpha is None else [example_noise_callback()(spec.neftune_noise_alpha)]
