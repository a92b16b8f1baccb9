"""Observing a run: logging, the trackers (CSV, W&B, TensorBoard, MLflow), the progress bar and rates, the model summary."""
