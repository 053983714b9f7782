"""abft-lens: Attention Behavior Fine-Tuning of induction heads for in-context learning."""

__version__ = "0.1.0"
