"""Warm conversations: llama.cpp slot states saved to disk under a stable prefix key, bound to the model's identity,
and restored into a free slot when the conversation comes back (after an unload, a crash, a gateway restart)."""
