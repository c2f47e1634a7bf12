"""accelerate's "Removed shared tensor" warning, explained once instead of at every checkpoint.

The ``tiny`` and Harmon presets tie the LLM's output projection to its input embedding (``tie_word_embeddings``,
as Qwen2.5-0.5B/1.5B do): ``llm.lm_head.weight`` *is* ``llm.model.embed_tokens.weight``. safetensors stores a
tensor once, so ``accelerate.save_state`` drops the alias and warns; ``load_state`` gets it back through the tie
(the resume tests check the weights to round-off). The weights are already tied, so untying is not the fix: the
warning is expected. :func:`explain_shared_tensors` replaces it with one INFO line when every name it lists is
such an alias of the model, and lets any other shared-tensor warning through.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch
from accelerate.utils import id_tensor_storage

ACCELERATE_LOGGER = "accelerate.utils.other"
_NAMES = re.compile(r"Removed shared tensor \{(.*?)\} while saving")


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """``{alias: kept name}`` for state-dict entries that share storage (the later names, as accelerate drops)."""
    by_storage: dict = defaultdict(list)
    for name, tensor in module.state_dict().items():
        by_storage[id_tensor_storage(tensor)].append(name)
    return {alias: names[0] for names in by_storage.values() if len(names) > 1 for alias in names[1:]}


class _SharedTensorNote(logging.Filter):
    def __init__(self, aliases: dict[str, str], log: logging.Logger) -> None:
        super().__init__()
        self.aliases, self.log, self.explained = aliases, log, False

    def filter(self, record: logging.LogRecord) -> bool:
        match = _NAMES.search(record.getMessage())
        if match is None:
            return True
        names = set(re.findall(r"'([^']+)'", match.group(1)))
        if not names or not names <= set(self.aliases):
            return True  # an alias this model does not explain: show accelerate's warning
        if not self.explained:
            self.explained = True
            pairs = ", ".join(f"{alias} is {self.aliases[alias]}" for alias in sorted(names))
            self.log.info(f"checkpoints store tied weights once ({pairs}: tie_word_embeddings); accelerate's "
                          "'Removed shared tensor' warning for them is expected and not repeated")
        return False


def explain_shared_tensors(module: torch.nn.Module, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Install the filter on accelerate's logger for ``module``'s tied weights (replacing an earlier one)."""
    target = logging.getLogger(ACCELERATE_LOGGER)
    for old in [f for f in target.filters if isinstance(f, _SharedTensorNote)]:
        target.removeFilter(old)
    aliases = tied_aliases(module)
    if aliases:
        target.addFilter(_SharedTensorNote(aliases, log))


__all__ = ["explain_shared_tensors", "tied_aliases"]
