"""The embedded default: a deterministic synthetic multi-site chest X-ray data set in native formats."""
