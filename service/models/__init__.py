"""What models exist: one description of a model (spec.py), the readers that make it (models_file.py), the model
files and their names (model_file.py, names.py), fetching from Hugging Face (hub.py, projector.py), the demo model
and the memory estimate."""
