"""The default step's batch contract, in one place: a batch is (inputs, targets).

Training, evaluation, predictions and the summary's example forward all read a batch through
inputs_and_targets(); a batch that is not that shape is the user's error in one line, never a
silent unpack (a 2-key dict would unpack into its key strings).
"""

from __future__ import annotations

from typing import Any

from ..config import UserError


def inputs_and_targets(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a batch: a tuple or list of two; a 1-tuple or a bare tensor is inputs
    alone (data for predict())."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise UserError(f"data: a batch of {len(batch)} items ({type(batch).__name__}); valid: (inputs, targets) "
                        "pairs, as a TensorDataset of two tensors or a Dataset returning two items gives")
    if isinstance(batch, dict):
        raise UserError(f"data: a dict batch (keys {', '.join(map(str, batch))}); valid: (inputs, targets) "
                        "pairs for the default step")
    return batch, None
