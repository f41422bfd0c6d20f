"""Model sources: random initialisation and loading from local directories."""
