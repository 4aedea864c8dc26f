"""NVFlare filters: thin adapters from DXOs to the pure functions in :mod:`medflare.privacy`."""
