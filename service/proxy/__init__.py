"""The proxy path to llama-server: the one Session (upstream), routing over replicas, the relay of answers, and
cutting calls whose client has gone."""
