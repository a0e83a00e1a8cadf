"""Access policy: API keys, per-client limits (in memory or shared through Redis), and the hooks that apply them."""
