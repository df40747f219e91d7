"""The text encoder of a run: MiniLM from its wheel, or an imported umT5 (Wan 2.1) from the run
folder, behind one interface: ``encode(texts, pad_to) -> (states (N, L, D) float32, mask (N, L)
bool)``, the mask marking the tokens the DiT's cross-attention sees.

Wan 2.1 pads every prompt to 512 tokens with zero states and its DiT attends to all 512 (no
mask; diffusers' ``WanPipeline``), so the umT5 wrapper's mask is all True: the zeros beyond a
prompt's length are part of its conditioning there.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np
from flax import nnx

from sora_jax.errors import StageError
from sora_jax.models.factory import build_umt5, text_encoder
from sora_jax.models.umt5 import WanPromptEncoder
from sora_jax.train.run_folder import paths, restore

__all__ = ["UMT5Text", "load_text_encoder"]


class UMT5Text:
    """An imported umT5 encoder with MiniLM's ``encode`` interface (Wan 2.1's prompt encoding:
    :class:`sora_jax.models.umt5.WanPromptEncoder`).

    Args:
      encoder: the prompt encoder (model + tokenizer, ``max_length`` tokens).
    """

    def __init__(self, encoder: WanPromptEncoder):
        self.encoder = encoder
        self.hidden_size = encoder.d_model

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(states float32 (N, max_length, D), zero beyond each prompt; mask all True (N, max_length)).

        Raises:
          ValueError: ``pad_to`` given and not the encoder's ``max_length`` (Wan's prompts have one
            length).
        """
        if pad_to is not None and pad_to != self.encoder.max_length:
            raise ValueError(f"the umT5 prompt length is {self.encoder.max_length}, not {pad_to}")
        states, _ = self.encoder.encode(list(texts))
        states = np.asarray(states, np.float32)
        return states, np.ones(states.shape[:2], bool)

    __call__ = encode


def load_text_encoder(cfg: ml_collections.ConfigDict, workdir: str, max_length: int | None = None):
    """The text encoder of ``cfg.text`` for the run folder ``workdir``: MiniLM (``encoder`` "minilm"
    or absent; ``max_length`` tokens, default ``cfg.text.max_length``) or the run's imported umT5
    (``"umt5"``, restored from ``<workdir>/text_encoder``; its prompts are always
    ``cfg.text.max_length`` long, as Wan's are).

    Raises:
      StageError: a umT5 run folder without its text encoder (run ``import-weights``).
    """
    if cfg.text.get("encoder", "minilm") != "umt5":
        return text_encoder(max_length or cfg.text.max_length)
    folder = paths(workdir)["text_encoder"]
    model = nnx.eval_shape(lambda: build_umt5(cfg))
    restore(model, folder, "text_encoder")
    try:
        return UMT5Text(WanPromptEncoder(model, f"{folder}/tokenizer", max_length=cfg.text.max_length))
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"the umT5 tokenizer of {workdir}: {e} (run `sora-jax import-weights`)") from None
