"""The typed IR: graph, ops, MaskSpec, verifier, text form and reference interpreter.

`ir` imports none of seqweave's other packages: frontends build it, passes rewrite it,
codegen lowers it.
"""
