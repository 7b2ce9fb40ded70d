"""Ops: torch.library registration (schema, fake kernel, autograd) and backend selection, one file per op."""
