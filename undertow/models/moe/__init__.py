"""Mixture-of-experts layers for every family's MLP slot: SwiGLU experts with top-k token choice,
a linear or a layerwise recurrent (RMoE) router, load-balancing and z losses."""
