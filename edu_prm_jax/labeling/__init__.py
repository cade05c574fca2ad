"""Labelling of sampled solutions for PRM training data."""
