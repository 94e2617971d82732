"""Mamba-1, Falcon-Mamba, Mamba-2 and hybrid (Mamba / attention / MLP) language models."""
