"""Titans: attention with a neural long-term memory learned at test time (MAC, MAG, MAL; arXiv 2501.00663)."""
