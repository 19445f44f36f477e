"""engine: fast, exact sampling for autoregressive image generators (MAR, Fluid, ...)."""
from setuptools import setup

setup(
    name="engine",
    version="0.1.0",
    description="Fast, exact sampler for autoregressive image generators (MAR, Fluid text-to-image)",
    python_requires=">=3.10",
    packages=["engine", "engine.core", "engine.ops", "engine.native", "engine.kernels", "engine.backends",
              "engine.models", "engine.families", "engine.decoders", "engine.builtin", "engine.csrc",
              "engine.distributed", "engine.serving"],
    # The native sources live in csrc/ at the top of the repo and install as engine.csrc (the C++
    # builds lazily on first use). The Triton kernels are engine/kernels: a top-level kernels/
    # would shadow Hugging Face's `kernels` package, which transformers imports when it finds one.
    package_dir={"engine.csrc": "csrc"},
    package_data={"engine.builtin": ["assets/*/*", "assets/*/*/*"], "engine.csrc": ["*.cpp", "*.h", "*.cu"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "safetensors",
        "pillow",
        "tqdm",
        "ninja",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "digits": ["scikit-learn"],
        # Text-to-image (Fluid): local T5 encoders and the SD-3.5 AutoencoderKL.
        "text": ["transformers>=4.56", "diffusers>=0.30", "sentencepiece"],
        # `engine generate` on a Ray cluster (engine.distributed.generate_ray).
        "ray": ["ray[data]>=2.10"],
        # FID / IS (`engine generate --inception-weights`); install it with the torchvision that
        # matches your torch (torch-fidelity needs torchvision).
        "fid": ["torch-fidelity>=0.3"],
        # `engine serve` (engine.serving.http); the LitServe and Ray Serve adapters need their own.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"],
        "litserve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "litserve>=0.2.19"],
        "ray-serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "ray[serve]>=2.10"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib",
                 "transformers>=4.56", "diffusers>=0.30", "ray[data]>=2.10",
                 "fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "httpx",
                 "litserve>=0.2.19", "ray[serve]>=2.10", "import-linter>=2.0",
                 # the serving tests' independent clients: the official OpenAI SDK, schemathesis;
                 # the fuzzers (tests/fuzz)
                 "openai>=1.80", "schemathesis>=4.0", "hypothesis>=6.100", "atheris>=2.3"],
        # benchmarks/serve_locust.py: the load benchmark's client
        "bench": ["locust>=2.30"],
    },
    entry_points={"console_scripts": ["engine=engine.cli:main"]},
)
