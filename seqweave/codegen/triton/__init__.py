"""Triton kernels seqweave generates: flash attention (mask-specialised) and chunked linear attention."""
