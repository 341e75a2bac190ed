"""Evaluation protocols of the recipe: weighted k-NN, linear probe, attention maps."""
