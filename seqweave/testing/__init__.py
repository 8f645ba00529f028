"""seqweave.testing."""
