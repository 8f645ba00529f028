"""seqweave.runtime."""
