"""Fast ops for the GLM model, each beside a pure-torch reference with the same signature.

`kernels.attention.attention` is the one dispatch point for attention; tests force a path
with `kernels.attention.use_impl("reference")`. Never imports Ray.
"""
