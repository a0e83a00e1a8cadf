"""The page for the people who run the gateway (GET /ui): models, clients, the last requests, a playground."""
from .views import bp

__all__ = ["bp"]
