"""Framework integrations. Only integrations/hf.py imports transformers."""
