"""``TokenBlockDataset``: packed token blocks served to ``transformers.Trainer``."""

from __future__ import annotations

import torch

from .sequences import calibration_data


class TokenBlockDataset(torch.utils.data.Dataset):
    """Packed token blocks for ``transformers.Trainer``: each item is ``{"input_ids",
    "attention_mask", "labels"}`` (1-D LongTensors of the block length). ``labels`` are the input ids
    (the model shifts them), set to -100 where ``loss_mask`` is False."""

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor (nsamples, seqlen)")
        if loss_mask is not None and loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids.long()
        self.loss_mask = None if loss_mask is None else loss_mask.bool()

    @classmethod
    def from_source(cls, source, tokenizer, model=None, *, nsamples: int, seqlen: int, seed: int = 0,
                    assistant_only_loss: bool = False, **kw) -> "TokenBlockDataset":
        """Load, pack and wrap in one call; ``assistant_only_loss`` masks system/user tokens out of ``labels``."""
        input_ids, loss_mask = calibration_data(source, tokenizer, model=model, nsamples=nsamples, seqlen=seqlen,
                                                seed=seed, return_loss_mask=True, **kw)
        return cls(input_ids, loss_mask if assistant_only_loss else None)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        labels = ids.clone()
        if self.loss_mask is not None:
            labels[~self.loss_mask[index]] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
