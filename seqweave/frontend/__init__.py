"""seqweave.frontend."""
