"""Native C++ sources of the engine, built lazily on first use (installed as engine.csrc)."""
