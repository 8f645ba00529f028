"""seqweave.passes."""
