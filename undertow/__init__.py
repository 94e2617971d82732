"""undertow: pretraining for recurrent-family language models."""

__version__ = "0.1.0"
