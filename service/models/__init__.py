"""What models exist: one description of a model (spec.py) and the readers that make it (models_file.py)."""
