"""medflare: NVFlare plugins for federated medical imaging with privacy a hospital can prove."""

__version__ = "0.1.0"
