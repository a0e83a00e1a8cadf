"""marshmallow schema of the admin API's bodies: POST /models/load and /models/unload (llama-server router's)."""
from marshmallow import fields, validate

from .fields import OpenSchema


class ModelActionSchema(OpenSchema):
    """{"model": NAME}: the model to load or unload, named as GET /v1/models lists it."""

    model = fields.String(required=True, validate=validate.Length(min=1))
