"""Operations: metrics, logs and the per-request log line, graceful shutdown, and the OpenAPI document."""
