"""Shared test settings: no downloads, few threads, quiet logs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)
