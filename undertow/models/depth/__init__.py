"""Recurrence in depth: the Universal Transformer with adaptive computation time, and Huginn-style
recurrent-depth models (prelude -> looped core -> coda)."""
