"""marshmallow schemas for llama.cpp's own endpoints: rerank, tokenize, detokenize, apply-template and infill."""
from marshmallow import ValidationError, fields, validate, validates_schema

from .fields import INT32_MAX, JsonBoolean, JsonInteger, OpenSchema, optional
from .openai import MessageSchema


class RerankSchema(OpenSchema):
    """POST /v1/rerank: a query and the documents to order by relevance to it (as Jina's and Cohere's APIs), or
    the texts to order (Hugging Face TEI's body, which llama.cpp answers in TEI's shape: a bare array)."""

    model = optional(fields.String)
    query = fields.String(required=True)
    documents = fields.List(fields.String(), validate=validate.Length(min=1))
    texts = fields.List(fields.String(), validate=validate.Length(min=1))
    top_n = optional(JsonInteger, validate=validate.Range(min=1))
    return_text = optional(JsonBoolean)
    # For the OpenAPI document: what documents_or_texts checks.
    openapi = {"anyOf": [{"required": ["documents"]}, {"required": ["texts"]}]}

    @validates_schema
    def documents_or_texts(self, data, **kwargs):
        """One of documents (Jina, Cohere) or texts (TEI) is needed."""
        if "documents" not in data and "texts" not in data:
            raise ValidationError("Missing data for required field.", field_name="documents")


class TokenizeSchema(OpenSchema):
    """POST /tokenize: text to token ids."""

    model = optional(fields.String)
    content = fields.String(required=True)
    add_special = optional(JsonBoolean)
    with_pieces = optional(JsonBoolean)


class DetokenizeSchema(OpenSchema):
    """POST /detokenize: token ids to text."""

    model = optional(fields.String)
    tokens = fields.List(JsonInteger(validate=validate.Range(min=0, max=INT32_MAX)), required=True)


class ApplyTemplateSchema(OpenSchema):
    """POST /apply-template: chat messages to the prompt the model's template makes of them."""

    model = optional(fields.String)
    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1))


class ExtraContextSchema(OpenSchema):
    """One chunk of extra context for infill: a file name and its text."""

    filename = optional(fields.String)
    text = fields.String(required=True)


class InfillSchema(OpenSchema):
    """POST /infill: fill in the middle between a prefix and a suffix (the editor plugins' completion)."""

    model = optional(fields.String)
    input_prefix = optional(fields.String)
    input_suffix = optional(fields.String)
    input_extra = optional(fields.List, fields.Nested(ExtraContextSchema))
    prompt = optional(fields.String)
    stream = optional(JsonBoolean)
    n_predict = optional(JsonInteger, validate=validate.Range(min=-1, max=INT32_MAX))
