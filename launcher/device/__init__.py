"""Devices and how a model is spread over them: the process group (dist.py, the only init_process_group), the strategy (DDP, FSDP2, compile), precision, hardware detection, torch-xla calls."""
