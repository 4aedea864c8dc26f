"""Getting model updates from sites to the server compactly and intact (FOBS encodings)."""
