"""fedefm: federated endovascular foundation model and few-shot catheter/guidewire segmentation."""

__version__ = "0.1.0"
