"""seqweave.codegen."""
