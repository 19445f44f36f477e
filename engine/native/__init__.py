"""The native C++ extension (csrc/, installed as engine.csrc): its lazy build (engine.native.build)."""
