"""The networks: G, E, the discriminators, their layers, and building them from a config."""
