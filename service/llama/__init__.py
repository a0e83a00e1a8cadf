"""Running llama.cpp next to the gateway: the child process, its flags, its supervisor, and the pool of them."""
