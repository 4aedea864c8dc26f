"""Privacy mathematics with no NVFlare in it: sharing, clipping, noise, accounting, budgets.

The NVFlare adapters live in :mod:`medflare.filters`; everything here can be called and tested
with plain arrays.
"""
