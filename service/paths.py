"""Where the project is on disk: its root (for .env and child processes) and the default models folder."""
import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS_DIR = os.path.join(PROJECT_ROOT, "models")  # MODELS_DIR unset: models/ in the project
