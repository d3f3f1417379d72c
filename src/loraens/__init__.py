"""loraens: calibrated fine-tuning of language models with LoRA ensembles."""

__version__ = "0.1.0"
