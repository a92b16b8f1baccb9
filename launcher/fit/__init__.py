"""The fit loop's parts: the step, batches and data order, metrics, the non-finite guard, evaluation, validation, the loop's progress state, seeds."""
