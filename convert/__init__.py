"""`python -m convert`: an alias of `python -m fastvlm_mlx.convert` (same flags, same code)."""
