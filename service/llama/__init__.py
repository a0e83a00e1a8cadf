"""Running llama.cpp next to the gateway: the model file, the child process and its supervisor."""
