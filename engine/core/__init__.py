"""The engine's foundation, importing nothing above it: errors, configuration, sampling plans,
random draws, conditioning, operation counting, the CUDA-graph step runners and the CPU allocator
setting."""
